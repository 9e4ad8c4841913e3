"""Fréchet Video Distance: the standard I3D embedding, feature statistics, the Fréchet distance.

Protocol (google-research ``frechet_video_distance``, the TF reference):
- uint8 videos ``[N, T, H, W, 3]``; the first 16 frames of each;
- every frame resized to 224x224 with TF1 ``tf.image.resize_bilinear`` semantics
  (``align_corners=False``, ``half_pixel_centers=False``, no antialiasing) - implemented here
  exactly, see ``tf_bilinear_coordinates``;
- values ``2 x / 255 - 1`` in [-1, 1];
- the TF-Hub I3D's 400-d pre-softmax logits averaged over time (``eval.i3d.I3D``);
- FD between Gaussians fitted to the real and generated embeddings, covariances with N - 1
  (as TF-GAN's ``frechet_classifier_distance_from_activations``), float64.

FVD is strongly biased upward at small N: always report N (``FVDResult`` carries it) and compare
values only at equal N (2048 is the de-facto standard).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import scipy.linalg
import torch

from eval.i3d import INPUT_SIZE, MIN_FRAMES
from eval.i3d_weights import load_i3d

FVD_NUM_FRAMES = 16

ArrayLike = np.ndarray | torch.Tensor
FeatureModel = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------
# Preprocessing and embedding
# --------------------------------------------------------------------------------------------


def tf_bilinear_coordinates(
    in_size: int, out_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of TF1 ``resize_bilinear`` along one axis.

    TF1's default (``align_corners=False, half_pixel_centers=False``) samples output pixel ``o``
    at source coordinate ``s = o * in_size / out_size`` (no half-pixel offset), between
    ``floor(s)`` and ``min(ceil(s), in_size - 1)``, with weight ``s - floor(s)`` on the upper one;
    there is no antialiasing when shrinking. PyTorch's ``interpolate(align_corners=False)`` uses
    half-pixel centres and ``align_corners=True`` scales by ``(in-1)/(out-1)``: neither equals TF1,
    hence this function. The coordinate is computed in float32 like TF's kernel.

    Returns:
        ``lower``, ``upper`` int64 ``[out_size]`` and ``lerp`` float32 ``[out_size]``.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    source = np.arange(out_size, dtype=np.float32) * scale
    lower = np.floor(source)
    lerp = (source - lower).astype(np.float32)
    lower_index = np.clip(lower.astype(np.int64), 0, in_size - 1)
    upper_index = np.minimum(np.ceil(source).astype(np.int64), in_size - 1)
    return torch.from_numpy(lower_index), torch.from_numpy(upper_index), torch.from_numpy(lerp)


def _resize_axis(x: torch.Tensor, dim: int, out_size: int) -> torch.Tensor:
    lower, upper, lerp = (v.to(x.device) for v in tf_bilinear_coordinates(x.shape[dim], out_size))
    low, high = x.index_select(dim, lower), x.index_select(dim, upper)
    shape = [1] * x.ndim
    shape[dim] = out_size
    # a + (b - a) * w, TF's form: a constant image stays exactly constant.
    return low + (high - low) * lerp.view(shape)


def tf_resize_bilinear(frames: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """TF1 ``tf.image.resize_bilinear(frames, (size, size))`` for float ``[..., H, W, C]``.

    Interpolates along W first, then H, as TF's kernel does; an axis already of ``size`` is left
    untouched (TF's resize is exact there too).
    """
    if frames.shape[-2] != size:
        frames = _resize_axis(frames, frames.ndim - 2, size)
    if frames.shape[-3] != size:
        frames = _resize_axis(frames, frames.ndim - 3, size)
    return frames


def _check_videos(videos: ArrayLike, num_frames: int) -> None:
    if not isinstance(videos, (np.ndarray, torch.Tensor)):
        raise TypeError(
            f"videos must be a numpy array or torch tensor, got {type(videos).__name__}"
        )
    if videos.dtype not in (np.uint8, torch.uint8):
        raise ValueError(
            f"videos must be uint8 in [0, 255] (the FVD protocol); got dtype {videos.dtype}. "
            "For floats in [0, 1] pass (x * 255).round().clip(0, 255) cast to uint8."
        )
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(
            f"videos must be [N, T, H, W, 3] (channels last, RGB); got shape {tuple(videos.shape)}."
        )
    if num_frames < MIN_FRAMES:
        raise ValueError(
            f"num_frames={num_frames} is below the I3D minimum of {MIN_FRAMES} frames; the FVD "
            f"protocol uses {FVD_NUM_FRAMES}."
        )
    n, t, h, w, _ = videos.shape
    if n == 0 or h == 0 or w == 0:
        raise ValueError(f"videos must be non-empty; got shape {tuple(videos.shape)}.")
    if t < num_frames:
        raise ValueError(
            f"videos have T={t} frames but num_frames={num_frames} are taken from each. Use "
            f"longer clips, or pass num_frames={max(t, MIN_FRAMES)} (>= {MIN_FRAMES}, the I3D "
            "minimum) knowing that values at other clip lengths are not comparable with "
            f"{FVD_NUM_FRAMES}-frame FVDs."
        )


def preprocess_videos(videos: torch.Tensor, num_frames: int = FVD_NUM_FRAMES) -> torch.Tensor:
    """uint8 ``[B, T, H, W, 3]`` -> float32 ``[B, 3, num_frames, 224, 224]`` in [-1, 1].

    First ``num_frames`` frames, TF1 bilinear resize (``tf_resize_bilinear``), ``2 x / 255 - 1``.
    Runs on ``videos.device``.
    """
    _check_videos(videos, num_frames)
    clip = tf_resize_bilinear(videos[:, :num_frames].to(torch.float32))
    # Same order as the reference: resize the 0-255 values, then scale.
    scaled = clip * (2.0 / 255.0) - 1.0
    return scaled.permute(0, 4, 1, 2, 3).contiguous()  # [B, 3, T, 224, 224]


@contextmanager
def _fp32_convolutions(device: torch.device) -> Iterator[None]:
    # cuDNN convolutions default to TF32 on Ampere+ GPUs (10-bit mantissa): FVD must be computed
    # in full fp32 to be comparable, so TF32 is switched off for the call and then restored.
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cudnn.conv.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cudnn.conv.fp32_precision = previous


def video_features(
    videos: ArrayLike,
    model: FeatureModel | None = None,
    batch_size: int = 8,
    num_frames: int = FVD_NUM_FRAMES,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Embed videos for FVD.

    Args:
        videos: uint8 ``[N, T, H, W, 3]`` (numpy or torch), ``T >= num_frames``.
        model: maps float32 ``[B, 3, num_frames, 224, 224]`` in [-1, 1] to ``[B, D]``; default the
            installed TF-Hub I3D (``eval.i3d_weights.load_i3d``), D = 400.
        batch_size: videos per forward pass.
        num_frames: frames taken from the start of each video; 16 is the protocol, 9 the I3D
            minimum.
        device: where to run; default the model's parameter device (CPU for parameter-free models).

    Returns:
        float32 ``[N, D]`` on the CPU.
    """
    _check_videos(videos, num_frames)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if model is None:
        model = load_i3d(device=device or "cpu")
    if device is None:
        first = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    if isinstance(videos, np.ndarray):
        videos = torch.from_numpy(videos)
    outputs = []
    no_autocast = torch.autocast(device.type, enabled=False)  # autocast would run convs in 16 bit
    with torch.inference_mode(), no_autocast, _fp32_convolutions(device):
        for start in range(0, videos.shape[0], batch_size):
            batch = videos[start : start + batch_size].to(device)
            features = model(preprocess_videos(batch, num_frames))
            if features.ndim != 2 or features.shape[0] != batch.shape[0]:
                raise ValueError(
                    f"the feature model must return [B, D]; got {tuple(features.shape)} for "
                    f"B={batch.shape[0]}"
                )
            outputs.append(features.float().cpu())
    return torch.cat(outputs)


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def _as_float64_features(features: ArrayLike, name: str = "features") -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().to("cpu", torch.float64).numpy()
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be [N, D]; got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contain non-finite values (NaN/inf); check the feature model")
    return array


def feature_statistics(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased (N - 1) covariance ``[D, D]`` of ``features [N, D]``, float64.

    Two-pass (centred) computation; needs N >= 2.
    """
    array = _as_float64_features(features)
    n = array.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got N={n}")
    mean = array.mean(axis=0)
    centred = array - mean
    return mean, centred.T @ centred / (n - 1)


class FeatureStats:
    """Streaming, mergeable sufficient statistics of features: N, sum x, sum x x^T (float64).

    Accumulating batch by batch gives the one-shot statistics up to float64 round-off; two
    accumulators (e.g. of two ranks) merge by adding, and ``to_tensor``/``from_tensor`` pack the
    state into one float64 vector for a single ``all_reduce(SUM)``.

    Raw (uncentred) sums lose ~eps * |mean|^2 / var relative precision in the covariance; for
    I3D logits (|mean| ~ 10, var ~ 1) that is ~1e-13 in float64, far below the FVD's own noise.
    """

    def __init__(self, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = dim
        self.n = 0
        self.sum = np.zeros(dim, dtype=np.float64)
        self.sum_outer = np.zeros((dim, dim), dtype=np.float64)

    def update(self, features: ArrayLike) -> None:
        """Add ``features [B, dim]`` (any float dtype; accumulated in float64)."""
        array = _as_float64_features(features)
        if array.shape[1] != self.dim:
            raise ValueError(f"features have D={array.shape[1]}, this accumulator has {self.dim}")
        self.n += array.shape[0]
        self.sum += array.sum(axis=0)
        self.sum_outer += array.T @ array

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Return the statistics of both sample sets (neither input is modified)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of D={self.dim} and D={other.dim}")
        merged = FeatureStats(self.dim)
        merged.n = self.n + other.n
        merged.sum = self.sum + other.sum
        merged.sum_outer = self.sum_outer + other.sum_outer
        return merged

    def to_tensor(self) -> torch.Tensor:
        """Pack ``[n, sum (D), sum_outer (D*D)]`` into a float64 vector (all_reduce with SUM)."""
        return torch.from_numpy(
            np.concatenate([[float(self.n)], self.sum, self.sum_outer.reshape(-1)])
        )

    @classmethod
    def from_tensor(cls, packed: torch.Tensor, dim: int) -> FeatureStats:
        """Inverse of ``to_tensor`` (e.g. after ``all_reduce``)."""
        values = packed.detach().to("cpu", torch.float64).numpy()
        if values.shape != (1 + dim + dim * dim,):
            raise ValueError(
                f"packed statistics for D={dim} need {1 + dim + dim * dim} values, "
                f"got shape {values.shape}"
            )
        stats = cls(dim)
        stats.n = int(round(values[0]))
        stats.sum = values[1 : 1 + dim].copy()
        stats.sum_outer = values[1 + dim :].reshape(dim, dim).copy()
        return stats

    def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean ``[D]`` and unbiased (N - 1) covariance ``[D, D]``, float64; needs N >= 2."""
        if self.n < 2:
            raise ValueError(f"need at least 2 samples for a covariance, got N={self.n}")
        mean = self.sum / self.n
        covariance = (self.sum_outer - self.n * np.outer(mean, mean)) / (self.n - 1)
        return mean, (covariance + covariance.T) / 2  # exact symmetry despite round-off


# --------------------------------------------------------------------------------------------
# The Fréchet distance
# --------------------------------------------------------------------------------------------


def _check_gaussian(mu: ArrayLike, sigma: ArrayLike, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu.detach().cpu() if isinstance(mu, torch.Tensor) else mu, dtype=np.float64)
    sigma = np.asarray(
        sigma.detach().cpu() if isinstance(sigma, torch.Tensor) else sigma, dtype=np.float64
    )
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"{name}: need mu [D] and sigma [D, D]; got mu {mu.shape}, sigma {sigma.shape}"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: mu/sigma contain non-finite values")
    return mu, (sigma + sigma.T) / 2


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    # Tr((S1 S2)^1/2) = nuclear norm of L1^T L2 for any factors S = L L^T: (L1^T L2)(L1^T L2)^T =
    # L1^T S2 L1 has the eigenvalues of S1 S2. With L = V sqrt(max(lambda, 0)) from eigh, the
    # singular values come straight from an SVD instead of square roots of eigenvalues of a
    # product, which would amplify round-off near zero (rank-deficient covariances, N < D).
    # Negative eigenvalues of a covariance are round-off; they are clamped to 0.
    lam1, vec1 = np.linalg.eigh(sigma1)
    lam2, vec2 = np.linalg.eigh(sigma2)
    factor1 = vec1 * np.sqrt(np.clip(lam1, 0.0, None))
    factor2 = vec2 * np.sqrt(np.clip(lam2, 0.0, None))
    return float(np.linalg.svd(factor1.T @ factor2, compute_uv=False).sum())


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    # The TTUR / pytorch-fid recipe: sqrtm of the (non-symmetric) product; if that is not finite
    # (singular product), retry with eps * I added to both covariances; a complex result is
    # accepted as its real part only when the imaginary residue on the diagonal is small.
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        residue = np.max(np.abs(np.diagonal(covmean).imag))
        if residue > 1e-3:
            raise ValueError(
                f"sqrtm of sigma1 @ sigma2 has an imaginary diagonal residue of {residue:.3g} "
                "(> 1e-3): the covariances are badly conditioned; use method='eigh'"
            )
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(
    mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike, method: str = "eigh"
) -> float:
    """``||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^1/2)`` in float64.

    Args:
        mu1, mu2: means ``[D]``; sigma1, sigma2: covariances ``[D, D]`` (symmetrised here).
        method: ``"eigh"`` (default; symmetric factors + SVD, no complex residue) or ``"sqrtm"``
            (scipy ``sqrtm`` of the product, as StyleGAN-V / pytorch-fid; for cross-checks).

    Returns:
        The distance (>= 0; round-off below 0 is clamped).
    """
    mu1, sigma1 = _check_gaussian(mu1, sigma1, "first Gaussian")
    mu2, sigma2 = _check_gaussian(mu2, sigma2, "second Gaussian")
    if mu1.shape != mu2.shape:
        raise ValueError(f"dimension mismatch: D={mu1.shape[0]} vs D={mu2.shape[0]}")
    if method == "eigh":
        trace_sqrt = _trace_sqrt_product_eigh(sigma1, sigma2)
    elif method == "sqrtm":
        trace_sqrt = _trace_sqrt_product_sqrtm(sigma1, sigma2)
    else:
        raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return max(float(value), 0.0)


def frechet_distance_of_samples(real: np.ndarray, fake: np.ndarray) -> float:
    """``frechet_distance`` of the Gaussians fitted to ``real [N_r, D]`` and ``fake [N_f, D]``
    (float64, unbiased covariances), without forming a D x D matrix when both N are below D.

    With A = centred / sqrt(N - 1), S = A^T A, so Tr(S) = ||A||_F^2 and Tr((S_r S_f)^1/2) is the
    nuclear norm of A_r A_f^T (N_r x N_f): one small SVD instead of two D x D eigendecompositions,
    which is what makes the bootstrap cheap at the usual N < 400 = D.
    """
    if max(real.shape[0], fake.shape[0]) >= real.shape[1]:
        return frechet_distance(*feature_statistics(real), *feature_statistics(fake))
    mean_r, mean_f = real.mean(axis=0), fake.mean(axis=0)
    a_r = (real - mean_r) / np.sqrt(real.shape[0] - 1)
    a_f = (fake - mean_f) / np.sqrt(fake.shape[0] - 1)
    trace_sqrt = np.linalg.svd(a_r @ a_f.T, compute_uv=False).sum()
    diff = mean_r - mean_f
    value = diff @ diff + np.square(a_r).sum() + np.square(a_f).sum() - 2.0 * trace_sqrt
    return max(float(value), 0.0)


# --------------------------------------------------------------------------------------------
# FVD with a bootstrap interval
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FVDResult:
    """An FVD value with its sample sizes and bootstrap interval (None when not computed)."""

    value: float
    n_real: int
    n_fake: int
    ci_low: float | None
    ci_high: float | None
    n_bootstrap: int = 0
    confidence: float = 0.95

    def to_dict(self) -> dict:
        return asdict(self)


def bootstrap_interval(
    real: np.ndarray, fake: np.ndarray, value: float, bootstrap: int, seed: int, confidence: float,
    on_resample: Callable[[], None] | None = None,
) -> tuple[float, float]:
    """Interval for the FD of ``real [N_r, D]`` vs ``fake [N_f, D]`` from ``bootstrap`` resamples
    of BOTH sets with replacement (``np.random.default_rng(seed)``).

    A resample holds only ~63 % distinct samples, so its FD carries MORE small-sample bias than
    the point value and the whole bootstrap distribution sits above it (a plain percentile
    interval often excludes the point value). The bootstrap's spread is kept and its bias
    removed: ``[value - (mean_b - q_low), value + (q_high - mean_b)]`` with ``q`` the
    ``(1 -+ confidence) / 2`` quantiles and ``mean_b`` the bootstrap mean; the low end is
    clamped at 0. It describes the sampling variability of the FD at these N, not the distance
    to the infinite-sample FD (the small-N bias remains). In a simulation (D=10, N=100, 200
    repetitions, 200 resamples) the 95 % interval covered the expected FD at that N in 98.5 % of
    runs: slightly conservative. ``on_resample()`` is called after each resample (a progress bar).
    """
    rng = np.random.default_rng(seed)
    values = np.empty(bootstrap, dtype=np.float64)
    for i in range(bootstrap):
        real_sample = real[rng.integers(0, real.shape[0], real.shape[0])]
        fake_sample = fake[rng.integers(0, fake.shape[0], fake.shape[0])]
        values[i] = frechet_distance_of_samples(real_sample, fake_sample)
        if on_resample is not None:
            on_resample()
    alpha = (1.0 - confidence) / 2.0
    q_low, q_high = np.quantile(values, [alpha, 1.0 - alpha])
    centre = values.mean()
    return max(float(value - (centre - q_low)), 0.0), float(value + (q_high - centre))


def fvd(
    real_features: ArrayLike,
    fake_features: ArrayLike,
    bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    on_resample: Callable[[], None] | None = None,
) -> FVDResult:
    """FD between Gaussians fitted to ``real_features [N_r, D]`` and ``fake_features [N_f, D]``.

    Args:
        bootstrap: number of resamples for the interval (0: no interval). Each costs two
            covariances, two D x D eigendecompositions and an SVD (~50 ms at N=2048, D=400 on
            a free 2-core CPU, so the default 1000 takes about a minute); below N = D one
            N_r x N_f SVD (``frechet_distance_of_samples``).
        seed: seeds the resampling; the same inputs and seed give the same interval.
        confidence: coverage of the interval.
        on_resample: called after each bootstrap resample (minutes on a CPU: a progress bar).

    The value is called FVD only when the features come from the standard I3D (``video_features``
    with the default model); with any other extractor it is a Fréchet distance in that space.
    """
    real = _as_float64_features(real_features, "real_features")
    fake = _as_float64_features(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"feature dimension mismatch: real D={real.shape[1]}, fake D={fake.shape[1]}"
        )
    for name, array in (("real", real), ("fake", fake)):
        if array.shape[0] < 2:
            raise ValueError(f"need at least 2 {name} samples, got N={array.shape[0]}")
    if bootstrap < 0 or not 0.0 < confidence < 1.0:
        raise ValueError(
            f"need bootstrap >= 0 and 0 < confidence < 1; got {bootstrap}, {confidence}"
        )
    value = frechet_distance(*feature_statistics(real), *feature_statistics(fake))
    ci_low = ci_high = None
    if bootstrap > 0:
        ci_low, ci_high = bootstrap_interval(real, fake, value, bootstrap, seed, confidence,
                                             on_resample)
    return FVDResult(value, real.shape[0], fake.shape[0], ci_low, ci_high, bootstrap, confidence)


def fvd_from_stats(real: FeatureStats, fake: FeatureStats) -> FVDResult:
    """FD from streamed (e.g. all-reduced) statistics; no bootstrap interval, since that needs
    the individual features (gather them and call ``fvd`` for one)."""
    value = frechet_distance(*real.mean_and_covariance(), *fake.mean_and_covariance())
    return FVDResult(value, real.n, fake.n, None, None, 0)
