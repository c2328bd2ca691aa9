"""(c) the schemas in binding.cpp match the fake kernels registered from Python (names, argument
names, count), and those fakes pass torch.library.opcheck / torch.compile(fullgraph=True)
against a CPU implementation built from torch_ops under a private namespace.

Part of what can be checked of the CUDA extension without a GPU (CI has nvcc but no device);
the other parts are the sibling tests/cuda/test_csrc_*.py files.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch

from dps_fast import _cuda
from dps_fast.backends import cuda_ops, torch_ops
from dps_fast.noise import philox_normal
from dps_fast.schedule import Coef
from tests.cuda.csrc_build import CSRC, cpu_philox_words, normals_from_words, schemas_from_source, update_inputs



def _schema_args(schema: str) -> list[str]:
    return [a.name for a in torch._C.parse_schema(f"dps_fast::{schema}").arguments]


def test_schema_ops_match_fakes_and_impls() -> None:
    schemas = schemas_from_source()
    assert set(schemas) == set(_cuda.OP_NAMES) == set(_cuda.FAKES)
    impls = re.findall(r'm\.impl\("(\w+)"', (CSRC / "binding.cpp").read_text())
    assert sorted(impls) == sorted(_cuda.OP_NAMES)
    assert 'set_python_module("dps_fast._cuda")' in (CSRC / "binding.cpp").read_text()


@pytest.mark.parametrize("op", _cuda.OP_NAMES)
def test_schema_args_match_fake_signature(op: str) -> None:
    schema_args = _schema_args(schemas_from_source()[op])
    fake_args = list(inspect.signature(_cuda.FAKES[op]).parameters)
    assert fake_args == schema_args


def test_wrappers_keep_torch_ops_signatures() -> None:
    for name in ("dps_update", "spectral_residual", "blur_normal_residual", "tweedie", "apply_clip_mask",
                 "prep_elementwise"):
        ref = inspect.signature(getattr(torch_ops, name)).parameters
        got = inspect.signature(getattr(cuda_ops, name)).parameters
        positional = [p for p in got.values() if p.kind != inspect.Parameter.KEYWORD_ONLY]
        assert [p.name for p in positional] == list(ref), name
        assert [p.default for p in positional] == [p.default for p in ref.values()], name


def test_coef_columns_mirror_schedule() -> None:
    text = (CSRC / "dps_kernels.cuh").read_text()
    cpp = dict(re.findall(r"constexpr int (\w+) = (\d+);", text))
    py = {k: v for k, v in vars(Coef).items() if k.isupper()}
    assert {k: int(v) for k, v in cpp.items()} == py


# A CPU implementation of each schema (from torch_ops), under a private namespace, so opcheck and
# torch.compile can exercise the schemas + fake kernels on this machine.
NS = "dps_fast_cpucheck"
_VAR = {0: "fixed_small", 1: "fixed_large", 2: "learned_range"}


def _cpu_dps_update(x, eps, w, u, gscale, coefs, step, clip, lo, hi, variance, v, seeds, noise, out, x0hat_out):
    c = (lo, hi) if clip else None
    if x0hat_out is not None:
        x0hat_out.copy_(torch_ops.tweedie(x, eps, coefs, c))
    torch_ops.dps_update(x, eps, w, u, gscale, coefs, step, c, _VAR[variance], v, seeds, noise, out=out)


def _cpu_spectral_residual(X, K, Y, n_last):
    # torch_ops' formula with conj(K) spelled out: inside a Python op implementation run by
    # torch.compile's aot_eager, torch 2.13 ignores the lazy conjugate bit of K.conj().
    R = K * X - Y
    W = torch.complex(K.real, -K.imag) * R
    npix = n_last * int(torch.tensor(X.shape[2:-1]).prod()) if X.dim() > 3 else n_last
    wts = torch_ops.parseval_weights(n_last, X.device, X.real.dtype)
    return W, (R.real.square() + R.imag.square()).mul(wts).flatten(1).sum(1) / npix


def _cpu_blur_normal_residual(x0hat, K, Y, ndim):
    dims = tuple(range(-ndim, 0))
    W, rnorm2 = _cpu_spectral_residual(torch.fft.rfftn(x0hat, dim=dims), K, Y, x0hat.shape[-1])
    return torch.fft.irfftn(W, s=x0hat.shape[-ndim:], dim=dims), rnorm2


_CPU_IMPLS = {
    "dps_update": _cpu_dps_update,
    "spectral_residual": _cpu_spectral_residual,
    "blur_normal_residual": _cpu_blur_normal_residual,
    "philox_normal": lambda seeds, numel, step, stream, dtype: philox_normal(seeds, numel, step, stream, dtype),
    "philox_words": cpu_philox_words,
}


@pytest.fixture(scope="module")
def cpu_ops():
    lib = torch.library.Library(NS, "FRAGMENT")
    for name, schema in schemas_from_source().items():
        lib.define(schema)
        lib.impl(name, _CPU_IMPLS[name], "CPU")
        torch.library.register_fake(f"{NS}::{name}", _cuda.FAKES[name], lib=lib)
    yield getattr(torch.ops, NS)
    lib._destroy()


def test_opcheck_schemas_with_fakes(cpu_ops) -> None:
    a = update_inputs()
    out, x0 = torch.full_like(a["x"], float("nan")), torch.empty_like(a["x"])
    torch.library.opcheck(cpu_ops.dps_update.default, (
        a["x"], a["eps"], a["w"], a["u"], a["gscale"], a["coefs"], 7, True, -1.0, 1.0, 2, a["v"], a["seeds"], None,
        out, x0))
    torch.library.opcheck(cpu_ops.dps_update.default, (
        a["x"], a["eps"], a["w"], a["u"], a["gscale"], a["coefs"], 7, False, 0.0, 0.0, 0, None, None, a["noise"],
        out, None))
    g = torch.Generator().manual_seed(1)
    X = torch.randn(3, 2, 4, 3, dtype=torch.complex128, generator=g)
    torch.library.opcheck(cpu_ops.spectral_residual.default,
                          (X, torch.randn(4, 3, dtype=torch.complex128, generator=g), torch.randn_like(X), 5))
    x0 = torch.randn(3, 2, 4, 5, dtype=torch.float64, generator=g)
    K = torch.fft.rfftn(torch.randn(4, 5, dtype=torch.float64, generator=g))
    Y = torch.fft.rfftn(torch.randn_like(x0), dim=(-2, -1))
    torch.library.opcheck(cpu_ops.blur_normal_residual.default, (x0, K, Y, 2))
    for got, want in zip(cpu_ops.blur_normal_residual(x0, K, Y, 2), torch_ops.blur_normal_residual(x0, K, Y, 2)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)  # the CPU stand-in is torch_ops
    torch.library.opcheck(cpu_ops.philox_normal.default, (a["seeds"], 11, 4, 0, torch.float32))
    torch.library.opcheck(cpu_ops.philox_words.default, (a["seeds"], 11, 4, 1))


def test_compile_fullgraph_through_fakes(cpu_ops) -> None:
    """A DPS-like step calling the ops traces with torch.compile(fullgraph=True)."""
    torch._dynamo.reset()
    a = update_inputs(torch.float32, shape=(1, 4, 6))
    K = torch.fft.rfftn(torch.randn(4, 6))
    Y = torch.fft.rfftn(torch.randn_like(a["x"]), dim=(-2, -1))

    def step(x, eps, u, gscale, coefs, seeds):
        x0 = torch_ops.tweedie(x, eps, coefs, (-1.0, 1.0))
        w, rnorm2 = cpu_ops.blur_normal_residual(x0, K, Y, 2)
        out = torch.empty_like(x)
        cpu_ops.dps_update(x, eps, w, u, gscale / rnorm2.sqrt(), coefs, 5, True, -1.0, 1.0, 1, None, seeds, None,
                           out, None)
        return out

    args = (a["x"], a["eps"], a["u"], a["gscale"], a["coefs"], a["seeds"])
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    torch.testing.assert_close(got, step(*args), rtol=1e-5, atol=1e-5)



def test_philox_words_reference_matches_noise(cpu_ops) -> None:
    """The CPU word reference the GPU test compares against reproduces philox_normal's draws."""
    seeds = torch.tensor([5, 2**33 + 1], dtype=torch.int64)
    w = cpu_ops.philox_words(seeds, 3, 3, 0)  # 3 calls: elements 0..11
    z = normals_from_words(w, 9)
    torch.testing.assert_close(z, cpu_ops.philox_normal(seeds, 9, 3, 0, torch.float64), rtol=0, atol=1e-12)


