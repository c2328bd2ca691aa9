"""The DPS sampler: the reverse DDPM chain with a likelihood-guidance step per iteration.

For ``y = A x0 + n``, ``n ~ N(0, sigma_n^2 I)``, each step ``i = K-1 .. 1`` does

1. ``eps = net(x_t, t)``; Tweedie ``x0hat = (x_t - sqrt(1-abar) eps) / sqrt(abar)`` (clamped to
   ``clip_x0`` if given);
2. ``r = A x0hat - y``; ``g = grad_{x_t} ||r||^2``, by ONE input-only VJP of the network with the
   cotangent ``w = A^H r``;
3. ``x_{t-1} = DDPM_step(x_t, x0hat) - zeta/(2 sigma_n^2) g`` ("squared") or
   ``- zeta grad ||r|| = - zeta/(2 ||r||) g`` ("normalized", the original DPS code's step, here
   per sample instead of one norm over the batch).

The result is ``x0hat(x_1)``, the Tweedie estimate of the last step (which therefore needs no VJP:
``nfe = 2K - 1``). The sampler owns no kernel code: a backend answers ``step``.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from .backends import Backend, StepOutput, StepProblem, check_backend, get_backend
from .chain import DPSResult, run_chain
from .divergence import RUNAWAY_FACTOR, NonFiniteError, describe_value, zeta_hint
from .models.wrapper import ScoreNetwork, default_channels_last
from .noise import STREAM_INIT, philox_normal, seeds_from
from .operators.base import Operator
from .operators.poisson import NOISE_MODELS, PoissonNoise
from .schedule import NoiseSchedule

logger = logging.getLogger(__name__)

__all__ = ["DPS", "DPSResult", "NonFiniteError"]

GUIDANCE = ("squared", "normalized")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def _as_row_param(value: Union[float, Sequence[float], torch.Tensor], name: str, batch: int) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{name}: expected a float or one value per measurement ({batch}), got shape {tuple(t.shape)}")
    return t


def _model_device(model: Callable) -> Optional[torch.device]:
    """The device of an ``nn.Module``'s first parameter or buffer; None for a plain function."""
    if isinstance(model, nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    return None


class DPS:
    """Diffusion Posterior Sampling.

    Args:
        model: ``eps(x_t, t)`` callable (an ``nn.Module`` or a function), ``t`` int64 ``[N]`` of
            training-schedule indices; returns ``[N, C, *S]`` or ``[N, 2C, *S]`` (learned variance).
        schedule: the :class:`NoiseSchedule` (possibly respaced) to sample with.
        operator: the forward model ``A`` (:mod:`dps_fast.operators`): any :class:`~dps_fast.operators.Operator`,
            linear or not (wrap your own callable or ``nn.Module`` in ``operators.Differentiable``).
        zeta: guidance scale, a float or one per measurement.
        sigma_n: measurement noise standard deviation, >= 0 (> 0 for "squared" guidance).
        guidance: "squared" (``zeta/(2 sigma_n^2) grad ||r||^2``), "normalized" (``zeta grad ||r||``
            per sample), or a sequence with one mode per measurement.
        clip_x0: ``None`` or ``(lo, hi)`` to clamp x0hat; the gradient respects the clamp.
        variance: "fixed_small" (beta~, default), "fixed_large" (beta) or "learned_range" (the
            default when the model returns 2C channels).
        backend: "auto" | "reference" | "torch" | "triton" | "cuda".
        compile: ``torch.compile`` the network (default: on for CUDA ``nn.Module`` models); a dict
            turns it on with those ``torch.compile`` keyword arguments (e.g. ``{"mode": "max-autotune"}``).
        autocast: run the network in ``torch.bfloat16``/``torch.float16``; the state stays float32.
        channels_last: run a 4-D network in channels_last memory format. None (auto): on for
            ``nn.Module`` models on CUDA with ``autocast`` bfloat16/float16, chosen because cuDNN's
            tensor-core convolutions run NHWC natively (the GPU suite measures both layouts; not
            yet measured here); off on the CPU and without autocast.
        check_every: read the non-finite flag every this many steps (a host sync); default: every
            step on CPU, only at the end on CUDA (the flag records the first bad step either way).
        cuda_graph: capture one guided step as a CUDA graph and replay it for every step (CUDA,
            backend "torch" or "triton"; see :mod:`dps_fast.graphs`).
        checkpointing: switch the network's activation checkpointing on/off (models with
            ``set_checkpointing``, e.g. ADMUNet): recompute in the VJP to fit very large batches;
            None leaves the model as it is.
        noise: the measurement noise: "gaussian" (``N(0, sigma_n^2 I)``, the default), "poisson"
            (``PoissonNoise()``: the DPS code's Poisson noise at rate 1 on [-1, 1] images) or a
            :class:`~dps_fast.operators.PoissonNoise`. Poisson guidance uses the weighted norm
            ``||y - A x0hat||^2_Lambda``, ``Lambda_jj = gain^2 / (2 max(c_j, 1))`` (the paper's
            ``1 / (2 y_j)`` in counts; see :mod:`dps_fast.operators.poisson`): "squared" steps
            ``zeta grad ||r||^2_Lambda``, "normalized" ``zeta grad ||r||_Lambda``; ``sigma_n`` is
            unused and ``residual_norm`` reports ``||r||_Lambda``.

    Example:
        >>> from dps_fast import DPS, NoiseSchedule, operators, priors
        >>> prior = priors.GaussianPrior(torch.zeros(4), torch.eye(4))
        >>> sched = NoiseSchedule.linear(1000).respace(50)
        >>> A = operators.Matrix(torch.randn(2, 4) / 2)
        >>> dps = DPS(prior.eps_model(sched), sched, A, zeta=0.005, sigma_n=0.1)
        >>> res = dps.sample(torch.zeros(1, 1, 2), num_samples=8, seed=0)
        >>> res.samples.shape
        torch.Size([1, 8, 1, 4])
    """

    #: Divergence rule of :mod:`dps_fast.divergence`: a chain whose RMS exceeds this many times the
    #: largest the schedule allows raises NonFiniteError. None on an instance turns only this check
    #: off (NaN/inf still raise), e.g. to compare backends' arithmetic on an untrained network.
    runaway_factor: Optional[float] = RUNAWAY_FACTOR

    def __init__(
        self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: NoiseSchedule,
        operator: Operator, zeta: Union[float, Sequence[float], torch.Tensor] = 1.0,
        sigma_n: float = 0.05, guidance: Union[str, Sequence[str]] = "squared",
        clip_x0: Optional[tuple[float, float]] = None, variance: Optional[str] = None,
        backend: str = "auto", compile: Optional[Union[bool, dict]] = None, autocast: Optional[torch.dtype] = None,
        channels_last: Optional[bool] = None, check_every: Optional[int] = None, cuda_graph: bool = False,
        checkpointing: Optional[bool] = None, noise: Union[str, PoissonNoise] = "gaussian",
    ) -> None:
        if not callable(model):
            raise TypeError(f"model: expected a callable eps(x_t, t), got {type(model).__name__}")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule: expected a NoiseSchedule, got {type(schedule).__name__}")
        if not isinstance(operator, Operator):
            raise TypeError(f"operator: expected a dps_fast.operators.Operator (wrap a callable in "
                            f"operators.Differentiable), got {type(operator).__name__}")
        if isinstance(noise, str) and noise in NOISE_MODELS:
            noise_model = PoissonNoise() if noise == "poisson" else None
        elif isinstance(noise, PoissonNoise):
            noise_model = noise
        else:
            raise ValueError(f"noise: expected one of {NOISE_MODELS} or a PoissonNoise, got {noise!r}")
        modes = [guidance] if isinstance(guidance, str) else list(guidance)
        bad = [m for m in modes if m not in GUIDANCE]
        if bad or not modes:
            raise ValueError(f"guidance: expected 'squared' or 'normalized' (or one per measurement), got {guidance!r}")
        zt = torch.as_tensor(zeta, dtype=torch.float64)
        if not torch.isfinite(zt).all() or (zt < 0).any():
            raise ValueError(f"zeta: expected finite values >= 0, got {describe_value(zeta)}")
        if not (isinstance(sigma_n, (int, float)) and math.isfinite(sigma_n)) or sigma_n < 0:
            raise ValueError(f"sigma_n: expected a finite standard deviation >= 0, got {sigma_n!r}")
        if "squared" in modes and sigma_n <= 0 and noise_model is None:
            raise ValueError(f"sigma_n: 'squared' guidance divides by sigma_n^2 and needs sigma_n > 0, got {sigma_n}")
        if variance is not None and variance not in VARIANCES:
            raise ValueError(f"variance: expected one of {VARIANCES} or None, got {variance!r}")
        if clip_x0 is not None:
            if len(clip_x0) != 2 or not float(clip_x0[0]) < float(clip_x0[1]):
                raise ValueError(f"clip_x0: expected None or (lo, hi) with lo < hi, got {clip_x0!r}")
            clip_x0 = (float(clip_x0[0]), float(clip_x0[1]))
        if channels_last is not None and not isinstance(channels_last, bool):
            raise TypeError(f"channels_last: expected None (auto) or a bool, got {channels_last!r}")
        if check_every is not None and (not isinstance(check_every, int) or check_every < 1):
            raise ValueError(f"check_every: expected a positive int or None, got {check_every!r}")
        check_backend(backend, _model_device(model))  # fail here, not at the first step of a run
        self.model = model
        self.schedule = schedule
        self.operator = operator
        self.zeta = zeta
        self.sigma_n = float(sigma_n)
        self.noise = noise_model  # None: Gaussian
        self.guidance = guidance
        self._modes = modes
        self.clip_x0 = clip_x0
        self.variance = variance
        self.backend_name = backend
        self.compile = compile
        self.autocast = autocast
        self.channels_last = channels_last
        self.check_every = check_every
        self.cuda_graph = bool(cuda_graph)
        if checkpointing is not None:
            setter = getattr(model, "set_checkpointing", None)
            if setter is None:
                raise ValueError(f"checkpointing: {type(model).__name__} has no set_checkpointing(); "
                                 f"expected a model such as ADMUNet, got checkpointing={checkpointing!r}")
            setter(bool(checkpointing))
        self._net: Optional[ScoreNetwork] = None
        self._auto_variance: Optional[str] = None
        self._backends: dict[torch.device, Backend] = {}

    # ---- set-up ---------------------------------------------------------------------------
    def backend(self, device: torch.device) -> Backend:
        be = self._backends.get(device)
        if be is None:
            be = get_backend(self.backend_name, device)
            self._backends[device] = be
            logger.info("DPS backend for %s: %s", device, be.name)
        return be

    def _network(self, device: torch.device) -> ScoreNetwork:
        if self._net is None:
            comp = self.compile
            if comp is None:
                comp = device.type == "cuda" and isinstance(self.model, nn.Module)
            self._net = ScoreNetwork(self.model, compile=bool(comp), autocast=self.autocast,
                                     channels_last=default_channels_last(self.channels_last, self.autocast,
                                                                         device, self.model),
                                     compile_options=comp if isinstance(comp, dict) else None)
        return self._net

    def _check_y(self, y: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype]:
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"y: expected a torch.Tensor, got {type(y).__name__}")
        if y.dim() < 2:
            raise ValueError(f"y: expected a batched measurement [B, ...], got shape {tuple(y.shape)}")
        if not torch.isfinite(y).all():
            raise ValueError("y: expected finite values, got NaN or inf")
        dtype = y.real.dtype if y.is_complex() else y.dtype
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"y: expected float32/float64 (or complex), got {y.dtype}")
        if self.noise is not None and y.is_complex():
            raise TypeError(f"y: Poisson measurements are real counts, got dtype {y.dtype}")
        if y.is_complex() != self.operator.output_is_complex():
            raise TypeError(f"y: {self.operator!r} gives {'complex' if self.operator.output_is_complex() else 'real'} "
                            f"measurements, got dtype {y.dtype}")
        x_shape = self.operator.input_shape(tuple(y.shape))
        expected = self.operator.output_shape(x_shape)
        if tuple(expected) != tuple(y.shape):
            raise ValueError(f"y: expected shape {tuple(expected)} for {self.operator!r}, got {tuple(y.shape)}")
        if isinstance(self.model, nn.Module):
            p = next(iter(self.model.parameters()), None)
            if p is not None and p.device != y.device:
                raise ValueError(f"y: expected tensors on the model's device {p.device}, got {y.device}")
            if p is not None and self.autocast is None and p.is_floating_point() and p.dtype != dtype:
                raise TypeError(f"y: the model's weights are {p.dtype} but y is {dtype}; cast one of them "
                                f"or pass autocast=")
        return x_shape, dtype

    def _problem(self, y: torch.Tensor, num_samples: int, seeds: torch.Tensor, x_shape: tuple[int, ...],
                 dtype: torch.dtype) -> StepProblem:
        b, dev = y.shape[0], y.device
        n = b * num_samples
        if len(self._modes) not in (1, b):
            raise ValueError(f"guidance: expected one mode or one per measurement ({b}), got {len(self._modes)}")
        normalized = torch.tensor([m == "normalized" for m in self._modes]).expand(b)
        zeta = _as_row_param(self.zeta, "zeta", b)
        y_rep = y.repeat_interleave(num_samples, 0) if num_samples > 1 else y
        k = self.schedule.num_steps
        t = self.schedule.timesteps.to(dev).view(k, 1).expand(k, n).contiguous()
        net = self._network(dev)
        if self.noise is None:
            meas = self.operator.prepare(y_rep)
        else:
            meas = self.operator.prepare(y_rep, weight=self.noise.weight(y_rep))
        return StepProblem(
            net=net, operator=self.operator, meas=meas,
            table=self.schedule.table(dtype, dev), t=t,
            zeta=zeta.repeat_interleave(num_samples).to(device=dev, dtype=dtype),
            normalized=normalized.repeat_interleave(num_samples).to(dev),
            # Poisson: the weight Lambda holds the whole likelihood scale (see PoissonNoise)
            inv_two_sigma2=1.0 if self.noise is not None else (0.5 / self.sigma_n**2 if self.sigma_n > 0 else 0.0),
            clip=self.clip_x0, variance=self._resolve_variance(x_shape, dtype, t[-1, :1], net),
            seeds=seeds.reshape(-1).to(dev), channels=x_shape[1])

    def _resolve_variance(self, x_shape: tuple[int, ...], dtype: torch.dtype, t: torch.Tensor,
                          net: ScoreNetwork) -> str:
        """The explicit ``variance``, else "learned_range" when the model returns 2C channels.

        Decided once per sampler with one uncompiled no-grad forward of one sample, so that a
        compiled network is never compiled for this side call."""
        if self.variance is not None:
            return self.variance
        if self._auto_variance is None:
            x = torch.zeros((1,) + tuple(x_shape[1:]), dtype=dtype, device=t.device)
            with torch.no_grad():
                out = net.model(x, t)
            learned = out.dim() == x.dim() and out.shape[1] == 2 * x.shape[1]
            self._auto_variance = "learned_range" if learned else "fixed_small"
        return self._auto_variance

    # ---- public API -----------------------------------------------------------------------
    def prepare(self, y: torch.Tensor, num_samples: int = 1, generator: Optional[torch.Generator] = None,
                seed: Optional[int] = None, seeds: Optional[torch.Tensor] = None) -> tuple[StepProblem, torch.Tensor]:
        """Validate ``y`` and build what every step of one run needs: ``(problem, x_T)``.

        ``x_T`` is ``[B * num_samples, *x]`` drawn from each row's Philox seed. ``sample`` calls
        this; benchmarks and CUDA-graph capture use it to drive ``backend(device).step`` directly.
        """
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples: expected an int >= 1, got {num_samples!r}")
        x_shape, dtype = self._check_y(y)
        b = y.shape[0]
        n = b * num_samples
        if seeds is not None:
            if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or seeds.shape != (b, num_samples):
                raise ValueError(f"seeds: expected an int64 tensor [{b}, {num_samples}], got "
                                 f"{getattr(seeds, 'dtype', type(seeds))} {tuple(getattr(seeds, 'shape', ()))}")
            seeds = seeds.cpu()
        else:
            seeds = seeds_from(generator, (b, num_samples), seed)  # sample (b, s): f(seed, b, s) only
        p = self._problem(y, num_samples, seeds, x_shape, dtype)
        numel = math.prod(x_shape[1:])
        x = philox_normal(p.seeds, numel, self.schedule.num_steps, STREAM_INIT, dtype)
        return p, x.view((n,) + tuple(x_shape[1:]))

    def step(self, x_t: torch.Tensor, i: int, y: torch.Tensor, noise: torch.Tensor,
             num_samples: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """One guided step at index ``i`` with explicit ``noise``: returns ``(x_{t-1}, x0hat)``.

        ``x_t`` is ``[B * num_samples, *x]`` (rows of one measurement adjacent), ``y`` ``[B, *out]``.
        ``x_t`` is not modified.
        """
        p = self.step_problem(x_t, i, y, noise, num_samples)
        with p.net.frozen():
            out = self.backend(y.device).step(p, x_t, i, noise=noise)
        return out.x, out.x0hat

    def step_problem(self, x_t: torch.Tensor, i: int, y: torch.Tensor, noise: torch.Tensor,
                     num_samples: int = 1) -> StepProblem:
        """Validate the arguments of :meth:`step` (also the other methods' ``step``) and build the
        problem of one explicit step (seeds 0: the noise is given)."""
        x_shape, dtype = self._check_y(y)
        k = self.schedule.num_steps
        if not isinstance(i, int) or not 0 <= i < k:
            raise ValueError(f"i: expected a step index in [0, {k}), got {i!r}")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples: expected an int >= 1, got {num_samples!r}")
        n = y.shape[0] * num_samples
        want = (n,) + tuple(x_shape[1:])
        for name, tsr in (("x_t", x_t), ("noise", noise)):
            if not isinstance(tsr, torch.Tensor) or tuple(tsr.shape) != want:
                raise ValueError(f"{name}: expected shape {want}, got {tuple(getattr(tsr, 'shape', ()))}")
            if tsr.dtype != dtype or tsr.device != y.device:
                raise TypeError(f"{name}: expected {dtype} on {y.device}, got {tsr.dtype} on {tsr.device}")
        return self._problem(y, num_samples, torch.zeros(n, dtype=torch.int64), x_shape, dtype)

    def sample(
        self, y: torch.Tensor, num_samples: int = 1, generator: Optional[torch.Generator] = None,
        seed: Optional[int] = None, seeds: Optional[torch.Tensor] = None,
        record: Optional[Union[Iterable[int], str]] = None, progress: bool = False,
        callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], Optional[bool]]] = None,
    ) -> DPSResult:
        """Draw ``num_samples`` posterior samples for each of the ``B`` measurements in ``y``.

        Args:
            y: ``[B, *out]`` measurements (the shape ``A`` produces).
            num_samples: S >= 1 samples per measurement.
            generator / seed / seeds: where the per-sample seeds come from: explicit ``seeds``
                ``[B, S]`` int64, else ``seed`` (sample ``(b, s)`` depends on ``(seed, b, s)``
                only, so more samples or measurements leave the others unchanged), else
                ``torch.randint`` with ``generator`` (the global RNG when None).
            record: step indices ``i`` (or "all") at which to keep x0hat in ``trajectory``.
            progress: show a tqdm progress bar over the steps.
            callback: ``callback(i, x_t, x0hat)`` after each step; returning False stops the run
                (the result then holds the last x0hat and ``stopped_at``).
        """
        return run_chain(self, self._stepper, y, num_samples, generator=generator, seed=seed, seeds=seeds,
                         record=record, progress=progress, callback=callback, desc="DPS",
                         hint=zeta_hint(self.zeta))

    def _stepper(self, backend: Backend, p: StepProblem, x: torch.Tensor) -> Callable[[int], StepOutput]:
        """The chain's step ``i`` on ``x`` in place (a CUDA-graph replay when ``cuda_graph``)."""
        graphed = None
        if self.cuda_graph and self.schedule.num_steps > 1:
            from .graphs import GraphedStep

            graphed = GraphedStep(backend, p, x)

        def step(i: int) -> StepOutput:
            if graphed is not None and i > 0:
                return graphed.replay(i)
            return backend.step(p, x, i, final=(i == 0), in_place=True)

        return step

    def __repr__(self) -> str:
        return (f"DPS(operator={self.operator!r}, steps={self.schedule.num_steps}, zeta={self.zeta!r}, "
                f"sigma_n={self.sigma_n}, guidance={self.guidance!r}, backend={self.backend_name!r})")
