"""The engine every sampling method runs on: :class:`Engine`.

DPS (:mod:`dps_fast.sampler`) and MCG, PiGDM, DDRM (:mod:`dps_fast.methods`) are siblings: each is
a subclass of :class:`Engine` that adds its own hyperparameters and its own step. The engine owns
what they share:

* argument validation (model, schedule, operator, ``sigma_n``, the guidance scale ``zeta``,
  ``clip_x0``, ``variance``, backend and network options, the measurement noise model);
* the backend and the network wrapper (compile, autocast, channels_last, frozen weights);
* ``prepare`` of the operator and the measurement: the per-run
  :class:`~dps_fast.backends.StepProblem` and ``x_T`` from each sample's Philox seed;
* the chain loop (:func:`dps_fast.chain.run_chain`: seeds, progress, trajectory, callback, the
  divergence guard of :mod:`dps_fast.divergence`) and the :class:`~dps_fast.chain.DPSResult`;
* the explicit one-step API ``step(x_t, i, y, noise)`` used to check a method against its formula.

A method implements :meth:`Engine.advance` (one chain step on ``x`` in place) and may override
:meth:`Engine.setup` (per-run constants such as ``U^T y``), :meth:`Engine.init_state` (its own
``x_T``), :meth:`Engine.guidance_modes` and :meth:`Engine.hint`. A method states the engine
options it does not use in :attr:`Engine.unused_options`; passing one of them is a TypeError.

Example:
    >>> from dps_fast import NoiseSchedule, operators, priors
    >>> from dps_fast.methods import DDRM
    >>> prior = priors.GaussianPrior(torch.zeros(4), torch.eye(4))
    >>> sched = NoiseSchedule.linear(1000).respace(10)
    >>> ddrm = DDRM(prior.eps_model(sched), sched, operators.Identity(), sigma_n=0.1)
    >>> isinstance(ddrm, Engine), ddrm.sample(torch.ones(1, 1, 4), seed=0).samples.shape
    (True, torch.Size([1, 1, 1, 4]))
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Iterable, Optional, Sequence, TypedDict, Union

import torch
from torch import nn

from .backends import Backend, StepOutput, StepProblem, check_backend, get_backend
from .chain import DPSResult, run_chain
from .divergence import RUNAWAY_FACTOR, describe_value, zeta_hint
from .models.wrapper import ScoreNetwork, default_channels_last
from .noise import STREAM_INIT, philox_normal, seeds_from
from .operators.base import Operator
from .operators.poisson import NOISE_MODELS, PoissonNoise
from .schedule import VARIANCES, NoiseSchedule

logger = logging.getLogger(__name__)

__all__ = ["Engine", "EngineOptions", "ENGINE_OPTIONS", "Zeta", "check_zeta", "check_guidance", "GUIDANCE"]

#: The guidance modes of the fused DPS step (DPS and MCG).
GUIDANCE = ("squared", "normalized")

#: A guidance scale: one float, or one per measurement.
Zeta = Union[float, Sequence[float], torch.Tensor]


class EngineOptions(TypedDict, total=False):
    """The keyword options every method passes through to :class:`Engine` (see its Args)."""

    clip_x0: Optional[tuple[float, float]]
    variance: Optional[str]
    backend: str
    compile: Optional[Union[bool, dict]]
    autocast: Optional[torch.dtype]
    channels_last: Optional[bool]
    check_every: Optional[int]
    cuda_graph: bool
    checkpointing: Optional[bool]
    noise: Union[str, PoissonNoise]


#: Each engine option and its default (a method's ``**options`` are checked against this).
ENGINE_OPTIONS: dict[str, object] = {
    "clip_x0": None, "variance": None, "backend": "auto", "compile": None, "autocast": None,
    "channels_last": None, "check_every": None, "cuda_graph": False, "checkpointing": None, "noise": "gaussian",
}


def check_zeta(zeta: Zeta) -> Zeta:
    """``zeta`` if it is finite and ``>= 0`` (a float or one value per measurement), else a ValueError."""
    try:
        zt = torch.as_tensor(zeta, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"zeta: expected a finite number >= 0 (or one per measurement), got {describe_value(zeta)}") from None
    if not torch.isfinite(zt).all() or (zt < 0).any():
        raise ValueError(f"zeta: expected finite values >= 0, got {describe_value(zeta)}")
    return zeta


def check_guidance(guidance: Union[str, Sequence[str]], sigma_n: float, noise: Optional[PoissonNoise]) -> list[str]:
    """The list of guidance modes of ``guidance`` (one, or one per measurement), else a ValueError;
    "squared" divides by ``sigma_n^2`` and needs ``sigma_n > 0`` under Gaussian noise."""
    modes = [guidance] if isinstance(guidance, str) else list(guidance)
    bad = [m for m in modes if m not in GUIDANCE]
    if bad or not modes:
        raise ValueError(f"guidance: expected 'squared' or 'normalized' (or one per measurement), got {guidance!r}")
    if "squared" in modes and sigma_n <= 0 and noise is None:
        raise ValueError(f"sigma_n: 'squared' guidance divides by sigma_n^2 and needs sigma_n > 0, got {sigma_n}")
    return modes


def _as_y_error(exc: ValueError, y: torch.Tensor, operator: Operator) -> ValueError:
    """An operator's shape error met while checking ``y``, as an error about ``y`` (the operator
    names its own argument, ``x``, which the user did not pass)."""
    if str(exc).startswith("y:") or str(exc).startswith("input_shape:"):
        return exc
    return ValueError(f"y: shape {tuple(y.shape)} is not a measurement {operator!r} takes ({exc})")


def _as_row_param(value: Zeta, name: str, batch: int) -> torch.Tensor:
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


class Engine:
    """What every sampling method shares; a method is a subclass (see the module docstring).

    Args:
        model: ``eps(x_t, t)`` callable (an ``nn.Module`` or a function), ``t`` int64 ``[N]`` of
            training-schedule indices; returns ``[N, C, *S]`` or ``[N, 2C, *S]`` (learned variance).
        schedule: the :class:`NoiseSchedule` (possibly respaced) to sample with.
        operator: the forward model ``A`` (:mod:`dps_fast.operators`).
        sigma_n: measurement noise standard deviation, finite and >= 0.
        zeta: the method's guidance scale (a float or one per measurement; None for a method
            without one). Resolved per measurement by :meth:`resolve_zeta`, the one place that
            reads it.
        clip_x0: ``None`` or ``(lo, hi)`` to clamp x0hat; the gradient respects the clamp.
        variance: "fixed_small" (beta~, default), "fixed_large" (beta) or "learned_range" (the
            default when the model returns 2C channels).
        backend: "auto" | "reference" | "torch" | "triton" | "cuda".
        compile: ``torch.compile`` the network (default: on for CUDA ``nn.Module`` models); a dict
            turns it on with those ``torch.compile`` keyword arguments.
        autocast: run the network in ``torch.bfloat16``/``torch.float16``; the state stays float32.
        channels_last: run a 4-D network in channels_last memory format. None (auto): on for
            ``nn.Module`` models on CUDA with ``autocast`` bfloat16/float16 (cuDNN's tensor-core
            convolutions run NHWC natively), off on the CPU and without autocast.
        check_every: read the divergence flag every this many steps (a host sync); default: every
            step on CPU, only at the end on CUDA (the flag records the first bad step either way).
        cuda_graph: capture one step as a CUDA graph and replay it (methods that support it).
        checkpointing: switch the network's activation checkpointing on/off (models with
            ``set_checkpointing``, e.g. ADMUNet); None leaves the model as it is.
        noise: the measurement noise: "gaussian" (default), "poisson" or a
            :class:`~dps_fast.operators.PoissonNoise` (methods that support it).
    """

    #: Label of the progress bar and of messages.
    name = "engine"
    #: Engine options this method does not use; passing one with a non-default value is a TypeError.
    unused_options: tuple[str, ...] = ()
    #: Divergence rule of :mod:`dps_fast.divergence`: a chain whose RMS exceeds this many times the
    #: largest the schedule allows raises NonFiniteError. None on an instance turns only this check
    #: off (NaN/inf still raise), e.g. to compare backends' arithmetic on an untrained network.
    runaway_factor: Optional[float] = RUNAWAY_FACTOR

    def __init__(
        self, model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: NoiseSchedule,
        operator: Operator, *, sigma_n: float = 0.05, zeta: Optional[Zeta] = None,
        clip_x0: Optional[tuple[float, float]] = None, variance: Optional[str] = None,
        backend: str = "auto", compile: Optional[Union[bool, dict]] = None, autocast: Optional[torch.dtype] = None,
        channels_last: Optional[bool] = None, check_every: Optional[int] = None, cuda_graph: bool = False,
        checkpointing: Optional[bool] = None, noise: Union[str, PoissonNoise] = "gaussian",
    ) -> None:
        given = {"clip_x0": clip_x0, "variance": variance, "backend": backend, "compile": compile,
                 "autocast": autocast, "channels_last": channels_last, "check_every": check_every,
                 "cuda_graph": cuda_graph, "checkpointing": checkpointing, "noise": noise}
        for opt in self.unused_options:
            if given[opt] is not ENGINE_OPTIONS[opt] and given[opt] != ENGINE_OPTIONS[opt]:
                raise TypeError(f"{opt}: {type(self).__name__} does not use this option, got {opt}={given[opt]!r}")
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
        if zeta is not None:
            check_zeta(zeta)
        if not (isinstance(sigma_n, (int, float)) and not isinstance(sigma_n, bool) and math.isfinite(sigma_n)) \
                or sigma_n < 0:
            raise ValueError(f"sigma_n: expected a finite standard deviation >= 0, got {sigma_n!r}")
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

    # ---- what a method provides ---------------------------------------------------------------
    @classmethod
    def check_operator(cls, operator: Operator) -> None:
        """Raise a TypeError naming ``operator`` if this method cannot run it (before any work:
        ``reconstruct`` asks before it starts). Every operator by default."""

    def guidance_modes(self) -> list[str]:
        """The per-measurement guidance modes ("squared"/"normalized") of the fused DPS step; one
        mode for all or one per measurement. Methods without DPS guidance leave it empty."""
        return []

    def hint(self) -> str:
        """What a :class:`~dps_fast.NonFiniteError` message tells the user to change."""
        if self.zeta is not None:
            return zeta_hint(self.zeta)
        return f"the network's eps is not finite here ({self.name} has no guidance step to shrink)"

    def setup(self, backend: Backend, p: StepProblem) -> dict:
        """Per-run constants computed once (e.g. ``U^T y``), passed to every :meth:`advance`."""
        return {}

    def init_state(self, p: StepProblem, x: torch.Tensor, state: dict) -> None:
        """Turn the Philox ``x_T ~ N(0, I)`` of :meth:`prepare` into the method's ``x_T`` (in place)."""

    def advance(self, backend: Backend, p: StepProblem, x: torch.Tensor, i: int, state: dict,
                noise: Optional[torch.Tensor] = None, final: bool = False) -> StepOutput:  # pragma: no cover
        """One chain step at index ``i`` on ``x`` in place (``noise``: explicit ``z``, else Philox);
        ``final``: the update-free last step whose ``x0hat`` is the sample."""
        raise NotImplementedError

    def stepper(self, backend: Backend, p: StepProblem, x: torch.Tensor) -> Callable[[int], StepOutput]:
        """``step(i)`` of the chain on ``x`` in place (:data:`dps_fast.chain.Stepper`)."""
        state = self.setup(backend, p)
        self.init_state(p, x, state)
        return lambda i: self.advance(backend, p, x, i, state, final=(i == 0))

    # ---- set-up ---------------------------------------------------------------------------------
    def backend(self, device: torch.device) -> Backend:
        """The backend for tensors on ``device`` (chosen once per device)."""
        be = self._backends.get(device)
        if be is None:
            be = get_backend(self.backend_name, device)
            self._backends[device] = be
            logger.info("%s backend for %s: %s", self.name, device, be.name)
        return be

    def network(self, device: torch.device) -> ScoreNetwork:
        """The wrapped network (compile, autocast, channels_last), built once."""
        if self._net is None:
            comp = self.compile
            if comp is None:
                comp = device.type == "cuda" and isinstance(self.model, nn.Module)
            self._net = ScoreNetwork(self.model, compile=bool(comp), autocast=self.autocast,
                                     channels_last=default_channels_last(self.channels_last, self.autocast,
                                                                         device, self.model),
                                     compile_options=comp if isinstance(comp, dict) else None)
        return self._net

    def resolve_zeta(self, batch: int) -> torch.Tensor:
        """The guidance scale of each of ``batch`` measurements, ``[batch]`` float64 (zeros for a
        method without one): the one place that turns ``zeta`` into numbers."""
        if self.zeta is None:
            return torch.zeros(batch, dtype=torch.float64)
        return _as_row_param(self.zeta, "zeta", batch)

    def check_y(self, y: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype]:
        """Validate a measurement batch ``y`` ``[B, *out]``; returns ``(x_shape, dtype)``."""
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
        try:
            x_shape = self.operator.input_shape(tuple(y.shape))
            expected = self.operator.output_shape(x_shape)
        except ValueError as exc:
            raise _as_y_error(exc, y, self.operator) from None
        if tuple(expected) != tuple(y.shape):
            raise ValueError(f"y: expected shape {tuple(expected)} for {self.operator!r}, got {tuple(y.shape)}")
        try:  # the state this y implies must be one A takes: else y is wrong (e.g. its rank), not x
            with torch.no_grad():
                self.operator.forward(torch.zeros(x_shape, dtype=dtype, device=y.device))
        except ValueError as exc:
            raise _as_y_error(exc, y, self.operator) from None
        if isinstance(self.model, nn.Module):
            p = next(iter(self.model.parameters()), None)
            if p is not None and p.device != y.device:
                raise ValueError(f"y: expected tensors on the model's device {p.device}, got {y.device}")
            if p is not None and self.autocast is None and p.is_floating_point() and p.dtype != dtype:
                raise TypeError(f"y: the model's weights are {p.dtype} but y is {dtype}; cast one of them "
                                f"or pass autocast=")
        return x_shape, dtype

    def problem(self, y: torch.Tensor, num_samples: int, seeds: torch.Tensor, x_shape: tuple[int, ...],
                dtype: torch.dtype) -> StepProblem:
        """The :class:`StepProblem` of ``y`` (checked by :meth:`check_y`) with ``num_samples``
        rows per measurement and the ``[B * num_samples]`` seeds."""
        b, dev = y.shape[0], y.device
        n = b * num_samples
        modes = self.guidance_modes()
        if len(modes) not in (0, 1, b):
            raise ValueError(f"guidance: expected one mode or one per measurement ({b}), got {len(modes)}")
        normalized = (torch.tensor([m == "normalized" for m in modes]).expand(b) if modes
                      else torch.zeros(b, dtype=torch.bool))
        zeta = self.resolve_zeta(b)
        y_rep = y.repeat_interleave(num_samples, 0) if num_samples > 1 else y
        k = self.schedule.num_steps
        t = self.schedule.timesteps.to(dev).view(k, 1).expand(k, n).contiguous()
        net = self.network(dev)
        try:
            if self.noise is None:
                meas = self.operator.prepare(y_rep)
            else:
                meas = self.operator.prepare(y_rep, weight=self.noise.weight(y_rep))
        except ValueError as exc:
            raise _as_y_error(exc, y, self.operator) from None
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

    # ---- public API -------------------------------------------------------------------------------
    def prepare(self, y: torch.Tensor, num_samples: int = 1, generator: Optional[torch.Generator] = None,
                seed: Optional[int] = None, seeds: Optional[torch.Tensor] = None) -> tuple[StepProblem, torch.Tensor]:
        """Validate ``y`` and build what every step of one run needs: ``(problem, x_T)``.

        ``x_T`` is ``[B * num_samples, *x]`` drawn from each row's Philox seed (before the method's
        :meth:`init_state`). ``sample`` calls this; benchmarks and CUDA-graph capture use it to
        drive ``backend(device).step`` directly.
        """
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples: expected an int >= 1, got {num_samples!r}")
        x_shape, dtype = self.check_y(y)
        b = y.shape[0]
        n = b * num_samples
        if seeds is not None:
            if not isinstance(seeds, torch.Tensor) or seeds.dtype != torch.int64 or seeds.shape != (b, num_samples):
                raise ValueError(f"seeds: expected an int64 tensor [{b}, {num_samples}], got "
                                 f"{getattr(seeds, 'dtype', type(seeds))} {tuple(getattr(seeds, 'shape', ()))}")
            seeds = seeds.cpu()
        else:
            seeds = seeds_from(generator, (b, num_samples), seed)  # sample (b, s): f(seed, b, s) only
        p = self.problem(y, num_samples, seeds, x_shape, dtype)
        numel = math.prod(x_shape[1:])
        x = philox_normal(p.seeds, numel, self.schedule.num_steps, STREAM_INIT, dtype)
        return p, x.view((n,) + tuple(x_shape[1:]))

    def step_problem(self, x_t: torch.Tensor, i: int, y: torch.Tensor, noise: torch.Tensor,
                     num_samples: int = 1) -> StepProblem:
        """Validate the arguments of :meth:`step` and build the problem of one explicit step
        (seeds 0: the noise is given)."""
        x_shape, dtype = self.check_y(y)
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
        return self.problem(y, num_samples, torch.zeros(n, dtype=torch.int64), x_shape, dtype)

    def step(self, x_t: torch.Tensor, i: int, y: torch.Tensor, noise: torch.Tensor,
             num_samples: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """One step at index ``i`` with explicit ``noise``: returns ``(x_{t-1}, x0hat)``.

        ``x_t`` and ``noise`` are ``[B * num_samples, *x]`` (rows of one measurement adjacent),
        ``y`` ``[B, *out]``; ``x_t`` is not modified. To check a method against its formula.
        """
        p = self.step_problem(x_t, i, y, noise, num_samples)
        backend = self.backend(y.device)
        state = self.setup(backend, p)
        x = x_t.detach().clone()
        with p.net.frozen():
            out = self.advance(backend, p, x, i, state, noise=noise)
        return out.x, out.x0hat

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

        Returns:
            :class:`~dps_fast.DPSResult`: ``samples`` ``[B, S, *x]``, ``nfe`` forward passes and
            VJPs per chain.
        """
        return run_chain(self, self.stepper, y, num_samples, generator=generator, seed=seed, seeds=seeds,
                         record=record, progress=progress, callback=callback, desc=self.name, hint=self.hint())

    def extra_repr(self) -> str:
        """The method's own settings for ``repr`` (after the shared ones)."""
        return ""

    def __repr__(self) -> str:
        extra = self.extra_repr()
        return (f"{type(self).__name__}(operator={self.operator!r}, steps={self.schedule.num_steps}, "
                f"sigma_n={self.sigma_n}{', ' + extra if extra else ''}, backend={self.backend_name!r})")
