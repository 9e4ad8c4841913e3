"""LPIPS and CLIP-score plumbing with tiny RANDOM networks: their values are not LPIPS or CLIP
scores and are never reported as such; these tests check wiring, protocol and errors."""

import json

import pytest
import torch

from eval.lpips_metric import find_trunk, load_trunk_weights, lpips_per_video
from eval.unavailable import MetricUnavailable

lpips = pytest.importorskip("lpips")
torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def random_lpips():
    torch.manual_seed(0)
    return lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()


def test_missing_trunk_is_unavailable_with_reason(tmp_path):
    with pytest.raises(MetricUnavailable, match="alexnet-owt-7be5be79.pth.*place it at"):
        find_trunk("alex", tmp_path / "alexnet-owt-7be5be79.pth")


def test_trunk_with_wrong_hash_is_refused(tmp_path):
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(torchvision.models.alexnet().state_dict(), path)
    with pytest.raises(MetricUnavailable, match="sha256 prefix .* expected 7be5be79"):
        find_trunk("alex", path)
    with pytest.raises(ValueError, match="unknown LPIPS net"):
        find_trunk("resnet", path)


def test_trunk_weights_map_onto_lpips_slices(random_lpips):
    torch.manual_seed(1)
    alexnet = torchvision.models.alexnet().eval()
    load_trunk_weights(random_lpips, alexnet.state_dict())
    x = torch.randn(1, 3, 64, 64)
    # lpips' slice5 ends after features[11] (the last ReLU): compare with torchvision's own stack.
    ours = random_lpips.net(x).relu5
    theirs = alexnet.features[:12](x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_paired_per_frame_protocol(random_lpips):
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (2, 3, 32, 32, 3), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (2, 3, 32, 32, 3), generator=g, dtype=torch.uint8)
    assert torch.allclose(lpips_per_video(random_lpips, a, a), torch.zeros(2), atol=1e-6)
    got = lpips_per_video(random_lpips, a, b, batch_frames=2)
    to_unit = lambda v: v.float().permute(0, 3, 1, 2) / 127.5 - 1
    expected = torch.stack([
        torch.stack([random_lpips(to_unit(a[i, j:j + 1]), to_unit(b[i, j:j + 1])).flatten()[0]
                     for j in range(3)]).mean() for i in range(2)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_bounds_and_shapes_are_checked(random_lpips):
    x = torch.zeros(1, 2, 16, 16, 3)
    ramp = torch.linspace(0, 255, x.numel()).view_as(x)  # a [0,255] float video: a common mistake
    with pytest.raises(ValueError, match="must lie in \\[-1, 1\\], found \\[0, 255\\]"):
        lpips_per_video(random_lpips, ramp, x)
    with pytest.raises(ValueError, match="must lie in \\[-1, 1\\], found \\[-3"):
        lpips_per_video(random_lpips, x, x - 3)
    with pytest.raises(ValueError, match="paired videos differ"):
        lpips_per_video(random_lpips, x, torch.zeros(1, 3, 16, 16, 3))
    with pytest.raises(ValueError, match="expected videos \\[N,T,H,W,3\\]"):
        lpips_per_video(random_lpips, x[0], x[0])


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=8)
    torch.manual_seed(0)
    transformers.CLIPModel(cfg).save_pretrained(d)
    ip = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformers.CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(d)
    return d


def test_clip_score_matches_direct_cosine(tiny_clip_dir):
    transformers = pytest.importorskip("transformers")
    from eval.clip_score import clip_score_per_video, load_clip_score

    metric = load_clip_score(tiny_clip_dir)
    g = torch.Generator().manual_seed(3)
    videos = torch.randint(0, 256, (3, 5, 32, 32, 3), generator=g, dtype=torch.uint8)
    prompts = ["a red circle", "a blue square", "green"]
    got = clip_score_per_video(metric, videos, prompts, frames_per_video=3)
    model = transformers.CLIPModel.from_pretrained(tiny_clip_dir).eval()
    proc = transformers.CLIPProcessor.from_pretrained(tiny_clip_dir)
    unwrap = lambda o: o if isinstance(o, torch.Tensor) else o.pooler_output
    expected = []
    for video, prompt in zip(videos, prompts):
        frames = [f.permute(2, 0, 1) for f in video[torch.tensor([0, 2, 4])]]
        with torch.no_grad():
            img = unwrap(model.get_image_features(proc(images=frames, return_tensors="pt")["pixel_values"]))
            txt_in = proc(text=[prompt], return_tensors="pt", padding=True)
            txt = unwrap(model.get_text_features(txt_in["input_ids"], txt_in["attention_mask"]))
        cos = torch.nn.functional.cosine_similarity(img, txt.expand_as(img), dim=-1)
        expected.append(max(float(100 * cos.mean()), 0.0))
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-4, atol=1e-3)


def test_clip_unavailable_reasons(tmp_path):
    from eval.clip_score import load_clip_score

    with pytest.raises(MetricUnavailable, match="needs a local CLIP folder"):
        load_clip_score(None)
    with pytest.raises(MetricUnavailable, match="not a CLIP model folder"):
        load_clip_score(tmp_path)
