"""``create_sampler`` and ``p_sample_loop`` of the DPS code, running on dps_fast.

The loop is theirs (``guided_diffusion/gaussian_diffusion.py``): for ``idx = K-1 .. 0`` the
reverse step ``p_sample`` (network, ``x0hat``, DDPM or DDIM update with fresh noise), the noised
measurement ``q_sample(y, idx)``, then ``measurement_cond_fn(x_t=sample, measurement=y,
noisy_measurement=..., x_prev=x, x_0_hat=x0hat)``; with ``record`` every tenth state is saved as
``save_root/progress/x_{idx:04d}.png``. Each run takes one of three paths:

* **fused**: their 'ps' (or 'mcg') with Gaussian/Poisson noise, an operator with a dps_fast
  equivalent, epsilon prediction and a DDPM (or, on fused backends, DDIM) update: one
  :class:`~dps_fast.DPS` step per iteration (one forward, one input-only VJP, fused update);
* **formula**: any other recognised method, mean/variance type or operator: their formulas
  written out here (:mod:`.methods`), autograd through the step, weights frozen;
* **callback**: an unrecognised ``measurement_cond_fn`` is called as their loop calls it.

Their UNetModel runs as :class:`~dps_fast.models.ADMUNet` in every path (same weights). One
log line per distinct set-up says which parts run fast and which do not.

Randomness: ``rng="philox"`` (default) draws from dps_fast's counter-based stream keyed by one
seed per image (batch-independent, resumable; the fused and formula paths draw the same
numbers); ``rng="torch"`` draws with ``torch.randn_like``/``torch.rand_like`` in their order
(per step: the reverse-step noise, then ``q_sample``'s noise, then ps+'s perturbations), so for
the same torch seed and ``x_start`` the samples equal their code's up to float rounding. The draws
are ``randn_like`` of the state and the measurement as given (torch's CPU generator fills strided
tensors with other numbers than contiguous ones, so their memory layout is kept).

Example:
    >>> from dps_fast.compat.dps2022 import create_sampler
    >>> s = create_sampler(sampler="ddpm", steps=1000, noise_schedule="linear",
    ...                    model_mean_type="epsilon", model_var_type="fixed_small",
    ...                    dynamic_threshold=False, clip_denoised=True, rescale_timesteps=False,
    ...                    timestep_respacing="20")
    >>> s.num_timesteps, s.timestep_map[-1]
    (20, 999)
"""

from __future__ import annotations

import logging
import math
import os
import weakref
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ...backends import FusedBackend, check_backend, get_backend
from ...models.adm import ADMUNet
from ...noise import seeds_from
from ...operators.base import Operator
from ...schedule import Coef, NoiseSchedule
from .images import save_like_plt
from .recognize import Conditioning, inspect_conditioning, map_operator
from .unet import looks_like_unet, to_admunet

logger = logging.getLogger(__name__)

__all__ = ["create_sampler", "SpacedDiffusion", "DDPM", "DDIM", "get_named_beta_schedule", "SAMPLERS", "RNGS"]

SAMPLERS = ("ddpm", "ddim")
NOISE_SCHEDULES = ("linear", "cosine")
MEAN_TYPES = ("epsilon", "start_x", "previous_x")
VAR_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
RNGS = ("philox", "torch")

_LOGGED: set[str] = set()
_ADM_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], ADMUNet]]" = weakref.WeakKeyDictionary()


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> NoiseSchedule:
    """Their ``get_named_beta_schedule`` as a :class:`NoiseSchedule` ('linear' scaled to the step
    count, 'cosine' with s = 0.008 and betas clipped at 0.999)."""
    if schedule_name == "linear":
        if num_diffusion_timesteps < 21:  # beta_end = 0.02 * 1000 / steps must stay below 1
            raise ValueError(f"steps: the linear schedule scaled to {num_diffusion_timesteps} steps has betas >= 1; "
                             f"use the training steps (1000) and set timestep_respacing to sample with fewer")
        return NoiseSchedule.linear(num_diffusion_timesteps)
    if schedule_name == "cosine":
        return NoiseSchedule.cosine(num_diffusion_timesteps)
    raise ValueError(f"noise_schedule: expected one of {NOISE_SCHEDULES}, got {schedule_name!r}")


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value.strip() not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value.strip()


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)) and value not in (0, 1):
        raise ValueError(f"{name}: expected true or false, got {value!r}")
    return bool(value)


def create_sampler(sampler: str, steps: int, noise_schedule: str, model_mean_type: str, model_var_type: str,
                   dynamic_threshold: bool, clip_denoised: bool, rescale_timesteps: bool,
                   timestep_respacing: Union[int, str, Sequence[int], None] = "", *, eta: float = 0.0,
                   rng: str = "philox", fast: bool = True, backend: str = "auto",
                   compile: Union[bool, dict] = False, autocast: Optional[torch.dtype] = None,
                   progress: bool = True) -> "SpacedDiffusion":
    """Their ``create_sampler(**diffusion_config)``: the keys of ``diffusion_config.yaml`` (plus
    ``eta`` for DDIM) and dps_fast's options.

    Args:
        sampler: 'ddpm' or 'ddim'.
        steps: training steps of the noise schedule (1000 for their checkpoints).
        noise_schedule: 'linear' or 'cosine'.
        model_mean_type: 'epsilon' (their checkpoints), 'start_x' or 'previous_x'.
        model_var_type: 'learned_range' (their checkpoints), 'fixed_small', 'fixed_large', 'learned'.
        dynamic_threshold: their ``dynamic_thresholding`` of x0hat (s = 0.95) before the clip.
        clip_denoised: clamp x0hat to [-1, 1].
        rescale_timesteps: call the network with ``t * 1000 / steps`` (float) instead of ``t``.
        timestep_respacing: sampling steps: an int, "N", "a,b,c" sections or "ddimN"; empty: ``steps``.
        eta: DDIM noise scale (0: deterministic); ignored by 'ddpm'.
        rng: 'philox' (dps_fast's batch-independent stream) or 'torch' (their draws, in their order).
        fast: recognise their objects and run the fast paths; False runs their model and
            conditioning function as given (the generic path, e.g. to compare).
        backend, autocast: passed to :class:`~dps_fast.DPS` on the fused path.
        compile: ``torch.compile`` the network (True, or a dict of its options): compiled once per
            model object and reused by every later ``p_sample_loop`` call (their scripts call it
            once per image); off by default, so swapping the import never starts a compile.
        progress: show a tqdm bar over the steps (theirs always does).

    Returns:
        a :class:`DDPM` or :class:`DDIM` sampler with ``p_sample_loop``.
    """
    sampler = _check_choice("sampler", sampler, SAMPLERS)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps: expected a positive integer, got {steps!r}")
    base = get_named_beta_schedule(_check_choice("noise_schedule", noise_schedule, NOISE_SCHEDULES), steps)
    if timestep_respacing in ("", None):
        timestep_respacing = [steps]
    if isinstance(timestep_respacing, bool) or not isinstance(timestep_respacing, (int, str, list, tuple)):
        raise ValueError(f"timestep_respacing: expected an int, a string such as '250' or 'ddim50', or a list; "
                         f"got {timestep_respacing!r}")
    try:
        schedule = base.respace(list(timestep_respacing) if isinstance(timestep_respacing, tuple)
                                else timestep_respacing)
    except ValueError as exc:
        raise ValueError(f"timestep_respacing: {exc} (steps={steps}, timestep_respacing={timestep_respacing!r})") from None
    if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta: expected a finite number >= 0, got {eta!r}")
    cls = DDPM if sampler == "ddpm" else DDIM
    return cls(
        schedule=schedule, model_mean_type=_check_choice("model_mean_type", model_mean_type, MEAN_TYPES),
        model_var_type=_check_choice("model_var_type", model_var_type, VAR_TYPES),
        dynamic_threshold=_check_flag("dynamic_threshold", dynamic_threshold),
        clip_denoised=_check_flag("clip_denoised", clip_denoised),
        rescale_timesteps=_check_flag("rescale_timesteps", rescale_timesteps), eta=float(eta),
        rng=_check_choice("rng", rng, RNGS), fast=bool(fast), backend=backend, compile=compile,
        autocast=autocast, progress=bool(progress))


class _Rescaled(nn.Module):
    """``model(x, t * factor)`` with float ``t``: their ``rescale_timesteps``."""

    def __init__(self, model: Callable[..., torch.Tensor], factor: float) -> None:
        super().__init__()
        self.inner = model
        self.factor = factor

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.inner(x, t.float() * self.factor)


class SpacedDiffusion:
    """The sampler ``create_sampler`` returns: their ``SpacedDiffusion`` attributes (numpy float64
    ``betas``, ``alphas_cumprod``, ... of the respaced chain, ``timestep_map``, ``num_timesteps``)
    and ``p_sample_loop``. ``schedule`` is the respaced :class:`NoiseSchedule`; ``last_plan``
    says which path the last run took."""

    name = "ddpm"

    def __init__(self, schedule: NoiseSchedule, model_mean_type: str,
                 model_var_type: str, dynamic_threshold: bool, clip_denoised: bool, rescale_timesteps: bool,
                 eta: float = 0.0, rng: str = "philox", fast: bool = True, backend: str = "auto",
                 compile: Union[bool, dict] = False, autocast: Optional[torch.dtype] = None,
                 progress: bool = True) -> None:
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule: expected a NoiseSchedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.original_num_steps = schedule.base_alphas_cumprod.numel()
        self.timestep_map = [int(t) for t in self.schedule.timesteps]
        self.use_timesteps = set(self.timestep_map)
        self.num_timesteps = self.schedule.num_steps
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.dynamic_threshold = dynamic_threshold
        self.clip_denoised = clip_denoised
        self.rescale_timesteps = rescale_timesteps
        self.eta = eta
        self.rng = rng
        self.fast = fast
        self.backend = backend
        self.compile = compile
        self._compiled: dict[int, tuple[nn.Module, nn.Module]] = {}
        self.autocast = autocast
        self.progress = progress
        self.betas = self.schedule.betas.numpy().copy()
        self.alphas_cumprod = self.schedule.alphas_cumprod.numpy().copy()
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        #: what the last p_sample_loop ran: path ('fused', 'formula', 'callback') and why, the
        #: network, method, noise and the dps_fast operator it mapped to
        self.last_plan: dict[str, Any] = {}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(steps={self.num_timesteps}/{self.original_num_steps}, "
                f"mean={self.model_mean_type}, var={self.model_var_type}, clip={self.clip_denoised}, rng={self.rng!r})")

    # ---- their helpers --------------------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Their ``q_sample``: ``sqrt(abar_t) x_start + sqrt(1 - abar_t) z``, ``z = torch.randn_like``."""
        noise = torch.randn_like(x_start)
        return self._q_sample(x_start, int(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else int(t), noise)

    def _coefs(self, i: int, like: torch.Tensor) -> torch.Tensor:
        """Row ``i`` of the coefficient table (computed in float64) in ``like``'s dtype: in float32
        exactly the numbers of their ``extract_and_expand`` (float64 numpy rounded to float32);
        float64 states keep float64 coefficients (theirs would round them to float32)."""
        return self.schedule.table(like.dtype, like.device)[i]

    def _q_sample(self, y: torch.Tensor, i: int, noise: torch.Tensor) -> torch.Tensor:
        c = self._coefs(i, y)
        return c[Coef.SQRT_ABAR] * y + c[Coef.SQRT_1M_ABAR] * noise

    def _model_t(self, i: int, n: int, device: torch.device) -> torch.Tensor:
        return self.schedule.timesteps[i].to(device).expand(n)

    # ---- the network ----------------------------------------------------------------------
    def _network(self, model: Any) -> tuple[Callable[..., torch.Tensor], str, bool]:
        """(network called with original timesteps, description, runs fast)."""
        if not callable(model):
            raise TypeError(f"model: expected a callable model(x, t), got {type(model).__name__}")
        net: Callable[..., torch.Tensor] = model
        desc, fast = f"{type(model).__name__} (called as given)", False
        if self.fast and isinstance(model, ADMUNet):
            desc, fast = "ADMUNet", True
        elif self.fast and looks_like_unet(model):
            ptrs = tuple(p.data_ptr() for p in model.parameters())
            hit = _ADM_CACHE.get(model)
            if hit is not None and hit[0] == ptrs:
                net, desc, fast = hit[1], "UNetModel -> ADMUNet (strict load, shared weights)", True
            else:
                try:
                    adm = to_admunet(model)
                except (ValueError, TypeError) as exc:
                    desc = f"UNetModel (called as given: {exc})"
                else:
                    _ADM_CACHE[model] = (ptrs, adm)
                    net, desc, fast = adm, "UNetModel -> ADMUNet (strict load, shared weights)", True
        if isinstance(net, nn.Module) and net.training and any(
                isinstance(m, nn.Dropout) and m.p > 0 for m in net.modules()):
            logger.warning("model: in training mode with dropout: its forward draws random numbers "
                           "(call model.eval() as their sample_condition.py does)")
        if self.compile and isinstance(net, nn.Module):
            # one compiled wrapper per network and sampler: a new torch.compile per call (their
            # scripts call p_sample_loop once per image) would compile again for every image
            hit = self._compiled.get(id(net))
            if hit is None or hit[0] is not net:
                opts = self.compile if isinstance(self.compile, dict) else {}
                hit = (net, torch.compile(net, **opts))
                self._compiled[id(net)] = hit
            net, desc = hit[1], desc + ", torch.compile"
        if self.rescale_timesteps:
            net = _Rescaled(net, 1000.0 / self.original_num_steps)
        return net, desc, fast

    # ---- the loop -------------------------------------------------------------------------
    def p_sample_loop(self, model: Any, x_start: torch.Tensor, measurement: torch.Tensor,
                      measurement_cond_fn: Callable[..., Any], record: bool = False,
                      save_root: Optional[Union[str, os.PathLike]] = None, *,
                      seeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Their ``p_sample_loop``: the sample ``x_0`` ``[B, C, H, W]`` (detached) from ``x_start``.

        Args:
            model: their UNetModel (runs as ADMUNet), an ADMUNet, or any ``model(x, t)``.
            x_start: ``[B, C, H, W]`` initial noise (their script: ``torch.randn``).
            measurement: ``[B, *y]`` the noisy measurement ``y``.
            measurement_cond_fn: their ``cond_method.conditioning`` (possibly a ``functools.partial``
                with ``mask=``), or any function with that signature.
            record: save every tenth state as ``save_root/progress/x_{idx:04d}.png`` (batch > 1:
                ``x_{idx:04d}_{b}.png``).
            save_root: folder of ``progress/`` (created if missing).
            seeds: ``[B]`` int64 Philox seeds (rng='philox'); default: drawn from torch's global RNG.

        Raises:
            NonFiniteError: the chain produced NaN/inf (their code would save black images).
        """
        x, y = self._check_inputs(x_start, measurement)
        if record and save_root is None:
            raise ValueError("save_root: record=True saves progress images under save_root; got None")
        seeds = self._seeds(seeds, x.shape[0])
        cond = inspect_conditioning(measurement_cond_fn) if self.fast else Conditioning(None, fn=measurement_cond_fn,
                                                                                         reason="(fast=False)")
        fast_op, op_desc = None, ""
        if cond.method is not None:
            fast_op, op_desc = map_operator(cond.operator, cond.kwargs, x)
        on_record: Optional[Callable[[int, torch.Tensor], None]] = None
        if record:
            folder = os.path.join(os.fspath(save_root), "progress")

            def save_progress(i: int, state: torch.Tensor) -> None:
                os.makedirs(folder, exist_ok=True)
                for j in range(state.shape[0]):
                    name = f"x_{str(i).zfill(4)}.png" if state.shape[0] == 1 else f"x_{str(i).zfill(4)}_{j}.png"
                    save_like_plt(os.path.join(folder, name), state[j:j + 1])

            on_record = save_progress

        return self._run(model, cond, fast_op, x, y, seeds, on_record, op_desc, None)

    def run(self, model: Any, cond: Conditioning, fast_op: Optional[Operator], x_start: torch.Tensor,
            measurement: torch.Tensor, seeds: torch.Tensor,
            on_record: Optional[Callable[[int, torch.Tensor], None]] = None, op_desc: str = "",
            steps: Optional[Sequence[int]] = None) -> torch.Tensor:
        """The loop for an already recognised set-up (``p_sample_loop`` and ``dps-fast dps2022``).

        Args:
            model: the network (converted like in ``p_sample_loop``).
            cond: the conditioning (:func:`~.recognize.inspect_conditioning` or built from a task config).
            fast_op: the dps_fast operator with the same ``A`` (None: their ``forward`` via autograd).
            x_start: ``[B, C, H, W]``; measurement: ``[B, *y]``; seeds: ``[B]`` int64 (Philox).
            on_record: ``on_record(idx, x)`` after every step with ``idx % 10 == 0``.
            steps: run only these step indices (descending; a memory probe runs one).

        Returns:
            ``[B, C, H, W]`` the last state (detached).
        """
        x, y = self._check_inputs(x_start, measurement)
        return self._run(model, cond, fast_op, x, y, self._seeds(seeds, x.shape[0]), on_record, op_desc, steps)

    def _run(self, model: Any, cond: Conditioning, fast_op: Optional[Operator], x: torch.Tensor, y: torch.Tensor,
             seeds: torch.Tensor, on_record: Optional[Callable[[int, torch.Tensor], None]], op_desc: str,
             steps: Optional[Sequence[int]]) -> torch.Tensor:
        """:meth:`run` on inputs already checked by :meth:`_check_inputs` and :meth:`_seeds`."""
        net, net_desc, net_fast = self._network(model)
        engine, why = self._choose(cond, fast_op, y)
        self.last_plan = {"path": engine, "why_not_fused": why, "network": net_desc, "network_fast": net_fast,
                          "method": cond.method, "noise": cond.noise, "operator": repr(fast_op) if fast_op else None,
                          "operator_note": op_desc}
        self._log_once(net_desc, net_fast, cond, fast_op, op_desc, engine, why)
        from .chain import Chain

        return Chain(self, net, cond, fast_op, x, y, seeds.cpu(), on_record).run(engine, steps)

    def _seeds(self, seeds: Optional[torch.Tensor], b: int) -> torch.Tensor:
        if seeds is None:
            return seeds_from(None, b) if self.rng == "philox" else torch.zeros(b, dtype=torch.int64)
        if not (isinstance(seeds, torch.Tensor) and seeds.dtype == torch.int64 and seeds.shape == (b,)):
            raise ValueError(f"seeds: expected an int64 tensor [{b}], got {getattr(seeds, 'dtype', type(seeds))} "
                             f"{tuple(getattr(seeds, 'shape', ()))}")
        return seeds

    def _check_inputs(self, x_start: Any, measurement: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x_start, torch.Tensor) or x_start.dim() < 3:
            raise ValueError(f"x_start: expected a tensor [B, C, H, W], got "
                             f"{tuple(x_start.shape) if isinstance(x_start, torch.Tensor) else type(x_start).__name__}")
        if x_start.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"x_start: expected float32 or float64, got {x_start.dtype}")
        if not isinstance(measurement, torch.Tensor) or measurement.dim() < 1:
            raise ValueError(f"measurement: expected a tensor [B, ...], got {type(measurement).__name__}")
        if measurement.shape[0] != x_start.shape[0]:
            raise ValueError(f"measurement: expected the batch size of x_start ({x_start.shape[0]}), got "
                             f"shape {tuple(measurement.shape)}")
        if measurement.device != x_start.device:
            raise ValueError(f"measurement: expected x_start's device {x_start.device}, got {measurement.device}")
        return x_start.detach().clone(), measurement.detach()

    def _choose(self, cond: Conditioning, fast_op: Optional[Operator], y: torch.Tensor) -> tuple[str, str]:
        """('fused' | 'formula' | 'callback', why not fused)."""
        if cond.method is None:
            return "callback", cond.reason
        if cond.method not in ("ps", "mcg"):
            return "formula", f"method '{cond.method}' has no fused step"
        if fast_op is None:
            return "formula", "the operator has no fused equivalent"
        if self.model_mean_type != "epsilon" or self.model_var_type == "learned" or self.dynamic_threshold:
            return "formula", (f"model_mean_type={self.model_mean_type}, model_var_type={self.model_var_type}, "
                               f"dynamic_threshold={self.dynamic_threshold}")
        if not (cond.scale >= 0 and math.isfinite(cond.scale)):
            return "formula", f"scale {cond.scale}"
        if cond.noise == "poisson" and not bool((y != 0).all()):
            return "formula", "their Poisson step divides by |y| and y has zeros"
        if y.is_complex():
            return "formula", "complex measurement"
        if self.name == "ddim":  # the DDIM update is assembled from a fused backend's pieces
            check_backend(self.backend, y.device)
            if not isinstance(get_backend(self.backend, y.device), FusedBackend):
                return "formula", f"DDIM needs a fused backend, got backend={self.backend!r}"
        return "fused", ""

    def _log_once(self, net_desc: str, net_fast: bool, cond: Conditioning, fast_op: Optional[Operator],
                  op_desc: str, engine: str, why: str) -> None:
        op_name = type(cond.operator).__name__ if cond.operator is not None else "-"
        op_part = (f"{op_name} -> {op_desc}" if fast_op is not None
                   else f"{op_name} -> autograd through their forward()" + (f" ({op_desc})" if op_desc else ""))
        parts = [f"network: {net_desc} [{'fast' if net_fast else 'not fast'}]",
                 f"conditioning: {cond.describe()}", f"operator: {op_part}",
                 f"step: {'fused DPS step' if engine == 'fused' else engine + ' path (' + why + ')'}",
                 f"sampler: {self.name}, {self.num_timesteps} steps, rng={self.rng}"]
        msg = "dps2022 drop-in: " + "; ".join(parts)
        if msg not in _LOGGED:
            _LOGGED.add(msg)
            level = logging.INFO if engine == "fused" and net_fast else logging.WARNING
            logger.log(level, msg)

    # ---- their reverse step (formula and callback paths) -----------------------------------
    def _split(self, out: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        if out.shape[1] == 2 * c:
            return out[:, :c], out[:, c:]
        if self.model_var_type in ("learned", "learned_range"):
            raise ValueError(f"model_var_type: {self.model_var_type!r} needs a model with {2 * c} output channels "
                             f"(learn_sigma: True), got {out.shape[1]}")
        return out, out

    def _process_xstart(self, x0: torch.Tensor) -> torch.Tensor:
        if self.dynamic_threshold:  # their dynamic_thresholding: x * quantile(|x|, 0.95), then clip
            x0 = torch.clip(x0 * torch.quantile(x0.abs(), 0.95), -1.0, 1.0)
        if self.clip_denoised:
            x0 = x0.clamp(-1, 1)
        return x0

    def _mean_xstart(self, x: torch.Tensor, out: torch.Tensor, c: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.model_mean_type == "epsilon":
            x0 = self._process_xstart(c[Coef.SQRT_RECIP_ABAR] * x - c[Coef.SQRT_RECIPM1_ABAR] * out)
        elif self.model_mean_type == "start_x":
            x0 = self._process_xstart(out)
        else:  # previous_x: the model predicts the posterior mean
            t64 = self.schedule.table(torch.float64)[i]
            k1 = (1.0 / t64[Coef.COEF_X0]).to(device=x.device, dtype=x.dtype)
            k2 = (t64[Coef.COEF_XT] / t64[Coef.COEF_X0]).to(device=x.device, dtype=x.dtype)
            return out, self._process_xstart(k1 * out - k2 * x)
        return c[Coef.COEF_X0] * x0 + c[Coef.COEF_XT] * x, x0

    def _log_variance(self, v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.model_var_type == "fixed_small":
            return c[Coef.LOG_VAR_SMALL]
        if self.model_var_type == "fixed_large":
            return c[Coef.LOG_VAR_LARGE]
        if self.model_var_type == "learned":
            return v
        frac = (v + 1.0) / 2.0
        return frac * c[Coef.LOG_BETA] + (1 - frac) * c[Coef.LOG_VAR_SMALL]

    def _p_sample(self, x: torch.Tensor, out: torch.Tensor, i: int, noise: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Their DDPM ``p_sample`` (``x`` requires grad): ``(sample, pred_xstart)``."""
        c = self._coefs(i, x)
        eps, v = self._split(out, x.shape[1])
        mean, x0 = self._mean_xstart(x, eps, c, i)
        sample = mean
        if i != 0:
            sample = sample + torch.exp(0.5 * self._log_variance(v, c)) * noise
        return sample, x0


class DDPM(SpacedDiffusion):
    """Their 'ddpm' sampler (ancestral steps with the model's variance)."""

    name = "ddpm"


class DDIM(SpacedDiffusion):
    """Their 'ddim' sampler: ``x_{t-1} = sqrt(abar') x0hat + sqrt(1 - abar' - s^2) eps' + s z`` with
    ``eps'`` re-derived from the (clipped) x0hat and ``s = eta sqrt((1-abar')/(1-abar))
    sqrt(1 - abar/abar')`` (``abar' = abar_{t-1}``)."""

    name = "ddim"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ddim_tables: dict[tuple[torch.dtype, torch.device, float], torch.Tensor] = {}

    def _ddim_coefs(self, i: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sqrt(abar'), sqrt(1 - abar' - s^2), s) computed as their code does, in ``like``'s dtype
        (a table of all steps, built once per dtype, device and eta)."""
        key = (like.dtype, like.device, self.eta)
        table = self._ddim_tables.get(key)
        if table is None:
            work = like.dtype if like.dtype == torch.float64 else torch.float32
            ab = torch.from_numpy(np.asarray(self.alphas_cumprod, dtype=np.float64)).to(work)
            abp = torch.from_numpy(np.asarray(self.alphas_cumprod_prev, dtype=np.float64)).to(work)
            sigma = self.eta * torch.sqrt((1 - abp) / (1 - ab)) * torch.sqrt(1 - ab / abp)
            table = torch.stack([torch.sqrt(abp), torch.sqrt(1 - abp - sigma ** 2), sigma], 1)
            table = self._ddim_tables[key] = table.to(device=like.device, dtype=like.dtype)
        row = table[i]
        return row[0], row[1], row[2]

    def _ddim_update(self, x: torch.Tensor, x0: torch.Tensor, c: torch.Tensor, i: int,
                     noise: Optional[torch.Tensor]) -> torch.Tensor:
        """Their DDIM update from ``x_t``, the (clipped) x0hat and coefficient row ``c``:
        ``sqrt(abar') x0hat + sqrt(1 - abar' - s^2) eps' + s z`` (no noise at ``i = 0``)."""
        eps = (c[Coef.SQRT_RECIP_ABAR] * x - x0) / c[Coef.SQRT_RECIPM1_ABAR]
        sq_abp, sq_rest, sigma = self._ddim_coefs(i, x)
        sample = x0 * sq_abp + sq_rest * eps
        if i != 0:
            sample = sample + sigma * noise
        return sample

    def _p_sample(self, x: torch.Tensor, out: torch.Tensor, i: int, noise: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        c = self._coefs(i, x)
        eps_out, v = self._split(out, x.shape[1])
        _, x0 = self._mean_xstart(x, eps_out, c, i)
        return self._ddim_update(x, x0, c, i, noise), x0
