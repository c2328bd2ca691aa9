"""SubsampledFourier keeps its k-space mask on each (device, dtype) it has seen: a copy per call
would be a host-to-device transfer (and a host sync) per step, which CUDA-graph capture forbids."""

import torch

from dps_fast.operators import SubsampledFourier


def test_mask_is_cached_per_device_and_dtype_and_reused():
    mask = (torch.rand(6, 5, generator=torch.Generator().manual_seed(0)) > 0.5).double()
    A = SubsampledFourier(mask)
    x32 = torch.randn(2, 1, 6, 5)
    y = A(x32)
    m1 = A._m(x32)
    assert m1 is A._m(x32) is A._m(y)  # forward and adjoint (complex64 -> float32) share one copy
    torch.testing.assert_close(A.adjoint(y), A.adjoint(y.clone()))
    m64 = A._m(x32.double())
    assert m64 is not m1 and m64.dtype == torch.float64 and m1.dtype == torch.float32
    assert set(A._cache) == {(x32.device, torch.float32), (x32.device, torch.float64)}
    # the cached mask gives the operator of the uncached formula
    want = mask.float() * torch.fft.fftn(x32, dim=(-2, -1), norm="ortho")
    torch.testing.assert_close(A(x32), want)


def test_no_host_to_device_copy_after_the_first_call(monkeypatch):
    A = SubsampledFourier(torch.ones(4, 4))
    x = torch.randn(1, 1, 4, 4)
    A(x)
    copies = []
    real_to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        copies.append(self.shape)
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    A(x)
    A.adjoint(A(x))
    assert copies == []
