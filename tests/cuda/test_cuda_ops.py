"""The CUDA extension's ops against their pure-torch contract (dps_fast.backends.torch_ops).

GPU only: every test is skipped without a CUDA device (tests/cuda/test_csrc_*.py cover
what a GPU-less machine can check, including the kernels' thread bodies emulated on the CPU).
Outputs are poisoned with NaN before a kernel runs, so an element that is never written fails.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch

from dps_fast import _cuda
from dps_fast.backends import cuda_ops, torch_ops
from dps_fast.noise import philox4x32, philox_normal
from dps_fast.schedule import NoiseSchedule
from tests.conftest import TOL, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = torch.device("cuda")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
_VAR_CODE = {"fixed_small": 0, "fixed_large": 1, "learned_range": 2}
SHAPES = {"1x1x1": (1, 1, 1), "1x1x37": (1, 1, 37), "7x3x33x17": (7, 3, 33, 17)}
BLUR_CASES = {"1x1x1-1d": ((1, 1, 1), 1), "1x1x37-1d": ((1, 1, 37), 1), "7x3x33x17-2d": ((7, 3, 33, 17), 2),
              "2x3x16x16-2d": ((2, 3, 16, 16), 2), "1x2x4x6x5-3d": ((1, 2, 4, 6, 5), 3)}
SEEDS = [0, 1, 12345, 2**40 + 5, 2**62 - 1, 977, 31]


@pytest.fixture(scope="module", autouse=True)
def ext():
    mod = _cuda.load_extension()
    if mod is None:
        pytest.skip("the CUDA extension is unavailable here (see the dps_fast._cuda warning)")
    return mod


def _poison_allocator(nbytes: int) -> None:
    """Leave NaN-filled blocks in the caching allocator, so torch.empty inside an op returns NaNs."""
    blocks = [torch.full((max(nbytes, 512) // 4 + 64,), float("nan"), device=DEV) for _ in range(4)]
    del blocks


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def _update_case(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> dict:
    g = _gen(seed + sum(shape))
    n = shape[0]
    r = lambda s=1.0: (torch.randn(shape, generator=g, device=DEV, dtype=torch.float64) * s).to(dtype)  # noqa: E731
    # coefficients in the kernels' arithmetic type (float32 for 16-bit states), as the binding requires
    table = NoiseSchedule.linear(1000).respace(50).table(torch.float64 if dtype == torch.float64 else torch.float32, DEV)
    return dict(x=r(1.5), eps=r(), w=r(0.3), u=r(0.3), v=r(0.5).clamp(-1, 1), noise=r(),
                gscale=torch.rand(n, generator=g, device=DEV, dtype=torch.float64).to(dtype),
                seeds=torch.tensor((SEEDS * 2)[:n], dtype=torch.int64, device=DEV), coefs=table[23])


def _update_args(a: dict, clip, variance: str, use_noise: bool) -> tuple:
    return (a["x"], a["eps"], a["w"], a["u"], a["gscale"], a["coefs"], 23, clip, variance,
            a["v"] if variance == "learned_range" else None, None if use_noise else a["seeds"],
            a["noise"] if use_noise else None)


def _op_update_args(a: dict, clip, variance: str, use_noise: bool, out: torch.Tensor,
                    x0hat_out: Optional[torch.Tensor]) -> tuple:
    lo, hi = clip if clip is not None else (0.0, 0.0)
    gs = a["gscale"].to(torch.float64 if a["x"].dtype == torch.float64 else torch.float32)
    return (a["x"], a["eps"], a["w"], a["u"], gs, a["coefs"], 23, clip is not None, lo, hi, _VAR_CODE[variance],
            a["v"] if variance == "learned_range" else None, None if use_noise else a["seeds"],
            a["noise"] if use_noise else None, out, x0hat_out)


def _spectral_case(dtype: torch.dtype, n: int, c: int, f: tuple[int, ...], seed: int = 0):
    g = _gen(seed + n * 7 + f[-1])
    X = torch.randn(n, c, *f, dtype=dtype, device=DEV, generator=g)
    K = torch.randn(*f, dtype=dtype, device=DEV, generator=g)
    Y = torch.randn(n, c, *f, dtype=dtype, device=DEV, generator=g)
    return X, K, Y


def _blur_case(dtype: torch.dtype, shape: tuple[int, ...], ndim: int, seed: int = 0):
    g = _gen(seed + len(shape) * 13 + shape[-1])
    dims = tuple(range(-ndim, 0))
    x0 = torch.randn(shape, dtype=dtype, device=DEV, generator=g)
    kernel = torch.rand(shape[-ndim:], dtype=dtype, device=DEV, generator=g)
    K = torch.fft.rfftn(kernel / kernel.sum())  # a real kernel: Hermitian-consistent like the operator's
    Y = torch.fft.rfftn(torch.randn(shape, dtype=dtype, device=DEV, generator=g), dim=dims)
    return x0, K, Y


def _words_reference(seeds: torch.Tensor, numel: int, step: int, stream: int) -> torch.Tensor:
    m32 = 0xFFFFFFFF
    s = seeds.cpu()
    k0, k1 = (s & m32).unsqueeze(1), ((s >> 32) & m32).unsqueeze(1)
    full = lambda v: torch.full((1, 1), v, dtype=torch.int64)  # noqa: E731
    words = philox4x32(torch.arange(numel).unsqueeze(0), full(step & m32), full(stream & m32), full(0), k0, k1)
    return torch.stack(torch.broadcast_tensors(*words), -1)


# ---- opcheck ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_opcheck_dps_update(dtype) -> None:
    a = _update_case(dtype, (3, 2, 5, 7))
    for variance, use_noise, x0 in (("learned_range", False, True), ("fixed_small", True, False)):
        out = torch.full_like(a["x"], float("nan"))
        x0hat = torch.full_like(a["x"], float("nan")) if x0 else None
        torch.library.opcheck(torch.ops.dps_fast.dps_update.default,
                              _op_update_args(a, (-1.0, 1.0), variance, use_noise, out, x0hat))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=["c64", "c128"])
def test_opcheck_spectral_residual(dtype) -> None:
    X, K, Y = _spectral_case(dtype, 3, 2, (8, 5))
    torch.library.opcheck(torch.ops.dps_fast.spectral_residual.default, (X, K, Y, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_opcheck_blur_normal_residual(dtype) -> None:
    x0, K, Y = _blur_case(dtype, (2, 3, 8, 6), 2)
    torch.library.opcheck(torch.ops.dps_fast.blur_normal_residual.default, (x0, K, Y, 2))


def test_opcheck_noise_ops() -> None:
    seeds = torch.tensor(SEEDS, dtype=torch.int64, device=DEV)
    torch.library.opcheck(torch.ops.dps_fast.philox_normal.default, (seeds, 33, 4, 0, torch.float32))
    torch.library.opcheck(torch.ops.dps_fast.philox_words.default, (seeds, 33, 4, 1))


# ---- dps_update vs torch_ops ---------------------------------------------------------------------
@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("use_noise", [False, True], ids=["philox", "noise"])
@pytest.mark.parametrize("clip", [None, (-1.0, 1.0)], ids=["noclip", "clip"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_dps_update_matches_torch_ops(dtype, shape, clip, use_noise, variance) -> None:
    a = _update_case(dtype, shape)
    out = torch.full_like(a["x"], float("nan"))
    x0hat = torch.full_like(a["x"], float("nan"))
    got = cuda_ops.dps_update(*_update_args(a, clip, variance, use_noise), out=out, x0hat_out=x0hat)
    want = torch_ops.dps_update(*_update_args(a, clip, variance, use_noise))
    assert got is out and not got.isnan().any() and not x0hat.isnan().any()
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert rel_err(got, want) <= TOL[dtype]
    assert rel_err(x0hat, torch_ops.tweedie(a["x"], a["eps"], a["coefs"], clip)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_dps_update_in_place_and_misaligned(dtype) -> None:
    a = _update_case(dtype, (7, 3, 33, 17))
    want = torch_ops.dps_update(*_update_args(a, (-1.0, 1.0), "fixed_large", False))
    x = a["x"].clone()
    got = cuda_ops.dps_update(*_update_args(dict(a, x=x), (-1.0, 1.0), "fixed_large", False), out=x)
    assert got is x
    assert rel_err(x, want) <= TOL[dtype]
    # every tensor one element into its storage: the scalar (non-16-byte) path
    shifted = {k: (torch.cat([t.new_zeros(1), t.flatten()])[1:].view(t.shape) if k in ("x", "eps", "w", "u") else t)
               for k, t in a.items()}
    out = torch.cat([a["x"].new_full((1,), float("nan")), torch.full_like(a["x"], float("nan")).flatten()])[1:]
    out = out.view(a["x"].shape)
    cuda_ops.dps_update(*_update_args(shifted, (-1.0, 1.0), "fixed_large", False), out=out)
    assert rel_err(out, want) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_dps_update_low_precision(dtype) -> None:
    """float32 arithmetic on half-precision tensors: at most ~2x torch's own error in that dtype."""
    a = _update_case(dtype, (3, 2, 9, 11))
    a64 = {k: (t.double() if t.is_floating_point() else t) for k, t in a.items()}
    want64 = torch_ops.dps_update(*_update_args(a64, (-1.0, 1.0), "learned_range", False))
    torch_lp = torch_ops.dps_update(*_update_args(a, (-1.0, 1.0), "learned_range", False))
    got = cuda_ops.dps_update(*_update_args(a, (-1.0, 1.0), "learned_range", False),
                              out=torch.full_like(a["x"], float("nan")))
    assert rel_err(got, want64) <= 2 * rel_err(torch_lp, want64) + 1e-3


def test_dps_update_philox_equals_explicit_noise() -> None:
    a = _update_case(torch.float64, (7, 3, 33, 17))
    z = philox_normal(a["seeds"], a["x"][0].numel(), 23, 0, torch.float64).view_as(a["x"])
    by_seed = cuda_ops.dps_update(*_update_args(a, None, "fixed_small", False))
    by_noise = cuda_ops.dps_update(*_update_args(dict(a, noise=z), None, "fixed_small", True))
    torch.testing.assert_close(by_seed, by_noise, rtol=1e-13, atol=1e-13)


def test_dps_update_sample_independent_of_batch_position() -> None:
    a = _update_case(torch.float32, (7, 3, 8, 8))
    full = cuda_ops.dps_update(*_update_args(a, None, "fixed_small", False))
    one = {k: (t[4:5] if t.dim() and t.shape[0] == 7 else t) for k, t in a.items()}
    torch.testing.assert_close(cuda_ops.dps_update(*_update_args(one, None, "fixed_small", False)), full[4:5],
                               rtol=0, atol=0)


@pytest.mark.parametrize("variance", ["learned_range", "fixed_small"])
@pytest.mark.parametrize("shape", [(3, 3, 8, 8), (2, 1, 5, 7)], ids=["vector", "scalar"])
def test_dps_update_reads_output_slices_in_place(monkeypatch, shape, variance) -> None:
    """eps = out[:, :C], v = out[:, C:] of a [N, 2C, ...] output reach the op as views (no copy)
    and give the contiguous result bit for bit."""
    a = _update_case(torch.float32, shape)
    c = shape[1]
    model_out = torch.cat([a["eps"], a["v"]], 1)
    strided = dict(a, eps=model_out[:, :c], v=model_out[:, c:])
    seen = []
    real = torch.ops.dps_fast.dps_update

    def spy(*args):
        seen.append((args[1].data_ptr(), None if args[11] is None else args[11].data_ptr()))
        return real(*args)

    monkeypatch.setattr(torch.ops.dps_fast, "dps_update", spy)
    got = cuda_ops.dps_update(*_update_args(strided, (-1.0, 1.0), variance, False))
    want = cuda_ops.dps_update(*_update_args(a, (-1.0, 1.0), variance, False))
    assert torch.equal(got, want)
    assert seen[0][0] == strided["eps"].data_ptr()
    if variance == "learned_range":
        assert seen[0][1] == strided["v"].data_ptr()


def test_bf16_x0hat_is_storage_rounding() -> None:
    """float32 coefficients for a bfloat16 state near t = 999: x0hat is the float64 value of the
    same inputs rounded once to bfloat16 (a bfloat16 row would be off by up to 0.2% x 157)."""
    sched = NoiseSchedule.linear(1000)
    i, shape = 995, (2, 3, 16, 16)
    g = _gen(5)
    abar = 1.0 / float(sched.table()[i, 2]) ** 2
    e = torch.randn(shape, generator=g, device=DEV, dtype=torch.float64)
    x = (abar**0.5 * (torch.rand(shape, generator=g, device=DEV, dtype=torch.float64) * 2 - 1)
         + (1 - abar) ** 0.5 * e).to(torch.bfloat16)
    eps = (e + 0.002 * torch.randn(shape, generator=g, device=DEV, dtype=torch.float64)).to(torch.bfloat16)
    a = dict(_update_case(torch.bfloat16, shape), x=x, eps=eps, coefs=sched.table(torch.float32, DEV)[i])
    x0hat = torch.full_like(x, float("nan"))
    cuda_ops.dps_update(*_update_args(a, None, "fixed_small", False), x0hat_out=x0hat)
    ref = torch_ops.tweedie(x.double(), eps.double(), sched.table(torch.float64, DEV)[i], None)
    assert rel_err(x0hat, ref) <= 1.01 * rel_err(ref.to(torch.bfloat16), ref)


# ---- noise --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("numel", "step", "stream"), [(1, 0, 0), (37, 9, 1), (3000, 2**32 - 1, 0)])
def test_philox_words_bit_exact(numel, step, stream) -> None:
    seeds = torch.tensor(SEEDS, dtype=torch.int64, device=DEV)
    got = torch.ops.dps_fast.philox_words(seeds, numel, step, stream).cpu().to(torch.int64) & 0xFFFFFFFF
    assert torch.equal(got, _words_reference(seeds, numel, step, stream))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("stream", [0, 1], ids=["step", "init"])
def test_philox_normal_matches_noise(dtype, stream) -> None:
    seeds = torch.tensor(SEEDS, dtype=torch.int64, device=DEV)
    _poison_allocator(len(SEEDS) * 4099 * 8)
    got = cuda_ops.philox_normal(seeds, 4099, 17, stream, dtype)
    want = philox_normal(seeds.cpu(), 4099, 17, stream, dtype)
    # identical uint32 words; only the device's logf/sincosf differ from torch's CPU ones (a few ulp)
    atol = 1e-12 if dtype == torch.float64 else 4e-6
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=atol)


# ---- spectral stage and blur -----------------------------------------------------------------------
SPECTRA = {"1x1x1": (1, 1, (1,), 1), "1x1x19": (1, 1, (19,), 37), "1x1x19-even": (1, 1, (19,), 36),
           "7x3x33x9": (7, 3, (33, 9), 17), "7x3x33x9-even": (7, 3, (33, 9), 16)}


@pytest.mark.parametrize("case", list(SPECTRA.values()), ids=list(SPECTRA))
@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64], ids=["c128", "c64"])
def test_spectral_residual_matches_torch_ops(dtype, case) -> None:
    n, c, f, n_last = case
    X, K, Y = _spectral_case(dtype, n, c, f)
    _poison_allocator(X.numel() * X.element_size())
    W, rnorm2 = cuda_ops.spectral_residual(X, K, Y, n_last)
    want_W, want_r = torch_ops.spectral_residual(X, K, Y, n_last)
    assert not W.isnan().any() and not rnorm2.isnan().any()
    tol = 1e-10 if dtype == torch.complex128 else TOL[torch.float32]
    assert rel_err(W, want_W) <= tol and rel_err(rnorm2, want_r) <= tol


def test_spectral_residual_deterministic() -> None:
    X, K, Y = _spectral_case(torch.complex64, 2, 3, (256, 129))
    first = cuda_ops.spectral_residual(X, K, Y, 256)
    for _ in range(3):
        again = cuda_ops.spectral_residual(X, K, Y, 256)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


@pytest.mark.parametrize("case", list(BLUR_CASES.values()), ids=list(BLUR_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_blur_normal_residual_matches_torch_ops(dtype, case) -> None:
    shape, ndim = case
    x0, K, Y = _blur_case(dtype, shape, ndim)
    _poison_allocator(x0.numel() * 16)
    got, rnorm2 = cuda_ops.blur_normal_residual(x0, K, Y, ndim)
    want, want_r = torch_ops.blur_normal_residual(x0, K, Y, ndim)
    assert not got.isnan().any() and not rnorm2.isnan().any()
    tol = 1e-10 if dtype == torch.float64 else TOL[torch.float32]
    assert rel_err(got, want) <= tol and rel_err(rnorm2, want_r) <= tol


def test_blur_plan_cache_many_shapes_and_streams() -> None:
    """More shapes than the plan cache holds (LRU eviction), twice, on the default and a side stream."""
    side = torch.cuda.Stream()
    for rep in range(2):
        for n in range(1, 5):
            for size in range(8, 18):
                x0, K, Y = _blur_case(torch.float32, (n, 2, size, size + 1), 2, seed=rep)
                stream = side if (n + size) % 2 else torch.cuda.current_stream()
                stream.wait_stream(torch.cuda.current_stream())  # inputs were made on the current stream
                with torch.cuda.stream(stream):
                    got, r = cuda_ops.blur_normal_residual(x0, K, Y, 2)
                stream.synchronize()
                want, want_r = torch_ops.blur_normal_residual(x0, K, Y, 2)
                assert rel_err(got, want) <= TOL[torch.float32] and rel_err(r, want_r) <= TOL[torch.float32]


# ---- compile, errors, Triton -----------------------------------------------------------------------
def test_compile_fullgraph_step() -> None:
    torch._dynamo.reset()
    _cuda.load_extension()
    a = _update_case(torch.float32, (2, 3, 16, 16))
    x0, K, Y = _blur_case(torch.float32, (2, 3, 16, 16), 2)

    def step(x, eps, u, coefs, seeds):
        x0hat = torch_ops.tweedie(x, eps, coefs, (-1.0, 1.0))
        w, rnorm2 = cuda_ops.blur_normal_residual(x0hat, K, Y, 2)
        w = torch_ops.apply_clip_mask(w, x0hat, (-1.0, 1.0))
        gscale = 0.5 * torch.rsqrt(rnorm2.clamp_min(1e-30))
        return cuda_ops.dps_update(x, eps, w, u, gscale, coefs, 5, (-1.0, 1.0), "fixed_small", None, seeds)

    args = (a["x"], a["eps"], a["u"], a["coefs"], a["seeds"])
    got = torch.compile(step, fullgraph=True)(*args)
    assert rel_err(got, step(*args)) <= TOL[torch.float32]


def test_errors_say_what_was_received() -> None:
    a = _update_case(torch.float32, (2, 3, 4))
    bad_eps = a["eps"][:, :2]
    with pytest.raises(RuntimeError, match=r"eps must have x's shape .* got \[2, 2, 4\]"):
        torch.ops.dps_fast.dps_update(*_op_update_args(dict(a, eps=bad_eps.contiguous()), None, "fixed_small",
                                                       False, torch.empty_like(a["x"]), None))
    with pytest.raises(RuntimeError, match=r"x0hat must be \[N, C, \*S\] with 2 signal axes, got shape"):
        torch.ops.dps_fast.blur_normal_residual(a["x"], a["x"].to(torch.complex64), a["x"].to(torch.complex64), 2)
    with pytest.raises(RuntimeError, match=r"seeds must be an int64 tensor \[N\], got Float of shape \[2\]"):
        torch.ops.dps_fast.philox_words(a["seeds"].float(), 4, 0, 0)
    X, K, Y = _spectral_case(torch.complex64, 1, 1, (5,))
    with pytest.raises(RuntimeError, match=r"K must be a CUDA tensor, got device cpu"):
        torch.ops.dps_fast.spectral_residual(X, K.cpu(), Y, 8)
    with pytest.raises(RuntimeError, match=r"n_last must satisfy .* got n_last 9"):
        torch.ops.dps_fast.spectral_residual(X, K, Y, 9 + 2)  # 11 // 2 + 1 = 6 != 5


def _triton_ops():
    try:
        from dps_fast.backends import triton_ops
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"dps_fast.backends.triton_ops does not import: {exc}")
    return triton_ops


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_triton_ops(dtype) -> None:
    tri = _triton_ops()
    a = _update_case(dtype, (7, 3, 33, 17))
    for variance in VARIANCES:
        got = cuda_ops.dps_update(*_update_args(a, (-1.0, 1.0), variance, False))
        other = tri.dps_update(*_update_args(a, (-1.0, 1.0), variance, False))
        assert rel_err(got, other) <= 2 * TOL[dtype]
    x0, K, Y = _blur_case(dtype, (7, 3, 33, 17), 2)
    if hasattr(tri, "blur_normal_residual"):
        for g, o in zip(cuda_ops.blur_normal_residual(x0, K, Y, 2), tri.blur_normal_residual(x0, K, Y, 2)):
            assert rel_err(g, o) <= 2 * TOL[dtype]
    X = torch.fft.rfftn(x0, dim=(-2, -1))
    if hasattr(tri, "spectral_residual"):
        for g, o in zip(cuda_ops.spectral_residual(X, K, Y, 17), tri.spectral_residual(X, K, Y, 17)):
            assert rel_err(g, o) <= 2 * TOL[dtype]
