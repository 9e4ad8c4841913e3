"""Distillation data as latents: encoded once, stored as safetensors shards, read by both stages.

Three sources end in the same shard format:

- the shapes world (``distill.data.shapes.ShapesWorldDataset``) encoded by the teacher's VAE and
  text encoder;
- a folder of videos with captions (``VideoFolderDataset``: a sidecar ``<name>.txt`` per video,
  or ``captions.jsonl`` lines ``{"video": "<file name>", "caption": "..."}``), read with imageio
  and encoded the same way;
- teacher-generated latents from prompts (``PromptDataset`` + ``TeacherSamplesModule``).

Encoding and generation are distributed Lightning ``trainer.predict`` runs that write one
safetensors shard per batch, atomically, and resume after a kill with the missing batches only
(``distill.data.predict_shards``). A shard holds

    latents  [b, C, F, H, W]   normalised VAE latents (what the DiT sees)
    context  [b, text_len, text_dim]  text-encoder output, rows past each caption zeroed
    index    int64 [b]         the item's index in the source (caches built before with
                               Lightning's DistributedSampler hold padding repeats; readers keep
                               one copy per index)

plus the captions in the safetensors metadata. The folder also holds ``negative_context.
safetensors`` (the teacher's negative prompt encoded: the unconditional branch of CFG and the
caption-dropout input) and ``manifest.json``, written last, which marks the cache complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import imageio
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset

from distill.data.predict_shards import ShardWriter, run_sharded_predict
from distill.data.resumable import resumable_loader
from distill.data.shapes import ShapesWorldDataset
from teacher.checkpoint import CONFIG_FILE, TeacherModels, detect_layout, load_teacher
from teacher.config import A14B, TeacherConfig, teacher_config_from_dict
from teacher.materialize import materialize
from teacher.pipeline import (
    GenerationRequest,
    initial_noise,
    latent_shape,
    resolve_request,
    sample_latents,
)
from teacher.t5 import UMT5Encoder
from teacher.tokenizer import load_tokenizer
from teacher.vae import WanVAE
from teacher.weight_files import CheckpointError, save_safetensors_atomic, write_text_atomic

MANIFEST_FILE = "manifest.json"
NEGATIVE_CONTEXT_FILE = "negative_context.safetensors"
SHARD_FORMAT = "wan-distill-latents-v1"
VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mov", ".mkv", ".gif")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class LatentSource:
    """What to encode or generate. ``kind``: "shapes", "video_folder" or "teacher_samples".

    shapes: ``num_clips`` clips of ``num_frames`` frames from the world with ``seed``.
    video_folder: every video in ``folder``; ``num_frames`` frames from the start (every
        ``frame_stride``-th), centre-cropped and resized to ``height`` x ``width``.
    teacher_samples: ``num_clips`` videos generated from ``prompts`` (cycled; or from a text
        file ``prompts_file`` with one prompt per line), seed ``seed + i`` for item i, with the
        teacher's sampler at ``steps`` steps (None: its default) and its frames/size defaults.
    """

    kind: str = "shapes"
    num_clips: int = 1024
    num_frames: int = 17
    seed: int = 0
    folder: str | None = None
    frame_stride: int = 1
    height: int | None = None
    width: int | None = None
    prompts: tuple[str, ...] = ()
    prompts_file: str | None = None
    steps: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("shapes", "video_folder", "teacher_samples"):
            raise ValueError(f"data source kind {self.kind!r} must be 'shapes', 'video_folder' or "
                             f"'teacher_samples'")
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ValueError(f"num_frames={self.num_frames} must be 1 + 4k (the Wan VAE's clip "
                             f"length), e.g. 17 or 81")
        if self.kind == "video_folder" and not self.folder:
            raise ValueError("a video_folder source needs data.source.folder=<the folder of videos "
                             "with captions>")
        if self.kind == "teacher_samples" and not (self.prompts or self.prompts_file):
            raise ValueError("a teacher_samples source needs data.source.prompts or "
                             "data.source.prompts_file")


class VideoFolderDataset(Dataset):
    """Videos with captions from a folder; items {"video" float32 [3, T, H, W] in [-1, 1],
    "caption" str, "index" int}.

    Captions: ``<stem>.txt`` next to ``<stem>.mp4`` (any of ``VIDEO_SUFFIXES``), else the
    ``captions.jsonl`` line whose "video" (or "file"/"path") is the file name. A video without a
    caption is an error naming it, as is a video shorter than ``num_frames * frame_stride``.
    Frames are centre-cropped to the target aspect, then resized (bilinear, antialiased).
    """

    def __init__(self, folder: str | os.PathLike, num_frames: int, height: int, width: int,
                 frame_stride: int = 1):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"video folder {self.folder} does not exist")
        if height % 8 or width % 8 or height <= 0 or width <= 0:
            raise ValueError(f"height={height}, width={width} must be positive multiples of 8 "
                             f"(the VAE stride); e.g. 480 and 832")
        self.num_frames, self.height, self.width = num_frames, height, width
        self.frame_stride = max(1, int(frame_stride))
        self.files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        if not self.files:
            raise FileNotFoundError(f"{self.folder} holds no video ({', '.join(VIDEO_SUFFIXES)})")
        jsonl = _read_captions_jsonl(self.folder / "captions.jsonl")
        self.captions = []
        for path in self.files:
            sidecar = path.with_suffix(".txt")
            if sidecar.is_file():
                self.captions.append(sidecar.read_text(encoding="utf-8").strip())
            elif path.name in jsonl:
                self.captions.append(jsonl[path.name])
            else:
                raise FileNotFoundError(f"no caption for {path}: add {sidecar.name} or a line "
                                        f'{{"video": "{path.name}", "caption": "..."}} to '
                                        f"{self.folder / 'captions.jsonl'}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path = self.files[index]
        need = (self.num_frames - 1) * self.frame_stride + 1
        frames = _read_frames(path, need)
        if frames.shape[0] < need:
            raise ValueError(f"{path} has {frames.shape[0]} frames, fewer than the {need} needed "
                             f"(num_frames={self.num_frames}, frame_stride={self.frame_stride}); "
                             f"lower num_frames or remove the video")
        video = torch.from_numpy(frames[: need: self.frame_stride]).permute(3, 0, 1, 2).float()
        video = _crop_resize(video, self.height, self.width)
        return {"video": video / 127.5 - 1.0, "caption": self.captions[index], "index": index}


def _read_captions_jsonl(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    captions = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = row.get("video") or row.get("file") or row.get("path")
            captions[Path(name).name] = str(row["caption"]).strip()
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{path}:{number} is not a JSON object with \"video\" and \"caption\""
                             f": {line[:80]!r}") from None
    return captions


def _read_frames(path: Path, count: int) -> np.ndarray:
    """The first ``count`` frames of a video as uint8 [T, H, W, 3] (stops reading there)."""
    reader = imageio.get_reader(str(path), format="FFMPEG" if path.suffix != ".gif" else None)
    frames = []
    try:
        for frame in reader:
            frames.append(np.asarray(frame)[..., :3])
            if len(frames) == count:
                break
    finally:
        reader.close()
    if not frames:
        raise ValueError(f"{path} holds no readable frame")
    return np.stack(frames)


def _crop_resize(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[3, T, h, w] -> centre crop to the aspect height:width -> resize to [3, T, height, width]."""
    _, _, h, w = video.shape
    if h * width > w * height:  # too tall
        new_h = round(w * height / width)
        top = (h - new_h) // 2
        video = video[:, :, top: top + new_h]
    elif h * width < w * height:  # too wide
        new_w = round(h * width / height)
        left = (w - new_w) // 2
        video = video[:, :, :, left: left + new_w]
    if video.shape[2:] != (height, width):
        frames = video.permute(1, 0, 2, 3)  # T as batch
        frames = F.interpolate(frames, size=(height, width), mode="bilinear", antialias=True,
                               align_corners=False)
        video = frames.permute(1, 0, 2, 3)
    return video.clamp(0, 255)


class PromptDataset(Dataset):
    """``num_items`` (prompt, seed) pairs: prompts cycled, seed = ``seed + index``."""

    def __init__(self, prompts: Sequence[str], num_items: int, seed: int = 0):
        self.prompts = [p for p in prompts if p.strip()]
        if not self.prompts:
            raise ValueError("PromptDataset needs at least one non-empty prompt")
        self.num_items, self.seed = int(num_items), int(seed)

    def __len__(self) -> int:
        return self.num_items

    def __getitem__(self, index: int) -> dict:
        return {"caption": self.prompts[index % len(self.prompts)], "seed": self.seed + index,
                "index": index}


def _collate_items(items: list[dict]) -> dict:
    out = {"caption": [it["caption"] for it in items],
           "index": torch.tensor([it["index"] for it in items], dtype=torch.int64)}
    if "video" in items[0]:
        out["video"] = torch.stack([it["video"] for it in items])
    if "seed" in items[0]:
        out["seed"] = [it["seed"] for it in items]
    return out


class _IndexedShapes(Dataset):
    """ShapesWorldDataset items reduced to what encoding needs (video, caption, index)."""

    def __init__(self, source: LatentSource):
        self.world = ShapesWorldDataset(source.num_clips, num_frames=source.num_frames,
                                        seed=source.seed)

    def __len__(self) -> int:
        return len(self.world)

    def __getitem__(self, index: int) -> dict:
        item = self.world[index]
        return {"video": item["video"], "caption": item["caption"], "index": index}


def source_dataset(source: LatentSource) -> Dataset:
    """The Dataset whose items a predict run turns into latents."""
    if source.kind == "shapes":
        return _IndexedShapes(source)
    if source.kind == "video_folder":
        if source.height is None or source.width is None:
            raise ValueError("a video_folder source needs height and width (e.g. 480 and 832)")
        return VideoFolderDataset(source.folder, source.num_frames, source.height, source.width,
                                  source.frame_stride)
    prompts = list(source.prompts)
    if source.prompts_file:
        prompts += Path(source.prompts_file).read_text(encoding="utf-8").splitlines()
    return PromptDataset(prompts, source.num_clips, source.seed)


# ---------------------------------------------------------------------------------------------
# Teacher parts


def load_text_and_vae(teacher_dir: str | os.PathLike, text_encoder_dtype: torch.dtype = torch.float32
                      ) -> tuple[TeacherConfig, object, UMT5Encoder, WanVAE]:
    """(config, tokenizer, text encoder, VAE) of a teacher folder, WITHOUT its experts.

    Encoding data needs neither expert (two 14B networks for A14B); the official layout is read
    part by part, the Diffusers layout through ``teacher.checkpoint.load_teacher``.
    """
    root = Path(teacher_dir)
    if detect_layout(root) == "diffusers":
        models = load_teacher(root, dtype=torch.float32, text_encoder_dtype=text_encoder_dtype)
        return models.config, models.tokenizer, models.text_encoder, models.vae
    config_path = root / CONFIG_FILE
    config = (teacher_config_from_dict(json.loads(config_path.read_text(encoding="utf-8")),
                                       str(config_path))
              if config_path.is_file() else A14B)
    with torch.device("meta"):
        vae = WanVAE(**asdict(config.vae))
        text_encoder = UMT5Encoder(**asdict(config.t5))
    for module, name, dtype in ((vae, config.vae_checkpoint, torch.float32),
                                (text_encoder, config.t5_checkpoint, text_encoder_dtype)):
        path = root / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; the teacher folder is incomplete")
        materialize(module, [path], dtype=dtype)
        module.eval().requires_grad_(False)
    return config, load_tokenizer(root / config.tokenizer_dir), text_encoder, vae


# Files up to this size enter the teacher's fingerprint by their content; larger ones (a 14B
# expert's shards, ~10 GB each) by size and mtime, as reading them on every run takes minutes.
CONTENT_FINGERPRINT_MAX_BYTES = 64 * 2**20


def teacher_fingerprint(teacher_dir: str | os.PathLike) -> str:
    """A short hash of what the teacher folder holds (the latent cache's and the stages' key).

    Names, sizes and, up to CONTENT_FINGERPRINT_MAX_BYTES, contents: a moved or re-cloned folder
    of the same small teacher (the embedded shapes one, ~12 MB) keeps its fingerprint, so its
    caches and finished stages stay valid; a retrained one gets a new one. Larger files count
    by size and mtime instead.
    """
    root = Path(teacher_dir).resolve()
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        h.update(f"{path.relative_to(root).as_posix()}:{stat.st_size}:".encode())
        if stat.st_size <= CONTENT_FINGERPRINT_MAX_BYTES:
            h.update(hashlib.sha256(path.read_bytes()).digest())
        else:
            h.update(str(int(stat.st_mtime)).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Predict modules and the shard writer


class EncodeVideosModule(L.LightningModule):
    """``trainer.predict`` module: a batch of videos + captions -> latents + contexts.

    The teacher's VAE and text encoder are loaded in ``configure_model`` (each rank its own copy;
    no gradients) and kept outside the module registry: nothing here is trained or checkpointed.
    """

    def __init__(self, teacher_dir: str, store_dtype: str = "fp32",
                 text_encoder_dtype: str = "fp32"):
        super().__init__()
        self.teacher_dir, self.store_dtype = str(teacher_dir), _DTYPES[store_dtype]
        self.text_encoder_dtype = _DTYPES[text_encoder_dtype]
        self._parts: tuple | None = None

    def configure_model(self) -> None:
        if self._parts is None:
            config, tokenizer, text_encoder, vae = load_text_and_vae(self.teacher_dir,
                                                                     self.text_encoder_dtype)
            device = self.trainer.strategy.root_device
            self._parts = (config, tokenizer, text_encoder.to(device), vae.to(device))

    def _encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        config, tokenizer, text_encoder, _ = self._parts
        ids, mask = tokenizer(list(captions), text_len=config.dit.text_len, allow_empty=True)
        hidden = text_encoder(ids.to(self.device), mask.to(self.device))
        return hidden * mask.to(self.device).unsqueeze(-1).to(hidden.dtype)

    @torch.no_grad()
    def negative_context(self) -> torch.Tensor:
        """The teacher's negative prompt encoded, [1, text_len, text_dim]."""
        return self._encode_text([self._parts[0].sampling.negative_prompt]).to(self.store_dtype)

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        vae = self._parts[3]
        latents = vae.encode(batch["video"].to(self.device, torch.float32))
        return {"latents": latents.to(self.store_dtype),
                "context": self._encode_text(batch["caption"]).to(self.store_dtype),
                "index": batch["index"], "caption": list(batch["caption"])}


class TeacherSamplesModule(EncodeVideosModule):
    """``trainer.predict`` module: prompts + seeds -> the two-expert teacher's latents.

    The whole teacher is loaded in ``configure_model`` outside the registry; only the active expert sits
    on the accelerator (``teacher.pipeline.sample_latents``). Per-sample noise from each item's
    seed, so the latents do not depend on the batch size or the number of ranks.
    """

    def __init__(self, teacher_dir: str, store_dtype: str = "fp32", dtype: str = "fp32",
                 steps: int | None = None, frames: int | None = None):
        super().__init__(teacher_dir, store_dtype, dtype)
        self.dtype_name, self.steps, self.frames = dtype, steps, frames
        self._models: TeacherModels | None = None

    def configure_model(self) -> None:
        if self._models is None:
            models = load_teacher(self.teacher_dir, dtype=_DTYPES[self.dtype_name])
            models.text_encoder.to(self.trainer.strategy.root_device)
            models.vae.to(self.trainer.strategy.root_device)
            self._models = models
            self._parts = (models.config, models.tokenizer, models.text_encoder, models.vae)

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        models = self._models
        request = resolve_request(models, GenerationRequest(
            prompt=batch["caption"][0], steps=self.steps, frames=self.frames))
        context_pos = self._encode_text(batch["caption"])
        context_neg = self.negative_context().to(context_pos.dtype)
        shape = latent_shape(models, request.frames, request.height, request.width)
        noise = initial_noise(shape, batch["seed"])
        latents, _ = sample_latents(models, context_pos, context_neg.expand(len(batch["seed"]), -1, -1),
                                    noise, request, device=self.device,
                                    offload=self.device.type != "cpu")
        return {"latents": latents.to(self.store_dtype), "context": context_pos.to(self.store_dtype),
                "index": batch["index"], "caption": list(batch["caption"])}


def latent_shard_writer(cache_dir: str | os.PathLike) -> ShardWriter:
    """The writer of a latent cache's shards (see the module docstring for their contents)."""
    return ShardWriter(cache_dir, SHARD_FORMAT, _shard_tensors, _shard_metadata)


def _shard_tensors(prediction: dict) -> dict[str, torch.Tensor]:
    return {"latents": prediction["latents"], "context": prediction["context"],
            "index": prediction["index"].to(torch.int64)}


def _shard_metadata(prediction: dict) -> dict[str, str]:
    return {"captions": json.dumps(prediction["caption"], ensure_ascii=False)}


# ---------------------------------------------------------------------------------------------
# The cache


def cache_key(source: LatentSource, teacher_dir: str | os.PathLike, store_dtype: str) -> str:
    """Folder name of the cache of ``source`` encoded by this teacher: ``<kind>-<hash>``."""
    h = hashlib.sha256(json.dumps({"source": asdict(source), "store_dtype": store_dtype,
                                   "teacher": teacher_fingerprint(teacher_dir)},
                                  sort_keys=True).encode())
    return f"{source.kind}-{h.hexdigest()[:12]}"


def is_complete(cache_dir: str | os.PathLike) -> bool:
    """True if ``cache_dir`` holds a finished cache (its manifest)."""
    return (Path(cache_dir) / MANIFEST_FILE).is_file()


def build_latent_cache(cache_dir: str | os.PathLike, source: LatentSource, teacher_dir: str,
                       *, batch_size: int = 16, store_dtype: str = "fp32",
                       trainer_kwargs: dict | None = None, num_workers: int = 0) -> Path:
    """Encode (or generate) ``source`` into ``cache_dir`` with a distributed ``trainer.predict``.

    Reuses a complete cache, and the shards of an interrupted attempt
    (``distill.data.predict_shards``). ``trainer_kwargs`` go to ``L.Trainer`` (accelerator,
    devices, strategy...); batch j goes to rank ``j % world_size``.
    """
    cache_dir = Path(cache_dir)
    if is_complete(cache_dir):
        return cache_dir
    dataset = source_dataset(source)
    if source.kind == "teacher_samples":
        module = TeacherSamplesModule(teacher_dir, store_dtype=store_dtype,
                                      steps=source.steps, frames=source.num_frames)
    else:
        module = EncodeVideosModule(teacher_dir, store_dtype=store_dtype)
    trainer = run_sharded_predict(cache_dir, module, dataset, batch_size=batch_size,
                                  collate_fn=_collate_items, writer=latent_shard_writer(cache_dir),
                                  trainer_kwargs=trainer_kwargs, num_workers=num_workers)
    if trainer.is_global_zero:
        # configure_model loaded the text encoder on every rank, even one with no batch left.
        save_safetensors_atomic({"context": module.negative_context()},
                                cache_dir / NEGATIVE_CONTEXT_FILE)
        manifest = {"format": SHARD_FORMAT, "source": asdict(source), "store_dtype": store_dtype,
                    "teacher_dir": str(Path(teacher_dir).resolve()), "num_items": len(dataset)}
        write_text_atomic(json.dumps(manifest, indent=2, ensure_ascii=False),
                          cache_dir / MANIFEST_FILE)
    trainer.strategy.barrier("latent-cache-manifest")
    return cache_dir


class LatentShardDataset(Dataset):
    """The items of a latent cache folder, one per source index (duplicates dropped), in index
    order whatever the number of ranks that wrote them.

    Items: {"latents" float32 [C, F, H, W], "context" float32 [text_len, text_dim], "caption"
    str, "index" int}. ``num_frames`` keeps the first latent frames (a multiple of the chunk
    size, e.g. for shorter training clips). ``in_memory`` loads every shard at construction
    (small caches such as the shapes world's); otherwise each item is sliced from its file.
    """

    def __init__(self, folder: str | os.PathLike, num_frames: int | None = None,
                 in_memory: bool = True):
        self.folder = Path(folder)
        if not is_complete(self.folder):
            raise FileNotFoundError(f"{self.folder} is not a complete latent cache (no "
                                    f"{MANIFEST_FILE}); build it with build_latent_cache")
        self.num_frames, self.in_memory = num_frames, in_memory
        rows: dict[int, tuple[Path, int, str]] = {}
        for shard in sorted(self.folder.glob("shard-*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != SHARD_FORMAT:
                    raise CheckpointError(f"{shard} is not a {SHARD_FORMAT} shard (format "
                                          f"{meta.get('format')!r}); rebuild the cache")
                captions = json.loads(meta["captions"])
                for row, index in enumerate(f.get_tensor("index").tolist()):
                    rows.setdefault(int(index), (shard, row, captions[row]))
        if not rows:
            raise FileNotFoundError(f"{self.folder} holds no shard-*.safetensors")
        self.indices = sorted(rows)
        self.rows = [rows[i] for i in self.indices]
        self._latents = self._context = None
        if in_memory:
            by_shard: dict[Path, dict[str, torch.Tensor]] = {}
            for shard, _, _ in self.rows:
                if shard not in by_shard:
                    with safe_open(str(shard), framework="pt") as f:
                        by_shard[shard] = {k: f.get_tensor(k) for k in ("latents", "context")}
            self._latents = torch.stack([by_shard[s]["latents"][r] for s, r, _ in self.rows])
            self._context = torch.stack([by_shard[s]["context"][r] for s, r, _ in self.rows])
        self.negative_context = _read_negative_context(self.folder)

    def __len__(self) -> int:
        return len(self.rows)

    def _frames(self, latents: torch.Tensor) -> torch.Tensor:
        if self.num_frames is None:
            return latents
        if latents.shape[1] < self.num_frames:
            raise ValueError(f"cached latents have {latents.shape[1]} frames, fewer than "
                             f"num_frames={self.num_frames}")
        return latents[:, : self.num_frames]

    def __getitem__(self, i: int) -> dict:
        shard, row, caption = self.rows[i]
        if self.in_memory:
            latents, context = self._latents[i], self._context[i]
        else:
            with safe_open(str(shard), framework="pt") as f:
                latents = f.get_slice("latents")[row]
                context = f.get_slice("context")[row]
        return {"latents": self._frames(latents.float()), "context": context.float(),
                "caption": caption, "index": self.indices[i]}


def _read_negative_context(folder: Path) -> torch.Tensor:
    path = folder / NEGATIVE_CONTEXT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the latent cache is incomplete, rebuild it")
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("context").float()


def collate_latents(items: list[dict], negative_context: torch.Tensor) -> dict:
    """Items -> {"latents" [B, C, F, H, W], "context" [B, L, D], "context_neg" [1, L, D],
    "caption" list, "index" [B]} (one shared copy of the negative context per batch)."""
    return {"latents": torch.stack([it["latents"] for it in items]),
            "context": torch.stack([it["context"] for it in items]),
            "context_neg": negative_context,
            "caption": [it["caption"] for it in items],
            "index": torch.tensor([it["index"] for it in items], dtype=torch.int64)}


class _Collate:
    """Picklable collate (DataLoader workers) binding the negative context."""

    def __init__(self, negative_context: torch.Tensor):
        self.negative_context = negative_context

    def __call__(self, items: list[dict]) -> dict:
        return collate_latents(items, self.negative_context)


class LatentDataModule(L.LightningDataModule):
    """Training batches from a latent cache folder (see ``collate_latents`` for the batch).

    Shuffled by ``seed``, last partial batch dropped, each rank its share, and resumable
    mid-epoch (``distill.data.resumable``; the Trainer needs ``use_distributed_sampler=False``).
    """

    def __init__(self, folder: str, batch_size: int = 16, num_frames: int | None = None,
                 seed: int = 0, num_workers: int = 0, in_memory: bool = True):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.folder, self.batch_size, self.num_frames = folder, batch_size, num_frames
        self.seed, self.num_workers, self.in_memory = seed, num_workers, in_memory
        self.dataset: LatentShardDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = LatentShardDataset(self.folder, self.num_frames, self.in_memory)
            if len(self.dataset) < self.batch_size:
                raise ValueError(f"the latent cache {self.folder} has {len(self.dataset)} items, "
                                 f"fewer than batch_size={self.batch_size}")

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return resumable_loader(self.dataset, self.batch_size, self.seed, self.trainer,
                                num_workers=self.num_workers,
                                persistent_workers=self.num_workers > 0,
                                collate_fn=_Collate(self.dataset.negative_context))

