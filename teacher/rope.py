"""3D rotary position embedding of the Wan DiT (reference wan22-a14b.md §1.3 "3D RoPE", §5 item 6).

Each attention head's ``head_dim`` channels are split into three axis groups, frames (t),
height (h) and width (w)::

    d_h = d_w = 2 * (head_dim // 6)        d_t = head_dim - d_h - d_w
    head_dim 128 -> 44 / 42 / 42 real channels = 22 / 21 / 21 rotation pairs

Every axis has its own frequency ladder built from its OWN group width (not from head_dim):
``inv_freq_j = theta ** (-2j / d_axis)`` for ``j < d_axis / 2``. A token at latent grid position
(f, h, w) (0-based, after patchify) rotates its pairs by the angles ``[f * inv_freq_t | h *
inv_freq_h | w * inv_freq_w]``. Pairs are INTERLEAVED: channels (2i, 2i+1) form pair i (the
complex / GPT-J convention, not the NeoX half split).

Numerics: angles, cos/sin and the rotation itself are float64, and the rotated q/k come back as
float32 whatever their input dtype; this is what the official code does (it multiplies complex128
numbers), and it keeps positions up to 1023 exact to well below bf16/fp32 resolution.
"""

from __future__ import annotations

import torch

# The official model precomputes its tables for positions 0..1023 on each axis.
ROPE_MAX_POSITIONS = 1024
ROPE_THETA = 10000.0


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Real channels per axis (t, h, w) for one head; e.g. 128 -> (44, 42, 42)."""
    if head_dim % 2 != 0 or head_dim < 6:
        raise ValueError(
            f"head_dim={head_dim} cannot carry 3D RoPE: it must be even and >= 6 so that the "
            f"height and width axes get at least one rotation pair each; choose dim / num_heads "
            f"accordingly"
        )
    d_hw = 2 * (head_dim // 6)
    return head_dim - 2 * d_hw, d_hw, d_hw


def rope_angle_table(
    axis_dim: int,
    max_positions: int = ROPE_MAX_POSITIONS,
    theta: float = ROPE_THETA,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Rotation angles of one axis, float64 ``[max_positions, axis_dim // 2]``.

    Row p holds ``p * theta ** (-2j / axis_dim)``; the exponent uses the axis's own width.
    """
    exponents = torch.arange(0, axis_dim, 2, dtype=torch.float64, device=device) / axis_dim
    inv_freq = 1.0 / torch.pow(torch.tensor(theta, dtype=torch.float64, device=device), exponents)
    positions = torch.arange(max_positions, dtype=torch.float64, device=device)
    return torch.outer(positions, inv_freq)


class WanRope3D:
    """Per-token cos/sin tables for a latent grid; a plain object, deliberately not an nn.Module.

    Not a module and not a buffer, so the tables are never in a state dict (the official
    checkpoint has none) and ``model.to(torch.bfloat16)`` cannot round them: they stay float64.
    Tables are built lazily, once per device.
    """

    def __init__(self, head_dim: int, max_positions: int = ROPE_MAX_POSITIONS,
                 theta: float = ROPE_THETA):
        self.head_dim = head_dim
        self.axis_dims = rope_axis_dims(head_dim)
        self.max_positions = max_positions
        self.theta = theta
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _axis_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if device not in self._tables:
            self._tables[device] = tuple(
                rope_angle_table(d, self.max_positions, self.theta, device) for d in self.axis_dims
            )
        return self._tables[device]

    def angles(
        self,
        grid: tuple[int, int, int],
        frame_start: int = 0,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Angles for every token of a ``(F, H, W)`` latent grid, float64 ``[F*H*W, head_dim/2]``.

        Tokens are ordered f, then h, then w (w fastest), as the patch embedding flattens them.
        ``frame_start`` shifts the frame positions (frames ``frame_start .. frame_start+F-1``):
        a causal student that processes a chunk of frames after earlier chunks passes the chunk's
        first frame index; the teacher always uses 0.
        """
        f, h, w = grid
        last_frame = frame_start + f
        if frame_start < 0 or max(last_frame, h, w) > self.max_positions:
            raise ValueError(
                f"RoPE positions out of range: frames {frame_start}..{last_frame - 1}, height {h}, "
                f"width {w} (latent grid after patchify); the table covers positions 0.."
                f"{self.max_positions - 1}. Use fewer frames or a smaller resolution"
            )
        table_t, table_h, table_w = self._axis_tables(torch.device(device))
        pairs_t, pairs_h, pairs_w = (d // 2 for d in self.axis_dims)
        return torch.cat(
            [
                table_t[frame_start:last_frame].view(f, 1, 1, pairs_t).expand(f, h, w, pairs_t),
                table_h[:h].view(1, h, 1, pairs_h).expand(f, h, w, pairs_h),
                table_w[:w].view(1, 1, w, pairs_w).expand(f, h, w, pairs_w),
            ],
            dim=-1,
        ).reshape(f * h * w, self.head_dim // 2)

    def cos_sin(
        self,
        grid: tuple[int, int, int],
        frame_start: int = 0,
        device: torch.device | str = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of ``angles(...)``, each float64 ``[F*H*W, head_dim/2]``."""
        angles = self.angles(grid, frame_start, device)
        return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of ``x`` ``[B, L, heads, head_dim]``; returns float32.

    ``cos``/``sin`` are float64 ``[L, head_dim/2]`` (or ``[B, L, head_dim/2]``). Pair i is
    ``(x[..., 2i], x[..., 2i+1])`` and becomes ``(x0 cos - x1 sin, x0 sin + x1 cos)``, i.e. the
    complex product ``(x0 + i x1) * exp(i angle)``. Computed in float64 (official precision),
    returned as float32 (the official output dtype, also for bf16 inputs).
    """
    if cos.dtype != torch.float64 or sin.dtype != torch.float64:
        # Tables rounded to a half dtype rotate every token by a wrong angle, silently.
        raise TypeError(f"apply_rope: cos/sin are {cos.dtype}/{sin.dtype}, not float64; build "
                        f"them with WanRope3D.cos_sin and keep them out of input casts (e.g. "
                        f"FSDP2's cast_forward_inputs, off in distill.sharding.mixed_precision)")
    if x.shape[-1] != 2 * cos.shape[-1] or x.shape[-3] != cos.shape[-2]:
        raise ValueError(
            f"apply_rope: x {list(x.shape)} [B, L, heads, head_dim] does not match cos/sin "
            f"{list(cos.shape)} [L, head_dim/2]; build the tables for this grid and head_dim"
        )
    # One complex product (the same arithmetic as the pair formula) instead of six real
    # products and a stack: a third of the float64 memory traffic, and at the shapes size a
    # third of the operations (RoPE runs twice per block, and a streaming pass is op-bound).
    pairs = torch.view_as_complex(x.to(torch.float64).contiguous().unflatten(-1, (-1, 2)))
    # Insert the heads axis so [.., L, D/2] broadcasts over [B, L, heads, D/2].
    rotation = torch.complex(cos, sin).unsqueeze(-2)
    return torch.view_as_real(pairs * rotation).flatten(-2).to(torch.float32)
