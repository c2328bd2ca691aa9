"""Launch plumbing: bad inputs, CUDA required outside the interpreter, empty batches, deterministic
partial sums, the rows helper and the device guard.

Part of the Triton backend's tests (the others: tests/kernels/test_*.py): every op against its
pure-torch reference (``torch_ops``). float64 states compare elementwise at rtol 1e-10; float32
within ``TOL``; bfloat16 by the flash-attention rule (at most 2x the error of torch_ops run in
bfloat16). Outputs are poisoned with NaN before every kernel (tests/kernels/conftest.py). On CPU
the kernels run under ``TRITON_INTERPRET=1`` (tests/conftest.py), so shapes stay small.
"""

from __future__ import annotations

import math

import pytest
import torch

from dps_fast.backends import triton_ops as ops
from tests.kernels.triton_cases import SCHEDULE, STEP, blur_inputs, coefs, randn, update_inputs


def test_bad_inputs(device) -> None:
    t, seeds, noise = update_inputs((2, 3, 4, 5), torch.float32, device, seed=14)
    c = coefs(device, torch.float32)
    x, eps, w, u, g = t["x"], t["eps"], t["w"], t["u"], t["gscale"]
    with pytest.raises(ValueError, match=r"eps: expected the shape of x \(2, 3, 4, 5\), got \(2, 3, 4, 4\)"):
        ops.dps_update(x, eps[..., :4], w, u, g, c, STEP, seeds=seeds)
    with pytest.raises(ValueError, match="w: expected a tensor on x's device"):
        ops.dps_update(x, eps, w.to("meta"), u, g, c, STEP, seeds=seeds)
    with pytest.raises(TypeError, match="u: expected dtype float32, float64, bfloat16, got int32"):
        ops.dps_update(x, eps, w, u.to(torch.int32), g, c, STEP, seeds=seeds)
    with pytest.raises(TypeError, match="x: expected dtype .* got float16"):
        ops.tweedie(x.half(), eps, c)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor, got list"):
        ops.tweedie([1.0], eps, c)
    with pytest.raises(TypeError, match="seeds: expected dtype int64, got int32"):
        ops.dps_update(x, eps, w, u, g, c, STEP, seeds=seeds.int())
    with pytest.raises(ValueError, match=r"seeds: expected an int64 tensor \[N\] = \[2\], got shape \(3,\)"):
        ops.dps_update(x, eps, w, u, g, c, STEP, seeds=torch.arange(3, device=device))
    with pytest.raises(ValueError, match="seeds: needed when noise is None"):
        ops.dps_update(x, eps, w, u, g, c, STEP)
    with pytest.raises(ValueError, match=r"gscale: expected one value per sample \[N\] = \[2\]"):
        ops.dps_update(x, eps, w, u, torch.ones(3, device=device), c, STEP, seeds=seeds)
    with pytest.raises(ValueError, match=r"coefs: expected one row \[Coef.COUNT\]"):
        ops.dps_update(x, eps, w, u, g, SCHEDULE.table(torch.float32, device), STEP, seeds=seeds)
    with pytest.raises(ValueError, match="variance: expected"):
        ops.dps_update(x, eps, w, u, g, c, STEP, variance="fixed", seeds=seeds)
    with pytest.raises(ValueError, match="v: learned_range variance needs"):
        ops.dps_update(x, eps, w, u, g, c, STEP, variance="learned_range", seeds=seeds)
    with pytest.raises(TypeError, match="step: expected an int or an int64 tensor, got float"):
        ops.dps_update(x, eps, w, u, g, c, 1.5, seeds=seeds)
    with pytest.raises(TypeError, match="clip: expected None or a pair"):
        ops.tweedie(x, eps, c, clip=1.0)
    with pytest.raises(ValueError, match=r"out: expected the shape of x"):
        ops.dps_update(x, eps, w, u, g, c, STEP, noise=noise, out=x[:1])
    with pytest.raises(ValueError, match="y: expected the shape of x"):
        ops.prep_elementwise(x, eps, c, None, y=x[:, :1], mask=None)
    with pytest.raises(ValueError, match="mask: expected a shape that broadcasts against one sample"):
        ops.prep_elementwise(x, eps, c, None, y=x, mask=torch.ones(2, device=device))
    X = torch.fft.rfftn(x, dim=(-2, -1))
    K = torch.ones(4, 3, dtype=torch.complex64, device=device)
    with pytest.raises(ValueError, match="n_last: expected the signal length"):
        ops.spectral_residual(X, K, X, 6)
    with pytest.raises(ValueError, match=r"K: expected a transfer function \[\*F\] = \(4, 3\)"):
        ops.spectral_residual(X, K[:2], X, 5)
    with pytest.raises(TypeError, match="Y: expected dtype complex64, got complex128"):
        ops.spectral_residual(X, K, X.to(torch.complex128), 5)
    with pytest.raises(ValueError, match="ndim: expected 1 or 2"):
        ops.blur_normal_residual(x, K, X, 3)
    with pytest.raises(ValueError, match=r"x0hat: expected \[N, C, \*S\] with 1 signal axes"):
        ops.blur_normal_residual(x, K, X, 1)


def test_needs_cuda_when_not_interpreting(monkeypatch, device) -> None:
    if device.type == "cuda":
        pytest.skip("CUDA tensors are valid here")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="x: the triton backend runs on CUDA tensors"):
        ops.tweedie(x, x, coefs(device, torch.float32))


def test_empty_batch(device) -> None:
    x = torch.zeros(0, 3, 4, device=device)
    c = coefs(device, torch.float32)
    assert ops.tweedie(x, x, c).shape == x.shape
    x0, w, rn = ops.prep_elementwise(x, x, c, None, x, None)
    assert x0.shape == x.shape and rn.shape == (0,)
    assert ops.dps_update(x, x, x, x, torch.zeros(0, device=device), c, 1,
                          seeds=torch.zeros(0, dtype=torch.int64, device=device)).shape == x.shape


def test_partial_sums_are_deterministic(device) -> None:
    """rnorm2 comes from per-block partials summed by torch: bitwise reproducible."""
    gen = torch.Generator().manual_seed(15)
    x, eps, y = randn(gen, (3, 2, 3, 64, 64), torch.float32, device).unbind(0)
    c = coefs(device, torch.float32)
    a = ops.prep_elementwise(x, eps, c, None, y, None)[2]
    b = ops.prep_elementwise(x, eps, c, None, y, None)[2]
    assert torch.equal(a, b)
    assert math.isfinite(float(a.sum()))


def test_rows_helper_copies_only_what_it_must(device) -> None:
    """Samples that are not contiguous inside (a spatial stride) are copied, never misread."""
    base = torch.randn(3, 4, 6, 10, device=device)
    t, sn = ops._rows(base[:, :2])
    assert t.data_ptr() == base.data_ptr() and sn == 4 * 6 * 10
    t, sn = ops._rows(base[..., ::2])
    assert t.is_contiguous() and sn == 4 * 6 * 5 and t.data_ptr() != base.data_ptr()
    t, sn = ops._rows(base[:1, 1:3])  # one sample: its stride is never used
    assert t.data_ptr() == base[:1, 1:3].data_ptr() and sn == 2 * 6 * 10


class _DeviceRecorder:
    """Stands in for ``torch.cuda.device``: records the device made current while it is entered."""

    def __init__(self) -> None:
        self.current: list = [None]
        self.entered: list = []

    def __call__(self, device):
        rec = self

        class _Ctx:
            def __enter__(self_inner):
                rec.entered.append(device)
                rec.current.append(device)

            def __exit__(self_inner, *exc):
                rec.current.pop()
                return False

        return _Ctx()


def _launch_spy(monkeypatch, module, kernel_name: str, recorder: _DeviceRecorder, seen: list) -> None:
    """Replace ``module.<kernel>`` by an object whose ``[grid]`` launch records the current device
    of ``recorder`` and then launches the real kernel."""
    real = getattr(module, kernel_name)

    class _Spy:
        def __getitem__(self, grid):
            launch = real[grid]

            def run(*args, **kwargs):
                seen.append((kernel_name, recorder.current[-1]))
                return launch(*args, **kwargs)

            return run

    monkeypatch.setattr(module, kernel_name, _Spy())


def test_every_launch_runs_under_the_tensors_device(device, monkeypatch) -> None:
    """Triton launches on the current device: each host launcher must make the state's device
    current first. On CPU the guard is forced on (needs_device_guard) and torch.cuda.device is
    replaced by a recorder, so the test sees which device was current at each launch."""
    from dps_fast.kernels import launch as klaunch
    from dps_fast.kernels import philox as kp
    from dps_fast.kernels import prep as kprep
    from dps_fast.kernels import spectral as kspec
    from dps_fast.kernels import update as kupdate

    rec = _DeviceRecorder()
    monkeypatch.setattr(torch.cuda, "device", rec)
    monkeypatch.setattr(klaunch, "needs_device_guard", lambda dev: True)
    seen: list = []
    for mod, name in ((kupdate, "_dps_update_kernel"), (kprep, "_prep_kernel"), (kprep, "_tweedie_kernel"),
                      (kprep, "_clip_mask_kernel"), (kspec, "_spectral_kernel"), (kp, "_normal_kernel"),
                      (kp, "_philox_words_kernel")):
        _launch_spy(monkeypatch, mod, name, rec, seen)
    t, seeds, _ = update_inputs((2, 3, 4, 6), torch.float32, device, seed=25)
    c = coefs(device, torch.float32)
    ops.dps_update(**t, coefs=c, step=STEP, clip=(-1.0, 1.0), seeds=seeds)
    ops.prep_elementwise(t["x"], t["eps"], c, None, t["w"], None)
    x0 = ops.tweedie(t["x"], t["eps"], c, (-1.0, 1.0))
    ops.apply_clip_mask(t["w"].clone(), x0, (-1.0, 1.0))
    x0b, K, Y, ndim, _ = blur_inputs((2, 3, 4, 6), torch.float32, device, torch.Generator().manual_seed(26))
    ops.blur_normal_residual(x0b, K, Y, ndim)
    kp.normal(seeds, 10, 3, 0, torch.float32)
    z = torch.zeros(3, dtype=torch.int64, device=device)
    kp.philox_words(z, z, z, z, z, z)
    assert sorted({name for name, _ in seen}) == sorted(
        ["_dps_update_kernel", "_prep_kernel", "_tweedie_kernel", "_clip_mask_kernel", "_spectral_kernel",
         "_normal_kernel", "_philox_words_kernel"])
    assert all(dev == torch.device(device) for _, dev in seen), seen


def test_device_guard_selects_cuda_devices_only() -> None:
    from dps_fast.kernels import launch as klaunch

    assert klaunch.needs_device_guard(torch.device("cuda", 1))
    assert not klaunch.needs_device_guard(torch.device("cpu"))
    with klaunch.device_guard(torch.zeros(1)):  # a no-op context on the CPU
        pass
