"""FSDP2 helpers for the distillation modules (used from ``configure_model`` under
``ModelParallelStrategy``; shared/reference/lightning-and-style.md A0-A7).

The recipe for every network: build on the meta device -> optional activation checkpointing per
block -> ``fully_shard`` per block, then the root -> ``to_empty`` on the root device -> read this
rank's slices straight from the safetensors (``torch.distributed.checkpoint`` with
``HuggingFaceStorageReader``): no rank ever holds a whole 14B expert. Without a device mesh (one
process) the same networks are plain modules and these helpers are not used.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor

from teacher.weight_files import CheckpointError, weight_files_in

# Methods of CausalWanModel that run the whole network without going through ``forward``: FSDP2
# only all-gathers the root's own parameters (embeddings, head) in a pre-forward hook, so these
# must be registered as forward methods too.
FORWARD_METHODS = ("forward_teacher_forcing",)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Whole modules the official precision policy keeps in fp32 in a bf16 model (teacher.dit's
# fp32 islands, plus the student's guidance embedding, which feeds the time embedding). Sharded
# as their own units without a parameter cast, they stay fp32 under a bf16 policy. The blocks'
# modulation tables cannot: they live in the block units, and a unit has one compute dtype.
FP32_ISLAND_MODULES = ("time_embedding", "time_projection", "guidance_embedding", "head")


def dtype_of(name: str) -> torch.dtype:
    """'fp32' | 'bf16' -> torch dtype (a clear error for anything else)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} must be one of {list(DTYPES)}") from None


def mixed_precision(compute_dtype: str) -> MixedPrecisionPolicy | None:
    """FSDP2 policy of a trainable network: bf16 all-gathered params and compute, fp32 gradient
    reduction (fp32 masters and AdamW state stay fp32); None for fp32 (the CPU default).

    Lightning's bf16-true would cast the whole module to bf16 and leave no fp32 master
    (reference A6), which is why precision is set here and the Trainer runs 32-true.

    Forward inputs are NOT cast (``cast_forward_inputs=False``). FSDP2's default casts every
    floating-point input of every sharded module to bf16: the residual stream at each block,
    the fp32 time modulation, the float64 RoPE tables and the guidance scale before its
    sinusoid. A tiny student's bf16 forward was then 33% (max abs / max) away from its fp32
    forward; with fp32 inputs and the fp32 islands of ``shard_network`` it is 0.22%, bit for bit
    the official bf16 precision (tests/test_mixed_precision.py). Without the cast each
    ``WeightDtypeLinear``/``Conv3d`` casts its own input to the bf16 weight, as the official
    autocast does, and the rest stays in the precision the model computes it in.
    """
    if compute_dtype == "fp32":
        return None
    return MixedPrecisionPolicy(param_dtype=dtype_of(compute_dtype), reduce_dtype=torch.float32,
                                cast_forward_inputs=False)


def shard_network(network: nn.Module, mesh: DeviceMesh, *,
                  mp_policy: MixedPrecisionPolicy | None = None,
                  activation_checkpointing: bool = False,
                  reshard_after_forward: bool = True, trainable: bool = True) -> nn.Module:
    """Wrap ``network.blocks[i]`` (optionally in ``checkpoint_wrapper``) and ``fully_shard`` each
    block, then the root; register ``FORWARD_METHODS``. Returns ``network`` (now an FSDPModule).
    Under a bf16 ``mp_policy`` the ``FP32_ISLAND_MODULES`` are units of their own computing in
    fp32.

    checkpoint_wrapper keeps the state-dict keys (its hooks strip the wrapper prefix), so the
    official key names still address the weights in checkpoints and exports. In a trainable
    network the last block keeps its gathered weights after forward (backward needs them first);
    a frozen network (teacher, EMA) has no backward to reshard it, so every block reshards
    after forward, and ``reshard_all`` puts the root back in shards after its forward.
    """
    kwargs = {"mesh": mesh}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
        if mp_policy.param_dtype not in (None, torch.float32):
            islands = MixedPrecisionPolicy(reduce_dtype=mp_policy.reduce_dtype,
                                           cast_forward_inputs=False)
            for name in FP32_ISLAND_MODULES:
                module = getattr(network, name, None)
                if isinstance(module, nn.Module):
                    fully_shard(module, mesh=mesh, mp_policy=islands,
                                reshard_after_forward=reshard_after_forward)
    blocks = network.blocks
    for i in range(len(blocks)):
        block = blocks[i]
        if activation_checkpointing:
            block = checkpoint_wrapper(block)
            blocks[i] = block
        keep = trainable and i == len(blocks) - 1
        fully_shard(block, reshard_after_forward=reshard_after_forward and not keep, **kwargs)
    fully_shard(network, reshard_after_forward=reshard_after_forward, **kwargs)
    for name in FORWARD_METHODS:
        if hasattr(network, name):
            register_fsdp_forward_method(network, name)
    return network


def reshard_all(network: nn.Module) -> None:
    """Free the gathered weights of every FSDP unit of a frozen network after its forward.

    FSDP2 keeps the ROOT's parameters gathered after forward (a heuristic for training, where
    backward needs them at once); for a no-grad network nothing ever reshards them, and its
    ``parameters()`` would then be full tensors rather than this rank's shards.
    """
    for module in network.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def load_sharded_weights(network: nn.Module, folder: str | Path,
                         skip_prefixes: tuple[str, ...] = ()) -> None:
    """Fill a sharded, ``to_empty``-ed network from the safetensors of ``folder``; each rank reads
    only its slices. Keys starting with ``skip_prefixes`` are not read (e.g. the student's new
    guidance embedding, initialised separately). Casts to each parameter's dtype.
    """
    folder = Path(folder)
    weight_files_in(folder)  # a clear error for a missing or incomplete folder
    state = {k: v for k, v in network.state_dict().items() if not k.startswith(skip_prefixes)}
    try:
        dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(folder)))
    except Exception as err:  # DCP wraps per-rank failures in its own exception types
        raise CheckpointError(f"cannot load {folder} into {type(network).__name__}: {err}") from err


def full_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on the CPU, gathered from the shards (a collective: call on every
    rank; every rank gets it, use it on rank 0)."""
    return get_model_state_dict(network, options=StateDictOptions(full_state_dict=True,
                                                                  cpu_offload=True))


def local_tensors(network: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's shards of the parameters (plain tensors), by official name (activation
    checkpointing wrappers stripped, so two networks can be paired by key)."""
    return {_strip_wrapper(name): p.to_local() if isinstance(p, DTensor) else p
            for name, p in network.named_parameters()}


def paired_local_tensors(a: nn.Module, b: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Local shards of two identically built networks, paired by parameter name.

    Pairing by name (not by position) means a wrapper or a registration-order difference can
    never pair, say, a q weight of one network with a k weight (same shape) of the other.
    """
    la, lb = local_tensors(a), local_tensors(b)
    if la.keys() != lb.keys():
        raise ValueError(f"networks differ in parameters: {sorted(la.keys() ^ lb.keys())[:5]}")
    return [la[k] for k in la], [lb[k] for k in la]


def _strip_wrapper(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")


