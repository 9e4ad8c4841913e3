"""Reading weight files into meta-built modules: layouts, dtypes, and the errors users see."""


import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from teacher.materialize import materialize
from teacher.weight_files import CheckpointError, weight_files_in
from tests.tiny_teacher import write_sharded


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.time_embedding = nn.Linear(4, 3)
        self.body = nn.Linear(3, 5)
        self.register_buffer("scale", torch.zeros(5))


def reference_state(seed=0):
    torch.manual_seed(seed)
    module = Toy()
    module.scale.normal_()
    return {k: v.clone() for k, v in module.state_dict().items()}



def meta_toy():
    with torch.device("meta"):
        return Toy()


def test_sharded_safetensors_fill_a_meta_module_exactly(tmp_path):
    state = reference_state()
    (tmp_path / "m").mkdir()
    write_sharded(tmp_path / "m", state)
    files = weight_files_in(tmp_path / "m")
    assert len(files) == 2
    module = materialize(meta_toy(), files)
    for k, v in module.state_dict().items():
        assert not v.is_meta
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


def test_pth_file_and_dtype_with_fp32_islands(tmp_path):
    state = reference_state()
    torch.save(state, tmp_path / "w.pth")
    module = materialize(meta_toy(), [tmp_path / "w.pth"], dtype=torch.bfloat16,
                         fp32_names=lambda k: k.startswith("time_embedding."))
    assert module.time_embedding.weight.dtype == torch.float32
    assert module.body.weight.dtype == torch.bfloat16
    assert module.scale.dtype == torch.bfloat16
    torch.testing.assert_close(module.body.weight.float(), state["body.weight"].bfloat16().float())
    assert isinstance(module.body.weight, nn.Parameter)


def test_key_map_renames_and_drops(tmp_path):
    state = reference_state()
    renamed = {"x." + k: v for k, v in state.items()}
    renamed["alias.tied"] = torch.ones(1)
    save_file(renamed, tmp_path / "one.safetensors")
    module = materialize(meta_toy(), weight_files_in(tmp_path),
                         key_map=lambda k: None if k == "alias.tied" else k[2:])
    torch.testing.assert_close(module.body.bias, state["body.bias"])


def test_missing_key_names_count_and_key(tmp_path):
    state = reference_state()
    del state["body.bias"]
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match=r"1 key\(s\).*'body.bias'.*incomplete"):
        materialize(meta_toy(), [tmp_path / "w.safetensors"])


def test_unexpected_key_names_file_and_key(tmp_path):
    state = reference_state()
    state["extra.weight"] = torch.ones(2)
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match=r"w\.safetensors: unexpected key 'extra.weight'"):
        materialize(meta_toy(), [tmp_path / "w.safetensors"])


def test_wrong_shape_names_expected_and_found(tmp_path):
    state = reference_state()
    state["body.weight"] = torch.zeros(5, 4)
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match=r"'body.weight' has shape \[5, 4\].*expects \[5, 3\]"):
        materialize(meta_toy(), [tmp_path / "w.safetensors"])


def test_missing_shard_and_bad_index(tmp_path):
    (tmp_path / "m").mkdir()
    write_sharded(tmp_path / "m", reference_state())
    next((tmp_path / "m").glob("*00002-of-00002.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="names shard\\(s\\) that are missing"):
        weight_files_in(tmp_path / "m")
    (tmp_path / "m" / "diffusion_pytorch_model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        weight_files_in(tmp_path / "m")


def test_damaged_file_and_missing_folder(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="damaged"):
        materialize(meta_toy(), [tmp_path / "bad.safetensors"])
    with pytest.raises(CheckpointError, match="does not exist"):
        weight_files_in(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no weights"):
        weight_files_in(tmp_path / "empty")


def test_pth_with_arbitrary_object_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"body.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="cannot read"):
        materialize(meta_toy(), [tmp_path / "evil.pth"])
