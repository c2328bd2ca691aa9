"""What the methods beside DPS share: DPS's set-up and the one chain loop.

A method holds a :class:`~dps_fast.sampler.DPS` *engine* built from the same arguments. The engine
validates the model, schedule, operator, ``y`` and the seeds, wraps the network (compile, autocast,
frozen weights), chooses the backend and draws ``x_T`` from the Philox stream; the method's
``sample`` is :func:`dps_fast.chain.run_chain` with the method's own step. So a method's samples
are reproducible per seed exactly as DPS's are, and nothing of the DPS step path changes.
"""

from __future__ import annotations

from types import ModuleType
from typing import Callable, Iterable, Optional, Union

import torch

from ..backends import Backend, FusedBackend, StepOutput, StepProblem, torch_ops
from ..chain import DPSResult, run_chain
from ..operators.base import LinearOperator, residual_norm2
from ..sampler import DPS
from ..schedule import NoiseSchedule

__all__ = ["ChainMethod", "ops_of", "check_float", "residual"]


def ops_of(backend: Backend) -> ModuleType:
    """The fused op set of ``backend`` (``torch_ops`` for the autograd reference backend, whose
    pure-torch ops are the definitions the kernels are tested against)."""
    return backend.ops if isinstance(backend, FusedBackend) else torch_ops


def check_float(value: object, name: str, lo: float = 0.0, hi: float = float("inf")) -> float:
    """``value`` as a float in ``[lo, hi]``, else a ValueError naming ``name``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    v = float(value) if ok else float("nan")
    if not (lo <= v <= hi):
        raise ValueError(f"{name}: expected a float in [{lo}, {hi}], got {value!r}")
    return v


def residual(p: StepProblem, x0hat: torch.Tensor) -> torch.Tensor:
    """``||A x0hat - y||^2`` per row ``[N]``."""
    return residual_norm2(p.operator.forward(x0hat) - p.meas.y)


class ChainMethod:
    """Base of MCG, PiGDM and DDRM: ``sample``/``step`` with DPS's signatures and result type.

    A subclass implements :meth:`_step` (one chain step on ``x`` in place) and may override
    :meth:`_setup` (per-run constants such as ``U^T y``) and :meth:`_init_x` (``x_T``, e.g. DDRM's).
    """

    name = "method"

    def __init__(self, engine: DPS) -> None:
        self._engine = engine

    # ---- what the engine owns ---------------------------------------------------------------
    @property
    def model(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return self._engine.model

    @property
    def schedule(self) -> NoiseSchedule:
        return self._engine.schedule

    @property
    def operator(self) -> LinearOperator:
        return self._engine.operator

    @property
    def sigma_n(self) -> float:
        return self._engine.sigma_n

    def backend(self, device: torch.device) -> Backend:
        return self._engine.backend(device)

    def prepare(self, y: torch.Tensor, num_samples: int = 1, generator: Optional[torch.Generator] = None,
                seed: Optional[int] = None, seeds: Optional[torch.Tensor] = None) -> tuple[StepProblem, torch.Tensor]:
        """DPS's ``prepare``: validate ``y``, build the per-run problem and draw ``x_T`` (before :meth:`_setup`)."""
        return self._engine.prepare(y, num_samples, generator=generator, seed=seed, seeds=seeds)

    # ---- the method ------------------------------------------------------------------------
    def _setup(self, backend: Backend, p: StepProblem) -> dict:
        """Per-run constants computed once (e.g. ``U^T y``), passed to every :meth:`_step`."""
        return {}

    def _init_x(self, p: StepProblem, x: torch.Tensor, state: dict) -> None:
        """Turn the Philox ``x_T ~ N(0, I)`` of ``prepare`` into the method's ``x_T`` (in place)."""

    def _step(self, backend: Backend, p: StepProblem, x: torch.Tensor, i: int, state: dict,
              noise: Optional[torch.Tensor] = None, final: bool = False) -> StepOutput:  # pragma: no cover
        raise NotImplementedError

    def _hint(self) -> str:  # pragma: no cover
        """What the :class:`~dps_fast.NonFiniteError` message tells the user to change."""
        raise NotImplementedError

    def _stepper(self, backend: Backend, p: StepProblem, x: torch.Tensor) -> Callable[[int], StepOutput]:
        state = self._setup(backend, p)
        self._init_x(p, x, state)
        return lambda i: self._step(backend, p, x, i, state, final=(i == 0))

    # ---- public API (DPS's) ------------------------------------------------------------------
    def sample(
        self, y: torch.Tensor, num_samples: int = 1, generator: Optional[torch.Generator] = None,
        seed: Optional[int] = None, seeds: Optional[torch.Tensor] = None,
        record: Optional[Union[Iterable[int], str]] = None, progress: bool = False,
        callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], Optional[bool]]] = None,
    ) -> DPSResult:
        """Draw ``num_samples`` posterior samples per measurement; arguments and result as :meth:`DPS.sample`.

        ``samples`` is ``[B, S, *x]``; ``nfe`` counts forward passes and VJPs per chain.
        """
        return run_chain(self._engine, self._stepper, y, num_samples, generator=generator, seed=seed,
                         seeds=seeds, record=record, progress=progress, callback=callback, desc=self.name,
                         hint=self._hint())

    def _explicit(self, x_t: torch.Tensor, i: int, y: torch.Tensor, noise: torch.Tensor,
                  num_samples: int) -> tuple[StepProblem, dict]:
        """Validate the arguments of ``step`` (:meth:`DPS.step_problem`) and build its problem and state."""
        p = self._engine.step_problem(x_t, i, y, noise, num_samples)
        return p, self._setup(self.backend(y.device), p)

    def step(self, x_t: torch.Tensor, i: int, y: torch.Tensor, noise: torch.Tensor,
             num_samples: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """One step at index ``i`` with explicit ``noise``: returns ``(x_{t-1}, x0hat)``.

        ``x_t`` and ``noise`` are ``[B * num_samples, *x]`` (rows of one measurement adjacent), ``y``
        ``[B, *out]``; ``x_t`` is not modified. As :meth:`DPS.step`, to check against the formula.
        """
        p, state = self._explicit(x_t, i, y, noise, num_samples)
        x = x_t.detach().clone()
        with p.net.frozen():
            out = self._step(self.backend(y.device), p, x, i, state, noise=noise)
        return out.x, out.x0hat

    def __repr__(self) -> str:
        e = self._engine
        return (f"{type(self).__name__}(operator={e.operator!r}, steps={e.schedule.num_steps}, "
                f"sigma_n={e.sigma_n}, backend={e.backend_name!r})")
