"""Lightning data modules: the embedded shapes world."""

from distill.data.shapes import ShapesWorldDataModule, ShapesWorldDataset, video_to_tensor

__all__ = ["ShapesWorldDataModule", "ShapesWorldDataset", "video_to_tensor"]
