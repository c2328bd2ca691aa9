"""The one list of sampling methods: name -> class, its hyperparameter and that parameter's default.

``dps-fast reconstruct --method``, ``dps-fast explore --method``, ``dps-fast fidelity`` and the
README's method list all read :data:`METHODS`. Adding a method is one module (a subclass of
:class:`~dps_fast.engine.Engine`) plus one :func:`register` call here.

Example:
    >>> [m.key for m in METHODS.values()]
    ['dps', 'mcg', 'pigdm', 'ddrm']
    >>> spec = get_method("PiGDM")
    >>> spec.name, spec.param, spec.default
    ('PiGDM', 'zeta', 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..engine import Engine
from ..operators.base import Operator
from ..sampler import DPS
from ..schedule import NoiseSchedule
from .ddrm import DDRM
from .mcg import MCG
from .pigdm import PiGDM

__all__ = ["MethodSpec", "METHODS", "register", "get_method", "method_names", "markdown_table"]


@dataclass(frozen=True)
class MethodSpec:
    """A sampling method as the commands see it.

    Attributes:
        name: display name ("PiGDM"), also the fidelity table's.
        cls: the :class:`~dps_fast.engine.Engine` subclass.
        param: the hyperparameter a scan varies (``zeta`` or ``eta``), a keyword of ``cls``.
        default: that hyperparameter's default for an image run (``dps-fast reconstruct``).
        scan: ``(lo, hi, log)``: the range ``dps-fast explore`` scans on images (log-spaced when
            ``log``).
        guided: takes DPS's ``guidance`` ("squared"/"normalized").
        summary: one line for the README and ``--help``.
    """

    name: str
    cls: type
    param: str
    default: float
    scan: tuple[float, float, bool]
    guided: bool
    summary: str

    @property
    def key(self) -> str:
        """The command-line name (``--method pigdm``)."""
        return self.name.lower()

    def build(self, model: Callable, schedule: NoiseSchedule, operator: Operator, value: float,
              **kwargs: Any) -> Engine:
        """``cls(model, schedule, operator, **{param: value}, **kwargs)``."""
        return self.cls(model, schedule, operator, **{self.param: value}, **kwargs)


#: Every method by its command-line name, in the order the commands list them.
METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to :data:`METHODS` (a ValueError if its name is taken)."""
    if spec.key in METHODS:
        raise ValueError(f"name: a method {spec.name!r} is already registered")
    if not (isinstance(spec.cls, type) and issubclass(spec.cls, Engine)):
        raise TypeError(f"cls: expected a dps_fast.engine.Engine subclass, got {spec.cls!r}")
    METHODS[spec.key] = spec
    return spec


def method_names() -> tuple[str, ...]:
    """The command-line names, e.g. for ``choices=``."""
    return tuple(METHODS)


def get_method(name: str) -> MethodSpec:
    """The method called ``name`` (any case: "dps", "PiGDM"), else a ValueError listing them."""
    spec = METHODS.get(str(name).lower()) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {name!r}")
    return spec


register(MethodSpec("DPS", DPS, "zeta", 1.0, (0.03, 3.0, True), True,
                    "Diffusion Posterior Sampling: the likelihood gradient through Tweedie's x0hat"))
register(MethodSpec("MCG", MCG, "zeta", 1.0, (0.03, 3.0, True), True,
                    "Manifold Constrained Gradients: the DPS step, then a projection onto the noised measurement set"))
register(MethodSpec("PiGDM", PiGDM, "zeta", 1.0, (0.1, 10.0, True), False,
                    "pseudo-inverse guidance: the Gaussian likelihood of x0hat with variance 1 - abar_t"))
register(MethodSpec("DDRM", DDRM, "eta", 0.85, (0.0, 1.0, False), False,
                    "Denoising Diffusion Restoration Models: an SVD-space update, no network VJP"))


def markdown_table() -> str:
    """The README's method list (between ``<!-- methods:begin -->`` and ``<!-- methods:end -->``),
    generated from :data:`METHODS`; a test keeps the README equal to it."""
    rows = ["| `--method` | class | hyperparameter (default) | explore's image scan | what it is |",
            "| --- | --- | --- | --- | --- |"]
    for key, m in METHODS.items():
        lo, hi, log = m.scan
        rows.append(f"| `{key}` | `{m.cls.__name__}` | `{m.param}` ({m.default:g}) | {lo:g} .. {hi:g}"
                    f"{' (log)' if log else ''} | {m.summary} |")
    return "\n".join(rows)
