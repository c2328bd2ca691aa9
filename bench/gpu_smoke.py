"""Phase a of bench/gpu_suite.sh: does everything compiled run and compute the right thing?

One ``PASS``/``FAIL``/``SKIP`` line per check, printed and appended to ``RESULTS/smoke.txt`` as it
finishes (a time limit never loses the finished lines). Parts:

* ``triton``: every public op of :mod:`dps_fast.backends.triton_ops` (so every compiled Triton
  kernel: Tweedie, clip mask, mask-operator prep with and without a mask, the blur spectral
  stage, the fused update with in-kernel Philox noise, learned-range variance and explicit
  noise) against :mod:`dps_fast.backends.torch_ops` in float64 on fresh random inputs, on two
  shapes (one block per sample; several blocks with a ragged tail) in float32 and bfloat16;
* ``cuda``: the same for the CUDA extension's ops (:mod:`dps_fast.backends.cuda_ops`), plus its
  Philox normals against :func:`dps_fast.noise.philox_normal`;
* ``step``: one guided DPS step of a tiny32 ADM UNet (random weights) on the GPU with the triton
  backend against the same step on the CPU with the torch backend (float32, TF32 off).

Tolerances are relative L2 errors against the float64 reference: float32 2e-5 (float32 rounding
of a few operations, the test suite's table), bfloat16 2e-2 (outputs stored in bfloat16 carry
2^-9 relative rounding each), the step 1e-4 (float32 convolutions summed in another order on
cuDNN than on the CPU through ~40 layers; a wrong kernel gives errors of order 1).

Without CUDA (or with ``--device cpu``) the same checks run on the CPU, Triton under its
interpreter: the suite's dry run.

    python bench/gpu_smoke.py --part triton,step --results bench/results/run-X
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dps_fast.backends import torch_ops  # noqa: E402
from dps_fast.noise import STREAM_STEP, philox_normal  # noqa: E402
from dps_fast.schedule import NoiseSchedule  # noqa: E402

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
STEP_TOL = 1e-4
SHAPES = [(2, 3, 16, 16), (3, 3, 33, 65)]  # S = 768: one block per sample; S = 6435: 7 blocks + tail
if os.environ.get("DPS_SMOKE_QUICK"):  # the suite's dry run: the plumbing, one shape
    SHAPES = SHAPES[:1]
CLIP = (-1.0, 1.0)
STEP = 500
F64 = torch.float64


class Smoke:
    """Collects check lines; prints and appends each to ``smoke.txt`` at once."""

    def __init__(self, results: Optional[Path]) -> None:
        self.path = results / "smoke.txt" if results is not None else None
        self.failed = 0

    def line(self, status: str, name: str, detail: str) -> None:
        text = f"{status} {name}: {detail}"
        print(text, flush=True)
        if status == "FAIL":
            self.failed += 1
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(text + "\n")

    def check(self, name: str, fn: Callable[[], dict[str, tuple[torch.Tensor, torch.Tensor]]], tol: float) -> None:
        """``fn()`` returns ``{output: (fast, reference)}``; every output must be within ``tol``."""
        t0 = time.perf_counter()
        try:
            pairs = fn()
            errs = {k: _rel_err(a, b) for k, (a, b) in pairs.items()}
        except Exception as exc:  # noqa: BLE001 - a smoke check reports, it does not stop the others
            self.line("FAIL", name, f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
            traceback.print_exc(file=sys.stderr)
            return
        # every output within tol: a NaN (or a shape mismatch, reported as NaN) fails
        status = "PASS" if all(v <= tol for v in errs.values()) else "FAIL"
        detail = ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
        self.line(status, name, f"rel_err {detail} (tol {tol:g}, {time.perf_counter() - t0:.2f} s)")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.detach().to("cpu", torch.complex128 if a.is_complex() else F64)
    b = b.detach().to("cpu", torch.complex128 if b.is_complex() else F64)
    if a.shape != b.shape:
        return float("nan")
    err = float((a - b).norm() / b.norm().clamp_min(1e-300))
    return err if err == err else float("nan")


def _inputs(shape, dtype, dev, k: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator(device=dev).manual_seed(seed)
    return [torch.randn(shape, device=dev, generator=g).to(dtype) for _ in range(k)]


def _d(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.to(torch.complex128 if t.is_complex() else F64)


def op_checks(smoke: Smoke, ops: Any, label: str, dev: torch.device, dtypes: list[torch.dtype],
              include: set[str]) -> None:
    """Every op of ``ops`` in ``include`` against torch_ops in float64, per dtype and shape."""
    sched = NoiseSchedule.linear(1000)
    coefs = sched.table(torch.float32, dev)[STEP]  # float32 rows: accepted for every state dtype
    c64 = _d(coefs)
    for dtype in dtypes:
        tol = TOL[dtype]
        dn = str(dtype).replace("torch.", "")
        for si, shape in enumerate(SHAPES):
            tag = f"{label} {{}} {dn} {list(shape)}"
            n = shape[0]
            x, eps, w, u, v, z, y = _inputs(shape, dtype, dev, 7, seed=10 * si + 1)
            v = v.clamp(-1, 1)
            g = torch.Generator(device=dev).manual_seed(99 + si)
            gscale = torch.rand(n, device=dev, generator=g)
            seeds = torch.randint(0, 2**62, (n,), device=dev, generator=g)
            mask = torch.rand(shape[1:], device=dev, generator=g) > 0.4
            if "tweedie" in include:
                smoke.check(tag.format("tweedie"), lambda: {"x0hat": (
                    ops.tweedie(x, eps, coefs, CLIP), torch_ops.tweedie(_d(x), _d(eps), c64, CLIP))}, tol)
            if "apply_clip_mask" in include:
                x0 = torch_ops.tweedie(x.float(), eps.float(), coefs, CLIP).to(dtype)
                smoke.check(tag.format("apply_clip_mask"), lambda: {"w": (
                    ops.apply_clip_mask(w.clone(), x0, CLIP), torch_ops.apply_clip_mask(_d(w), _d(x0), CLIP))}, tol)
            if "prep_elementwise" in include:
                for mname, m in (("mask", mask), ("identity", None)):
                    def prep(m=m):
                        a = ops.prep_elementwise(x, eps, coefs, CLIP, y, m)
                        b = torch_ops.prep_elementwise(_d(x), _d(eps), c64, CLIP, _d(y), None if m is None else _d(m))
                        return {"x0hat": (a[0], b[0]), "w": (a[1], b[1]), "rnorm2": (a[2], b[2])}
                    smoke.check(tag.format(f"prep_elementwise[{mname}]"), prep, tol)
            if "blur_normal_residual" in include and (dtype == torch.float32 or label == "triton"):
                K = torch.fft.rfft2(torch.rand(shape[-2:], device=dev, generator=g))
                Y = torch.fft.rfft2(y.float())

                def blur():
                    a = ops.blur_normal_residual(x, K, Y, 2)
                    b = torch_ops.blur_normal_residual(_d(x), _d(K), _d(Y), 2)
                    return {"r": (a[0], b[0]), "rnorm2": (a[1], b[1])}
                smoke.check(tag.format("blur_normal_residual"), blur, max(tol, TOL[torch.float32]))
                if dtype == torch.float32:
                    X = torch.fft.rfft2(x)

                    def spectral():
                        a = ops.spectral_residual(X, K, Y, shape[-1])
                        b = torch_ops.spectral_residual(_d(X), _d(K), _d(Y), shape[-1])
                        return {"W": (a[0], b[0]), "rnorm2": (a[1], b[1])}
                    smoke.check(tag.format("spectral_residual"), spectral, tol)
            if "dps_update" in include:
                for vname, kw in (("philox", dict(variance="fixed_small")),
                                  ("philox-learned", dict(variance="learned_range", v=v)),
                                  ("noise", dict(variance="fixed_small", noise=z))):
                    def update(kw=kw):
                        ref_kw = {k: (_d(t) if isinstance(t, torch.Tensor) else t) for k, t in kw.items()}
                        a = ops.dps_update(x, eps, w, u, gscale, coefs, STEP, clip=CLIP, seeds=seeds, **kw)
                        b = torch_ops.dps_update(_d(x), _d(eps), _d(w), _d(u), _d(gscale), c64, STEP, clip=CLIP,
                                                 seeds=seeds, **ref_kw)
                        return {"x_next": (a, b)}
                    smoke.check(tag.format(f"dps_update[{vname}]"), update, tol)
            if "philox_normal" in include and si == 0:
                numel = int(torch.Size(shape[1:]).numel())
                smoke.check(f"{label} philox_normal {dn} [{n}, {numel}]", lambda: {"z": (
                    ops.philox_normal(seeds, numel, STEP, STREAM_STEP, dtype),
                    philox_normal(seeds.cpu(), numel, STEP, STREAM_STEP, F64))}, tol)


def part_triton(smoke: Smoke, dev: torch.device) -> None:
    from dps_fast.backends import triton_ops

    op_checks(smoke, triton_ops, "triton", dev, [torch.float32, torch.bfloat16],
              {"tweedie", "apply_clip_mask", "prep_elementwise", "blur_normal_residual", "dps_update"})


def part_cuda(smoke: Smoke, dev: torch.device) -> None:
    if dev.type != "cuda":
        smoke.line("SKIP", "cuda extension", "no CUDA device (dry run)")
        return
    from dps_fast import _cuda
    from dps_fast.backends import cuda_ops

    if not cuda_ops.is_available():
        smoke.line("FAIL" if os.environ.get("DPS_SMOKE_EXPECT_EXTENSION") == "1" else "SKIP", "cuda extension",
                   f"not loaded ({_cuda.FALLBACK} answers instead; see build.log)")
        return
    smoke.line("PASS", "cuda extension", "loaded")
    op_checks(smoke, cuda_ops, "cuda", dev, [torch.float32, torch.bfloat16],
              {"dps_update", "blur_normal_residual", "philox_normal"})


def part_step(smoke: Smoke, dev: torch.device) -> None:
    """One guided step of tiny32 on ``dev`` (triton backend) against the CPU (torch backend)."""
    from _adm import adm_model  # bench/ is on sys.path: this script's own folder
    from dps_fast import DPS, operators

    torch.backends.cudnn.allow_tf32 = False  # float32 convolutions, not TF32, for the comparison
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu_model = adm_model("tiny32", torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    A = operators.GaussianBlur(1.5)
    x_t = torch.randn(2, 3, 32, 32, generator=g)
    y = A(torch.rand(2, 3, 32, 32, generator=g) * 2 - 1) + 0.05 * torch.randn(2, 3, 32, 32, generator=g)
    noise = torch.randn(2, 3, 32, 32, generator=g)
    sched = NoiseSchedule.linear(1000)
    opts = dict(zeta=1.0, sigma_n=0.05, guidance="normalized", clip_x0=(-1, 1), compile=False)

    def step() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        import copy

        ref = DPS(cpu_model, sched, A, backend="torch", **opts).step(x_t, STEP, y, noise)
        dev_model = copy.deepcopy(cpu_model).to(dev)
        fast = DPS(dev_model, sched, A, backend="triton", **opts).step(x_t.to(dev), STEP, y.to(dev), noise.to(dev))
        return {"x_next": (fast[0], ref[0]), "x0hat": (fast[1], ref[1])}

    smoke.check(f"step tiny32 triton@{dev.type} vs torch@cpu float32 [2, 3, 32, 32]", step, STEP_TOL)


PARTS = {"triton": part_triton, "cuda": part_cuda, "step": part_step}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", default="triton,step", help=f"comma-separated parts of {sorted(PARTS)}")
    ap.add_argument("--results", type=Path, default=None, help="folder for smoke.txt (appended)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.part.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        ap.error(f"--part: expected names from {sorted(PARTS)}, got {args.part!r}")
    if args.results is not None:
        args.results.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    smoke = Smoke(args.results)
    t0 = time.perf_counter()
    for p in parts:
        PARTS[p](smoke, dev)
    print(f"smoke {','.join(parts)} on {dev}: {smoke.failed} FAIL, {time.perf_counter() - t0:.1f} s", flush=True)
    return 1 if smoke.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
