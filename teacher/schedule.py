"""The teacher's flow-matching noise schedule: sigma grids, integer timesteps, expert choice.

Conventions (shared/reference/wan22-a14b.md, section 3):

- forward process ``x_sigma = (1 - sigma) * x0 + sigma * eps`` with sigma in [0, 1];
- the network predicts the velocity ``v = eps - x0``;
- the network sees the integer timestep ``t = int64(trunc(sigma * num_train_timesteps))``, while
  the solvers integrate in the float sigma;
- ``t >= boundary * num_train_timesteps`` runs expert_high, every other t runs expert_low.

Every grid here is a float64 tensor of ``steps + 1`` decreasing sigmas whose last entry is 0.
The arithmetic repeats the official numpy code operation by operation, because the integer
timesteps are truncated: a value one ulp below an integer would change the timestep the model
sees, and with it possibly the expert.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Expert = Literal["high", "low"]


def shift_sigmas(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """The resolution shift ``s * sigma / (1 + (s - 1) * sigma)``; it keeps 0 at 0 and 1 at 1.

    A shift s > 1 moves every intermediate sigma towards 1, i.e. spends more steps at high noise.

    Args:
        sigma: float or tensor of any shape (any float dtype), values in [0, 1].
        shift: s > 0 (the A14B default is 12).
    Returns:
        the shifted sigma, same type / shape / dtype as ``sigma``.
    """
    _check_shift(shift)
    # Operation order equals the official code: (s * sigma) / (1 + (s - 1) * sigma).
    return shift * sigma / (1 + (shift - 1) * sigma)


def unshift_sigmas(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """The inverse of ``shift_sigmas``: u with ``s * u / (1 + (s - 1) * u) = sigma``.

    Training draws u uniformly and shifts it, so the inverse maps a noise range (an expert's, a
    boundary) back to the u range to draw from. Same type / shape / dtype as ``sigma``.
    """
    _check_shift(shift)
    return sigma / (shift - (shift - 1) * sigma)


def unipc_sigmas(steps: int, shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The official UniPC grid of Wan2.2 (FlowUniPCMultistepScheduler.set_timesteps).

    ``shift(linspace(sigma_max, 0, steps + 1)[:-1])`` followed by a final 0, where sigma_max is
    the largest training sigma. The training sigmas are ``1 - linspace(1, 1/N, N)[::-1]``; the
    official scheduler stores them in float32 and reads sigma_max back with ``.item()``, so
    sigma_max is float32(0.999) = 0.9990000128746..., not the float64 0.999. We keep that
    rounding: it changes no timestep at shift 12 but it does at other settings (e.g. 3 steps at
    shift 1 give t = 666 officially, 665 from a float64 0.999).

    At 40 steps and shift 12 the first sigma is 0.99992 and the last non-zero one 0.23511.

    Args:
        steps: number of solver steps (= model evaluations), >= 1.
        shift: resolution shift s > 0.
        num_train_timesteps: N, the training timestep count (1000 for Wan).
    Returns:
        float64 tensor [steps + 1], strictly decreasing, last entry 0.
    """
    _check_steps(steps)
    _check_shift(shift)
    _check_num_train_timesteps(num_train_timesteps)
    sigma_max = float(torch.tensor(1.0 - 1.0 / num_train_timesteps, dtype=torch.float32))
    sigmas = _numpy_style_linspace(sigma_max, 0.0, steps + 1)[:-1]
    return _append_zero(shift_sigmas(sigmas, shift))


def euler_sigmas(steps: int, shift: float) -> torch.Tensor:
    """The grid that starts at pure noise: ``shift(linspace(1, 0, steps + 1))``.

    This is the official DPM++ grid (Wan2.2 ``get_sampling_sigmas``) and the usual Euler /
    rectified-flow grid: the first sigma is exactly 1.0 (model timestep 1000), the last is 0.

    Args:
        steps: number of solver steps, >= 1.
        shift: resolution shift s > 0.
    Returns:
        float64 tensor [steps + 1], strictly decreasing from 1.0 to 0.0.
    """
    _check_steps(steps)
    _check_shift(shift)
    sigmas = _numpy_style_linspace(1.0, 0.0, steps + 1)[:-1]
    return _append_zero(shift_sigmas(sigmas, shift))


def sigmas_to_timesteps(sigmas: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Integer model timesteps ``int64(trunc(sigma * N))`` for the sigmas the model is run at.

    Pass ``sigmas[:-1]``: the final sigma of a grid is where the solver ends, never a model input.
    Truncation, not rounding, is what the official schedulers do (``.to(torch.int64)`` of the
    float64 product).

    Args:
        sigmas: 1-D float tensor, values in [0, 1].
        num_train_timesteps: N.
    Returns:
        int64 tensor with the shape and device of ``sigmas``.
    """
    _check_num_train_timesteps(num_train_timesteps)
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or not sigmas.is_floating_point():
        raise ValueError(
            f"sigmas_to_timesteps needs a 1-D float tensor of sigmas, got "
            f"{type(sigmas).__name__} {getattr(sigmas, 'shape', '')}; pass e.g. unipc_sigmas(...)[:-1]"
        )
    if sigmas.numel() and (sigmas.min() < 0 or sigmas.max() > 1):
        raise ValueError(
            f"sigmas must lie in [0, 1], got range [{float(sigmas.min())}, {float(sigmas.max())}]; "
            "flow-matching sigmas are noise fractions"
        )
    # float64 product as in the official code; int64 conversion truncates towards zero.
    return (sigmas.to(torch.float64) * num_train_timesteps).to(torch.int64)


def expert_for_timestep(
    t: int | torch.Tensor, boundary: float = 0.875, num_train_timesteps: int = 1000
) -> Expert:
    """Which expert runs at integer timestep ``t``: "high" if t >= boundary * N, else "low".

    With the A14B defaults the switch is at t = 875: 875 -> "high", 874 -> "low".

    Args:
        t: a Python int or a 0-d / one-element integer tensor (a float is rejected: passing a
            sigma in [0, 1] by mistake would silently always pick "low").
        boundary: the switch point as a fraction of N, in [0, 1].
        num_train_timesteps: N.
    """
    _check_boundary(boundary)
    _check_num_train_timesteps(num_train_timesteps)
    if isinstance(t, torch.Tensor):
        if t.numel() != 1 or t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(
                f"expert_for_timestep needs one integer timestep, got a {t.dtype} tensor of shape "
                f"{tuple(t.shape)}; use expert_high_mask for a batch of timesteps"
            )
        t = int(t.item())
    elif isinstance(t, bool) or not isinstance(t, int):
        raise TypeError(
            f"timestep t must be an integer in [0, {num_train_timesteps}], got {t!r}; "
            "convert sigmas with sigmas_to_timesteps"
        )
    return "high" if t >= boundary * num_train_timesteps else "low"


def expert_high_mask(
    t: torch.Tensor, boundary: float = 0.875, num_train_timesteps: int = 1000
) -> torch.Tensor:
    """Vectorised expert choice: True where expert_high runs.

    Args:
        t: integer tensor of any shape (e.g. [B] or per-chunk timesteps [B, n_chunks]).
    Returns:
        bool tensor with the shape and device of ``t``.
    """
    _check_boundary(boundary)
    _check_num_train_timesteps(num_train_timesteps)
    if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(
            f"expert_high_mask needs an integer tensor of timesteps, got "
            f"{getattr(t, 'dtype', type(t).__name__)}; convert sigmas with sigmas_to_timesteps"
        )
    return t >= boundary * num_train_timesteps


# ----------------------------------------------------------------------------------------------


def _numpy_style_linspace(start: float, stop: float, num: int) -> torch.Tensor:
    """float64 ``numpy.linspace(start, stop, num)``, reproduced bit for bit.

    numpy computes ``start + i * step`` with ``step = (stop - start) / (num - 1)`` and sets the
    last element to ``stop``; torch.linspace fills from both ends and can differ in the last
    bit, which truncation to integer timesteps would expose.
    """
    if num == 1:
        return torch.tensor([start], dtype=torch.float64)
    step = (stop - start) / (num - 1)
    values = torch.arange(num, dtype=torch.float64) * step + start
    values[-1] = stop
    return values


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r} (the A14B default is 40)")


def _check_shift(shift: float) -> None:
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) \
            or shift <= 0:
        raise ValueError(f"shift must be a finite number > 0, got {shift!r} (the A14B default is 12.0)")


def _check_boundary(boundary: float) -> None:
    if not isinstance(boundary, (int, float)) or not 0.0 <= boundary <= 1.0:
        raise ValueError(f"boundary must be in [0, 1], got {boundary!r} (the A14B default is 0.875)")


def _check_num_train_timesteps(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_train_timesteps must be an integer >= 1, got {n!r} (Wan uses 1000)")
