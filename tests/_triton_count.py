"""A pytest plugin that counts the Triton kernel specializations a test session would compile.

Load it with ``-p tests._triton_count`` on a CPU session (Triton's interpreter); it writes
``{"total": N, "kernels": {name: [key, ...]}}`` to ``$DPS_TRITON_COUNT_OUT`` at the end.

On a GPU, Triton compiles one binary (and builds one launcher) per kernel and *specialization
key*; the interpreter compiles nothing, so this plugin computes that key for every launch
instead, the way ``triton.runtime.jit`` does: the values of the ``tl.constexpr`` parameters,
the dtype of each tensor and whether its address is 16-byte aligned, for each integer whether it
is 1, divisible by 16 and fits 32 bits (parameters in ``do_not_specialize`` only by width),
``None`` arguments, and the launch options (``num_warps``, ``num_stages``). Distinct keys are
distinct compiles.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SPECS: dict[str, set[tuple]] = {}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _int_key(v: int, specialize: bool) -> tuple:
    width = "i32" if -(2**31) <= v < 2**31 else "i64"
    if not specialize:
        return ("i", width)
    return ("i", width, "one" if v == 1 else "div16" if v % 16 == 0 else "")


def specialization_key(fn: Any, args: tuple, kwargs: dict[str, Any]) -> tuple:
    """The key under which Triton's JIT would cache this launch of ``fn`` (an InterpretedFunction)."""
    sig = inspect.signature(fn.fn)
    params = list(sig.parameters.values())
    dns = set(fn.kwargs.get("do_not_specialize") or ())
    bound = dict(zip([p.name for p in params], args))
    bound.update({k: v for k, v in kwargs.items() if k in sig.parameters})
    key: list[tuple] = []
    for i, p in enumerate(params):
        v = bound.get(p.name, p.default)
        if "constexpr" in str(p.annotation):
            key.append(("c", p.name, repr(v)))
        elif isinstance(v, torch.Tensor):
            key.append(("t", str(v.dtype), v.data_ptr() % 16 == 0))
        elif isinstance(v, bool):
            key.append(("b",))
        elif isinstance(v, int):
            key.append(_int_key(v, p.name not in dns and i not in dns))
        elif isinstance(v, float):
            key.append(("f",))
        elif v is None:
            key.append(("none",))
        else:
            key.append((type(v).__name__,))
    key.append(tuple((k, kwargs[k]) for k in _LAUNCH_OPTIONS if k in kwargs))
    return tuple(key)


def pytest_configure(config: Any) -> None:
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        SPECS.setdefault(self.fn.__name__, set()).add(specialization_key(self, args, kwargs))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    path = os.environ.get("DPS_TRITON_COUNT_OUT")
    if path:
        kernels = {name: sorted(map(repr, keys)) for name, keys in sorted(SPECS.items())}
        with open(path, "w") as f:
            json.dump({"total": sum(len(k) for k in kernels.values()), "kernels": kernels,
                       "exitstatus": int(exitstatus)}, f, indent=1)
