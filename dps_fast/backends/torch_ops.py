"""Pure-torch definitions of the fused DPS ops: the reference every kernel is tested against,
and the ops of the ``torch`` backend.

Shapes: the state ``x`` is ``[N, *S]`` with ``N = B * samples``; ``coefs`` is one row
``[Coef.COUNT]`` of :meth:`NoiseSchedule.table` on the state's device and dtype (a view, so no
host sync); per-sample quantities (``gscale``, ``rnorm2``, ``seeds``) are ``[N]``.

The clip mask of ``clip_x0 = (lo, hi)`` is ``lo < x0hat < hi`` on the clamped ``x0hat``: it equals
torch.clamp's own gradient mask except where the unclamped value hits a bound exactly, and it lets
every kernel derive the mask from ``x0hat`` without storing it.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..noise import STREAM_STEP, philox_normal
# The blur's spectral math is the operator's own (operators are the lower layer); re-exported here
# because every op set offers the same functions.
from ..operators.blur import blur_normal_residual, parseval_weights, spectral_residual  # noqa: F401
from ..schedule import VARIANCES, Coef

__all__ = [
    "tweedie", "clip_mask", "apply_clip_mask", "prep_elementwise", "spectral_residual",
    "parseval_weights", "blur_normal_residual", "dps_update", "step_sigma",
]

Clip = Optional[tuple[float, float]]


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


# ---- helpers of the kernel op sets (triton_ops, cuda_ops); not ops themselves ----------------
def sample_stride(t: torch.Tensor) -> Optional[int]:
    """The element stride between consecutive samples of ``t`` (``[N, *S]``) when every sample
    ``t[n]`` is contiguous, else None. A kernel can then read ``t`` in place, e.g. a channel half
    ``out[:, :C]`` of a learned-variance model output (stride ``2 C * H * W``) or a sample
    expanded over the batch (stride 0). With one sample (or none) the stride is ``prod(S)``.

    >>> out = torch.zeros(2, 6, 4, 4)
    >>> sample_stride(out[:, :3]), sample_stride(out[:, :, :2]), sample_stride(out[:1, :3])
    (96, None, 48)
    """
    expect = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and stride != expect:
            return None
        expect *= size
    return t.stride(0) if t.shape[0] > 1 else expect


def check_coefs_dtype(coefs: torch.Tensor) -> None:
    """Refuse a ``coefs`` row that is not float32 or float64 (TypeError): the kernels compute in
    float32 (float64 for float64 states), and a bfloat16 row would round ``sqrt(1/abar)`` (~157 at
    t = 999) by up to 0.2%, an error of ~0.4% in x0hat."""
    if coefs.dtype in (torch.float32, torch.float64):
        return
    name = str(coefs.dtype).replace("torch.", "")
    why = f": a {name} row rounds sqrt(1/abar) ~157 by up to 0.2%" if coefs.dtype.is_floating_point else ""
    raise TypeError(
        f"coefs: expected float32 or float64 (the kernels' arithmetic type{why}); pass "
        f"NoiseSchedule.table(torch.float32) rows for float32/bfloat16 states, got {name}")


def tweedie(x: torch.Tensor, eps: torch.Tensor, coefs: torch.Tensor, clip: Clip = None) -> torch.Tensor:
    """Tweedie's estimate ``x0hat = (x - sqrt(1-abar) eps) / sqrt(abar)``, clamped to ``clip``."""
    x0 = torch.addcmul(x * coefs[Coef.SQRT_RECIP_ABAR], eps, coefs[Coef.SQRT_RECIPM1_ABAR], value=-1.0)
    return x0.clamp_(clip[0], clip[1]) if clip is not None else x0


def clip_mask(x0hat: torch.Tensor, clip: Clip) -> torch.Tensor:
    """The gradient mask of the clamp, ``lo < x0hat < hi``, in ``x0hat``'s dtype."""
    return ((x0hat > clip[0]) & (x0hat < clip[1])).to(x0hat.dtype)


def apply_clip_mask(w: torch.Tensor, x0hat: torch.Tensor, clip: Clip) -> torch.Tensor:
    """``w * clip_mask(x0hat)`` (in place on ``w``); ``w`` unchanged without a clip."""
    return w.mul_(clip_mask(x0hat, clip)) if clip is not None else w


def prep_elementwise(
    x: torch.Tensor, eps: torch.Tensor, coefs: torch.Tensor, clip: Clip,
    y: torch.Tensor, mask: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tweedie + residual for an operator that is a pixel mask (``A = diag(m)``; identity: m = 1).

    Returns ``x0hat``, the masked cotangent ``w_c = clipmask * m * (m * x0hat - y)`` and the
    per-sample ``rnorm2[n] = ||m * x0hat - y||^2`` (float32 at least, ``[N]``). ``y`` has ``x``'s
    shape; ``mask`` broadcasts against one sample (``[*S]`` or ``[1, *S]``) or is None.
    """
    x0hat = tweedie(x, eps, coefs, clip)
    ax = x0hat * mask if mask is not None else x0hat
    r = ax - y
    w = r * mask if mask is not None else r.clone()
    rnorm2 = r.flatten(1).square().sum(1)
    return x0hat, apply_clip_mask(w, x0hat, clip), rnorm2


def step_sigma(coefs: torch.Tensor, variance: str, v: Optional[torch.Tensor]) -> torch.Tensor:
    """The DDPM noise standard deviation of one step (a 0-d tensor, or per element for learned range).

    ``learned_range``: ``log var = f log beta + (1 - f) log beta~`` with ``f = (v + 1) / 2``, as ADM.
    """
    if variance == "fixed_small":
        return coefs[Coef.SIGMA_SMALL]
    if variance == "fixed_large":
        return coefs[Coef.SIGMA_LARGE]
    if variance == "learned_range":
        if v is None:
            raise ValueError("v: learned_range variance needs the model's variance channels, got None")
        f = (v + 1.0) * 0.5
        log_var = f * coefs[Coef.LOG_BETA] + (1.0 - f) * coefs[Coef.LOG_VAR_SMALL]
        return coefs[Coef.NONZERO] * torch.exp(0.5 * log_var)
    raise ValueError(f"variance: expected one of {VARIANCES}, got {variance!r}")


def dps_update(
    x: torch.Tensor, eps: torch.Tensor, w: torch.Tensor, u: torch.Tensor, gscale: torch.Tensor,
    coefs: torch.Tensor, step: int, clip: Clip = None, variance: str = "fixed_small",
    v: Optional[torch.Tensor] = None, seeds: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One guided DDPM step, the formula every fused update kernel implements.

    ``x_{t-1} = COEF_X0 * x0hat + COEF_XT * x + sigma * z - gscale[n] * g`` with
    ``g = 2 / sqrt(abar) * (w - sqrt(1 - abar) * u)`` the gradient of ``||A x0hat - y||^2`` w.r.t.
    ``x_t``: ``w`` is the clip-masked ``A^H(A x0hat - y)`` and ``u = J_eps^T w`` the network's
    input VJP. ``z`` is ``noise`` when given, else the Philox stream of ``seeds`` at ``step``.
    ``gscale`` is ``zeta / (2 sigma_n^2)`` ("squared") or ``zeta / (2 ||r_n||)`` ("normalized").
    ``out`` may be ``x`` itself (in-place update).
    """
    if noise is None:
        if seeds is None:
            raise ValueError("seeds: needed when noise is None")
        noise = philox_normal(seeds, x[0].numel(), step, STREAM_STEP, x.dtype).view_as(x)
    # in-place chain on fresh buffers: each line is one pass over the state
    res = tweedie(x, eps, coefs, clip).mul_(coefs[Coef.COEF_X0])
    res.addcmul_(x, coefs[Coef.COEF_XT])
    res.addcmul_(noise, step_sigma(coefs, variance, v))
    g = torch.addcmul(w, u, coefs[Coef.SQRT_1M_ABAR], value=-1.0)
    res.addcmul_(g, _per_sample(gscale * (2.0 * coefs[Coef.SQRT_RECIP_ABAR]), x), value=-1.0)
    if out is None:
        return res
    return out.copy_(res)
