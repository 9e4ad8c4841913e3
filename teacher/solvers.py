"""Flow-matching ODE samplers as pure functions of (denoiser, noise, sigmas).

A denoiser is any callable ``denoiser(x, sigma, t) -> v``: ``x`` the current latent (any shape,
float32 or float64), ``sigma`` the Python float noise level, ``t`` the Python int model timestep
``trunc(sigma * 1000)``; it returns the velocity ``v = eps - x0`` with the shape of ``x``. The
teacher's two-expert CFG denoiser comes from ``teacher.moe.make_teacher_denoiser``; tests pass
toy lambdas.

Sigmas are a decreasing grid such as ``teacher.schedule.unipc_sigmas``; the sampler runs the
denoiser at ``sigmas[:-1]`` (one evaluation per step) and returns the latent at ``sigmas[-1]``,
which is x0 when the grid ends at 0. Sigmas are read once into Python floats: no device sync per
step, and every step coefficient is computed in float64 before it touches the fp32 latent.

``callback(step_index, t, sigma, x)``, when given, runs after every step with the index i, the
timestep and sigma the model saw at that step, and the latent after the step (at sigmas[i + 1]).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from teacher.schedule import euler_sigmas, sigmas_to_timesteps, unipc_sigmas

Denoiser = Callable[[torch.Tensor, float, int], torch.Tensor]
StepCallback = Callable[[int, int, float, torch.Tensor], None]

SOLVER_NAMES = ("unipc", "euler")


def euler_sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    callback: StepCallback | None = None,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """First-order Euler integration of the flow ODE: ``x_{s'} = x_s + (s' - s) * v(x_s, s)``.

    Args:
        denoiser: ``(x, sigma, t) -> v``.
        noise: the latent at sigmas[0] (pure noise when sigmas[0] == 1), any shape; computed in
            float32 (or float64 if given float64).
        sigmas: decreasing grid [steps + 1], values in [0, 1].
        callback: optional ``(step_index, t, sigma, x)``.
    Returns:
        the latent at sigmas[-1], shape of ``noise``, float32 (float64 for float64 noise).
    """
    sigma_list, t_list = _prepare_grid(sigmas, num_train_timesteps, "euler_sample")
    x = _working_copy(noise)
    for i, (sigma, t) in enumerate(zip(sigma_list[:-1], t_list)):
        v = _velocity(denoiser, x, sigma, t)
        x = x + (sigma_list[i + 1] - sigma) * v
        if callback is not None:
            callback(i, t, sigma, x)
    return x


def unipc_sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    order: int = 2,
    callback: StepCallback | None = None,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """UniPC multistep sampling (Zhao et al. 2023), with the official Wan2.2 settings.

    Data prediction (the solver works with ``x0 = x - sigma * v``), B(h) = e^h - 1 ("bh2"), a
    UniP predictor every step and a UniC corrector at every step after the first, reusing the
    model evaluation the next step needs anyway (so NFE = steps). The order warms up (1, 2, ...)
    and drops on the last steps ("lower_order_final"); with a final sigma of 0 the last step is
    first order and returns the last x0 prediction. This equals FlowUniPCMultistepScheduler
    with order 2, bh2, predict_x0=True, lower_order_final=True, final_sigmas_type="zero".

    In flow matching alpha = 1 - sigma, and the solver's time variable is the half log-SNR
    ``lambda = log(alpha / sigma)``, which increases as sampling proceeds.

    Args:
        denoiser: ``(x, sigma, t) -> v``.
        noise: the latent at sigmas[0], any shape; computed in float32 (float64 if given).
        sigmas: decreasing grid [steps + 1]; sigmas[0] < 1 (lambda is -inf at sigma = 1, which
            is why the official grid starts at 0.99992), sigmas[:-1] > 0, sigmas[-1] >= 0.
        order: the predictor order p (the corrector raises it by one); 1, 2 or 3. Official: 2.
        callback: optional ``(step_index, t, sigma, x)``; x is the predictor's output, before the
            correction the next step applies to it.
    Returns:
        the latent at sigmas[-1], shape of ``noise``.
    """
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"unipc_sample order must be 1, 2 or 3, got {order!r} (official: 2)")
    sigma_list, t_list = _prepare_grid(sigmas, num_train_timesteps, "unipc_sample")
    if sigma_list[0] >= 1.0:
        raise ValueError(
            f"unipc_sample needs sigmas[0] < 1, got {sigma_list[0]}: lambda = log((1-sigma)/sigma) "
            "is -inf at sigma = 1. Use teacher.schedule.unipc_sigmas, or the euler solver"
        )
    steps = len(t_list)
    x = _working_copy(noise)

    # Explicit multistep state: x0 predictions and lambdas of the last `order` evaluations (newest
    # last), the latent the last predictor started from, and the order that predictor used.
    history_x0: list[torch.Tensor] = []
    history_lambda: list[float] = []
    last_x: torch.Tensor | None = None
    last_order = 0

    for i in range(steps):
        sigma, t = sigma_list[i], t_list[i]
        x0 = x - sigma * _velocity(denoiser, x, sigma, t)
        lam = _half_log_snr(sigma)

        if i > 0:
            # UniC: redo the last step from last_x with the new x0 as an extra node. The model
            # output above stays the one evaluated at the uncorrected x (that is UniPC: the
            # corrector costs no extra evaluation).
            x = _unipc_update(
                last_x, sigma_list[i - 1], sigma,
                history_x0[-last_order:], history_lambda[-last_order:], corrector_x0=x0,
            )

        history_x0 = (history_x0 + [x0])[-order:]
        history_lambda = (history_lambda + [lam])[-order:]
        # Warm-up (no more nodes than evaluations so far) and lower_order_final (no more than the
        # steps left): with a final sigma of 0, lambda there is +inf and only order 1 is defined.
        step_order = min(order, steps - i, i + 1)
        last_x = x
        x = _unipc_update(
            x, sigma, sigma_list[i + 1],
            history_x0[-step_order:], history_lambda[-step_order:], corrector_x0=None,
        )
        last_order = step_order
        if callback is not None:
            callback(i, t, sigma, x)
    return x


def sample(
    solver_name: str,
    denoiser: Denoiser,
    noise: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    callback: StepCallback | None = None,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """Run the sampler called ``solver_name`` ("unipc" with the official order 2, or "euler")."""
    if solver_name == "unipc":
        return unipc_sample(denoiser, noise, sigmas, callback=callback,
                            num_train_timesteps=num_train_timesteps)
    if solver_name == "euler":
        return euler_sample(denoiser, noise, sigmas, callback=callback,
                            num_train_timesteps=num_train_timesteps)
    raise ValueError(f"unknown solver {solver_name!r}; choose one of {list(SOLVER_NAMES)}")


def solver_sigmas(solver_name: str, steps: int, shift: float,
                  num_train_timesteps: int = 1000) -> torch.Tensor:
    """The grid each solver is meant for: the official UniPC grid, or the grid from 1.0 for Euler."""
    if solver_name == "unipc":
        return unipc_sigmas(steps, shift, num_train_timesteps)
    if solver_name == "euler":
        return euler_sigmas(steps, shift)
    raise ValueError(f"unknown solver {solver_name!r}; choose one of {list(SOLVER_NAMES)}")


# ----------------------------------------------------------------------------------------------


def _unipc_update(
    x_s: torch.Tensor,
    sigma_s: float,
    sigma_t: float,
    nodes_x0: list[torch.Tensor],
    nodes_lambda: list[float],
    corrector_x0: torch.Tensor | None,
) -> torch.Tensor:
    """One UniP (``corrector_x0`` None) or UniC step from sigma_s to sigma_t, data prediction.

    ``nodes_x0[-1]`` is the x0 prediction at sigma_s (lambda_s = nodes_lambda[-1]); earlier
    entries are older evaluations. With h = lambda_t - lambda_s and hh = -h, the update is

        x_t = (sigma_t / sigma_s) x_s - alpha_t (e^hh - 1) x0_s
              - alpha_t B(h) sum_k rho_k (x0_k - x0_s) / r_k,      r_k = (lambda_k - lambda_s) / h,

    with B(h) = e^hh - 1 (bh2). The nodes k are the older evaluations and, for UniC, the new one
    at t itself (r = 1). The rho solve the order conditions sum_k rho_k r_k^(j-1) = b_j with
    b_j = hh phi_(j+1)(hh) j! / B(h) (phi the exponential-integrator functions). When a single
    rho is needed (UniP-2, UniC-1) it is fixed to 1/2, the h -> 0 limit of b_1, as in the UniPC
    reference code; the order of accuracy is unchanged and this keeps us on the official numbers.
    """
    x0_s, lambda_s = nodes_x0[-1], nodes_lambda[-1]
    if sigma_t == 0.0:
        # lambda_t = +inf: the update's limit is x0_s exactly. Only reachable at first order
        # (the final step), where no difference terms exist.
        assert len(nodes_x0) == 1 and corrector_x0 is None, "sigma 0 is only valid as the last sigma"
        return x0_s.clone()

    alpha_t = 1.0 - sigma_t
    h = _half_log_snr(sigma_t) - lambda_s
    hh = -h  # data prediction integrates in -lambda
    b_h = math.expm1(hh)  # bh2; e^hh - 1 is also h * phi_1(hh), the first-order coefficient

    ratios: list[float] = [(lam - lambda_s) / h for lam in nodes_lambda[:-1]]
    diffs: list[torch.Tensor] = [x0_k - x0_s for x0_k in nodes_x0[:-1]]
    if corrector_x0 is not None:
        ratios.append(1.0)
        diffs.append(corrector_x0 - x0_s)

    x_t = (sigma_t / sigma_s) * x_s - (alpha_t * b_h) * x0_s
    if ratios:
        rhos = _unipc_rhos(ratios, hh, b_h)
        for rho, r, d in zip(rhos, ratios, diffs):
            x_t = x_t - (alpha_t * b_h * rho / r) * d
    return x_t


def _unipc_rhos(ratios: list[float], hh: float, b_h: float) -> list[float]:
    """Solve the UniPC order conditions for the weights of the difference terms (float64).

    The b_j are built with the recursion g_1 = phi_1(hh) - 1, g_(j+1) = g_j / hh - 1/(j+1)!,
    where g_j = hh phi_(j+1)(hh). It subtracts nearly equal numbers when |hh| is small (many
    steps), so it must run in float64: in float32 the relative error of b_2 grows like
    eps / |hh|.
    """
    n = len(ratios)
    if n == 1:
        return [0.5]
    b: list[float] = []
    g = math.expm1(hh) / hh - 1.0
    factorial = 1.0
    for j in range(1, n + 1):
        b.append(g * factorial / b_h)
        factorial *= j + 1
        g = g / hh - 1.0 / factorial
    # Vandermonde system: row j holds r_k^j.
    vander = torch.tensor([[r ** j for r in ratios] for j in range(n)], dtype=torch.float64)
    rhos = torch.linalg.solve(vander, torch.tensor(b, dtype=torch.float64))
    return rhos.tolist()


def _half_log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma) with alpha = 1 - sigma; log1p keeps precision near sigma = 0."""
    return math.log1p(-sigma) - math.log(sigma)


def _velocity(denoiser: Denoiser, x: torch.Tensor, sigma: float, t: int) -> torch.Tensor:
    v = denoiser(x, sigma, t)
    if not isinstance(v, torch.Tensor) or v.shape != x.shape:
        raise ValueError(
            f"the denoiser must return a velocity tensor shaped like x {tuple(x.shape)}, got "
            f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__} at t={t}"
        )
    # The model may run in bf16; the ODE state stays in the latent's precision.
    return v.to(x.dtype)


def _working_copy(noise: torch.Tensor) -> torch.Tensor:
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise ValueError(f"noise must be a floating-point tensor, got {getattr(noise, 'dtype', type(noise))}")
    # fp32 latents as officially; float64 stays float64 (useful for exactness tests).
    return noise.to(torch.promote_types(noise.dtype, torch.float32))


def _prepare_grid(
    sigmas: torch.Tensor | Sequence[float], num_train_timesteps: int, who: str
) -> tuple[list[float], list[int]]:
    """Validate a grid and return it as Python floats plus the model timesteps as Python ints."""
    grid = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(
            f"{who} needs a 1-D grid of at least 2 sigmas (steps + 1), got shape {tuple(grid.shape)}; "
            "build one with teacher.schedule.unipc_sigmas or euler_sigmas"
        )
    if not torch.isfinite(grid).all() or grid.min() < 0 or grid.max() > 1:
        raise ValueError(f"{who}: sigmas must be finite and in [0, 1], got {grid.tolist()}")
    if not (grid[1:] < grid[:-1]).all():
        raise ValueError(f"{who}: sigmas must be strictly decreasing, got {grid.tolist()}")
    timesteps = sigmas_to_timesteps(grid[:-1], num_train_timesteps)
    return grid.tolist(), timesteps.tolist()
