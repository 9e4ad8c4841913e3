"""Fréchet distance, feature statistics, bootstrap and the FVD preprocessing (CPU, tiny).

Feature extractors here are toy functions; their distances are Fréchet distances in a toy
space and are never reported as FVD.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from eval.fvd import (
    FeatureStats,
    feature_statistics,
    frechet_distance,
    frechet_distance_of_samples,
    fvd,
    fvd_from_stats,
    preprocess_videos,
    tf_resize_bilinear,
    video_features,
)


def _features(seed: int, n: int, d: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((d, d)) / math.sqrt(d)  # correlated, full-rank features
    return (rng.standard_normal((n, d)) @ mixing) * scale + shift


def _random_covariance(seed: int, d: int) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((d, 2 * d))
    return a @ a.T / (2 * d)


def _scipy_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """Independent reference: the textbook formula with scipy's general matrix square root."""
    root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(
        np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root).real
    )


# ------------------------------------------------------------------ Fréchet distance


@pytest.mark.parametrize("n", [200, 5])  # full-rank and rank-deficient (N < D) covariances
@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_distance_of_a_set_to_itself_is_zero(n, method):
    mu, sigma = feature_statistics(_features(0, n, 16))
    assert frechet_distance(mu, sigma, mu, sigma, method=method) == pytest.approx(0.0, abs=1e-6)


def test_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    d = 12
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_closed_forms_for_related_full_covariances():
    rng = np.random.default_rng(2)
    d = 10
    sigma = _random_covariance(3, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    mean_term = np.sum((mu1 - mu2) ** 2)
    # Equal covariances: only the means count.
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(mean_term, rel=1e-9)
    # Sigma vs c^2 Sigma: (1 - c)^2 Tr(Sigma) is added.
    c = 1.7
    expected = mean_term + (1 - c) ** 2 * np.trace(sigma)
    assert frechet_distance(mu1, sigma, mu2, c**2 * sigma) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_agrees_with_independent_scipy_formula(method):
    real, fake = _features(4, 300, 20), _features(5, 250, 20, shift=0.3, scale=1.4)
    mu1, sigma1 = real.mean(0), np.cov(real, rowvar=False)
    mu2, sigma2 = fake.mean(0), np.cov(fake, rowvar=False)
    expected = _scipy_frechet(mu1, sigma1, mu2, sigma2)
    got = frechet_distance(mu1, sigma1, mu2, sigma2, method=method)
    assert got == pytest.approx(expected, rel=1e-8)


def test_symmetric_and_accepts_torch_tensors():
    a, b = feature_statistics(_features(6, 80, 8)), feature_statistics(_features(7, 90, 8, 0.5))
    forward = frechet_distance(*a, *b)
    assert frechet_distance(*b, *a) == pytest.approx(forward, rel=1e-10)
    as_torch = [torch.from_numpy(x).float() for x in (*a, *b)]
    assert frechet_distance(*as_torch) == pytest.approx(forward, rel=1e-5)  # fp32 inputs


def test_frechet_distance_rejects_bad_input():
    mu, sigma = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match="dimension mismatch"):
        frechet_distance(mu, sigma, np.zeros(5), np.eye(5))
    with pytest.raises(ValueError, match=r"sigma \[D, D\]"):
        frechet_distance(mu, np.eye(3), mu, sigma)
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(mu, np.full((4, 4), np.nan), mu, sigma)
    with pytest.raises(ValueError, match="method"):
        frechet_distance(mu, sigma, mu, sigma, method="svd")


# ------------------------------------------------------------------ statistics


def test_feature_statistics_match_numpy():
    x = _features(8, 40, 6, shift=3.0)
    mu, sigma = feature_statistics(x)
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10)


def test_streaming_accumulation_equals_one_shot():
    x = _features(9, 103, 7, shift=5.0)  # an offset mean stresses the raw-sum covariance
    stats = FeatureStats(7)
    for start, stop in [(0, 1), (1, 30), (30, 31), (31, 103)]:  # uneven batches, incl. size 1
        stats.update(torch.from_numpy(x[start:stop]))
    mu, sigma = stats.mean_and_covariance()
    mu_ref, sigma_ref = feature_statistics(x)
    assert stats.n == 103
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-12)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-9, atol=1e-12)


def test_merged_accumulators_equal_one_shot_and_pack_round_trip():
    x = _features(10, 60, 5, shift=-2.0)
    first, second = FeatureStats(5), FeatureStats(5)
    first.update(x[:25])
    second.update(x[25:])
    # Pack/unpack as a distributed all_reduce(SUM) would: the sum of packed vectors.
    packed = first.to_tensor() + second.to_tensor()
    for merged in (first.merge(second), FeatureStats.from_tensor(packed, 5)):
        mu, sigma = merged.mean_and_covariance()
        mu_ref, sigma_ref = feature_statistics(x)
        assert merged.n == 60
        np.testing.assert_allclose(mu, mu_ref, rtol=1e-12)
        np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-9, atol=1e-12)
    assert first.n == 25  # merge leaves its inputs alone


def test_fvd_from_streamed_stats_equals_fvd_of_features():
    real, fake = _features(20, 70, 6), _features(21, 40, 6, shift=0.7)
    real_stats, fake_stats = FeatureStats(6), FeatureStats(6)
    for start in range(0, 70, 16):
        real_stats.update(real[start : start + 16])
    fake_stats.update(fake)
    streamed = fvd_from_stats(real_stats, fake_stats)
    direct = fvd(real, fake, bootstrap=0)
    assert streamed.value == pytest.approx(direct.value, rel=1e-9)
    assert (streamed.n_real, streamed.n_fake, streamed.ci_low) == (70, 40, None)


def test_statistics_reject_bad_input():
    with pytest.raises(ValueError, match="at least 2 samples"):
        feature_statistics(np.zeros((1, 4)))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        feature_statistics(np.zeros(4))
    stats = FeatureStats(4)
    with pytest.raises(ValueError, match="D=3"):
        stats.update(np.zeros((2, 3)))
    stats.update(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        stats.mean_and_covariance()
    with pytest.raises(ValueError, match="merge"):
        stats.merge(FeatureStats(3))
    with pytest.raises(ValueError, match="non-finite"):
        stats.update(np.full((2, 4), np.inf))


# ------------------------------------------------------------------ fvd() and the bootstrap


def test_fvd_is_invariant_to_sample_order():
    real, fake = _features(11, 64, 6), _features(12, 48, 6, shift=0.4)
    permutation = np.random.default_rng(13).permutation(64)
    base = fvd(real, fake, bootstrap=0)
    assert fvd(real[permutation], fake, bootstrap=0).value == pytest.approx(base.value, rel=1e-10)
    assert fvd(real, fake[::-1], bootstrap=0).value == pytest.approx(base.value, rel=1e-10)
    assert (base.n_real, base.n_fake, base.ci_low, base.ci_high) == (64, 48, None, None)


@pytest.mark.parametrize("n_real, n_fake, dim", [(12, 9, 40), (30, 25, 8), (7, 60, 20)])
def test_distance_of_samples_equals_the_covariance_route(n_real, n_fake, dim):
    # The small-N (Gram) route below N = D, the covariance route above it, one mixed case.
    real, fake = _features(21, n_real, dim), _features(22, n_fake, dim, shift=0.3, scale=1.4)
    expected = frechet_distance(*feature_statistics(real), *feature_statistics(fake))
    # rel 1e-8: below N = D the covariance route takes square roots of round-off eigenvalues
    # (~1e-15 -> ~3e-8 each), the Gram route never forms them.
    assert frechet_distance_of_samples(real, fake) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance_of_samples(real, real) == pytest.approx(0.0, abs=1e-8)


def test_bootstrap_interval_contains_value_and_is_seeded():
    real, fake = _features(14, 60, 4), _features(15, 50, 4, shift=0.5, scale=1.3)
    result = fvd(real, fake, bootstrap=64, seed=3)
    assert result.ci_low <= result.value <= result.ci_high
    assert result.ci_high - result.ci_low > 0
    assert result.value == pytest.approx(fvd(real, fake, bootstrap=0).value, rel=1e-12)
    again = fvd(real, fake, bootstrap=64, seed=3)
    assert (again.ci_low, again.ci_high) == (result.ci_low, result.ci_high)
    other = fvd(real, fake, bootstrap=64, seed=4)
    assert (other.ci_low, other.ci_high) != (result.ci_low, result.ci_high)
    assert result.to_dict()["n_bootstrap"] == 64
    calls = []
    reported = fvd(real, fake, bootstrap=64, seed=3, on_resample=lambda: calls.append(1))
    assert len(calls) == 64 and (reported.ci_low, reported.ci_high) == (result.ci_low, result.ci_high)


def test_fvd_rejects_bad_input():
    good = _features(16, 10, 4)
    with pytest.raises(ValueError, match="dimension mismatch"):
        fvd(good, _features(17, 10, 5), bootstrap=0)
    with pytest.raises(ValueError, match="at least 2 fake"):
        fvd(good, good[:1], bootstrap=0)
    with pytest.raises(ValueError, match="bootstrap"):
        fvd(good, good, bootstrap=-1)


# ------------------------------------------------------------------ preprocessing / embedding


def _tf1_resize_pixel(image: np.ndarray, out_h: int, out_w: int, y: int, x: int) -> np.ndarray:
    """Independent per-pixel TF1 resize_bilinear (align_corners=False, half_pixel_centers=False):
    source coordinate = out * in / out_size; interpolate the two rows, then between them."""
    in_h, in_w = image.shape[:2]
    sy, sx = y * in_h / out_h, x * in_w / out_w
    y0, x0 = math.floor(sy), math.floor(sx)
    y1, x1 = min(math.ceil(sy), in_h - 1), min(math.ceil(sx), in_w - 1)
    ly, lx = sy - y0, sx - x0
    top = image[y0, x0] + (image[y0, x1] - image[y0, x0]) * lx
    bottom = image[y1, x0] + (image[y1, x1] - image[y1, x0]) * lx
    return top + (bottom - top) * ly


def test_tf_resize_hand_computed():
    a, b = 10.0, 30.0
    row = torch.tensor([[[a], [b]]])  # [H=1, W=2, C=1]
    # Upsampling 2 -> 4 samples sources 0, 0.5, 1, 1.5 (clamped): [a, (a+b)/2, b, b].
    # Half-pixel centres (PyTorch align_corners=False) would give [a, 15, 25, b].
    up = tf_resize_bilinear(row.expand(4, 2, 1).contiguous(), size=4)
    torch.testing.assert_close(up[0, :, 0], torch.tensor([a, 20.0, b, b]))
    # Downsampling 4 -> 2 picks pixels 0 and 2 (no antialiasing).
    image = torch.arange(16.0).reshape(4, 4, 1)
    down = tf_resize_bilinear(image, size=2)
    torch.testing.assert_close(down[..., 0], torch.tensor([[0.0, 2.0], [8.0, 10.0]]))
    # A constant frame stays exactly constant (TF's a + (b - a) w form).
    assert torch.all(tf_resize_bilinear(torch.full((1, 7, 5, 3), 255.0)) == 255.0)


def test_preprocess_matches_per_pixel_tf1_resize():
    rng = np.random.default_rng(18)
    video = rng.integers(0, 256, (1, 16, 9, 13, 3), dtype=np.uint8)
    out = preprocess_videos(torch.from_numpy(video)).numpy()  # [1, 3, 16, 224, 224]
    assert out.shape == (1, 3, 16, 224, 224) and out.dtype == np.float32
    for t, y, x in [(0, 0, 0), (3, 17, 200), (15, 223, 223), (7, 111, 5)]:
        pixel = _tf1_resize_pixel(video[0, t].astype(np.float64), 224, 224, y, x)
        np.testing.assert_allclose(out[0, :, t, y, x], 2 * pixel / 255 - 1, atol=2e-6)


class _RecordingModel(torch.nn.Module):
    """Toy extractor: per-channel, per-frame means -> [B, 3 * T]; records its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.clone())
        return x.mean(dim=(3, 4)).flatten(1)


def test_video_features_protocol_layout_and_range():
    videos = np.zeros((3, 20, 8, 8, 3), dtype=np.uint8)
    videos[0] = 255
    videos[1, ..., 1] = 255  # pure green
    videos[2] = (np.arange(20, dtype=np.uint8) * 10)[:, None, None, None]  # frame t has value 10 t
    model = _RecordingModel()
    features = video_features(videos, model=model, batch_size=2)
    assert features.shape == (3, 3 * 16) and features.dtype == torch.float32
    x = torch.cat(model.inputs)
    assert x.shape == (3, 3, 16, 224, 224)
    assert torch.all(x[0] == 1.0)
    assert torch.all(x[1, 1] == 1.0) and torch.all(x[1, 0] == -1.0) and torch.all(x[1, 2] == -1.0)
    expected_frames = 2 * (torch.arange(16) * 10.0) / 255 - 1  # only the first 16 frames
    torch.testing.assert_close(x[2, 0, :, 5, 5], expected_frames, rtol=0, atol=1e-6)


def test_video_features_do_not_depend_on_batch_size():
    videos = np.random.default_rng(19).integers(0, 256, (3, 16, 6, 6, 3), dtype=np.uint8)
    one = video_features(videos, model=_RecordingModel(), batch_size=1)
    three = video_features(torch.from_numpy(videos), model=_RecordingModel(), batch_size=3)
    torch.testing.assert_close(one, three, rtol=0, atol=1e-6)


def test_video_features_reject_bad_input():
    model = _RecordingModel()
    with pytest.raises(ValueError, match="uint8"):
        video_features(np.zeros((1, 16, 8, 8, 3), np.float32), model=model)
    with pytest.raises(ValueError, match=r"\[N, T, H, W, 3\]"):
        video_features(np.zeros((1, 3, 16, 8, 8), np.uint8), model=model)
    with pytest.raises(ValueError, match="T=12"):
        video_features(np.zeros((1, 12, 8, 8, 3), np.uint8), model=model)
    with pytest.raises(ValueError, match="minimum of 9"):
        video_features(np.zeros((1, 16, 8, 8, 3), np.uint8), model=model, num_frames=8)
    # Shorter clips are allowed down to the I3D minimum when asked for explicitly.
    short = video_features(np.zeros((1, 9, 8, 8, 3), np.uint8), model=model, num_frames=9)
    assert short.shape == (1, 27)
