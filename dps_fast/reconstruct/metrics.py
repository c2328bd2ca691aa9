"""Image quality metrics: PSNR and SSIM (Wang et al. 2004, 11x11 Gaussian window, sigma 1.5).

Both take images ``[..., C, H, W]`` with values in ``[0, data_range]`` (the reconstruction
runner passes ``[0, 1]`` images, ``(x + 1) / 2`` of the model's ``[-1, 1]``) and return one value
per leading index, computed in float64.

Example:
    >>> a = torch.zeros(1, 3, 16, 16)
    >>> round(psnr(a + 0.25, a).item(), 4)  # MSE 1/16 -> 10 log10(16) dB
    12.0412
    >>> ssim(a, a).item()
    1.0
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "gaussian_window"]

SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def _check_pair(x: torch.Tensor, ref: torch.Tensor) -> None:
    for name, t in (("x", x), ("ref", ref)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 3:
            raise ValueError(f"{name}: expected images [..., C, H, W], got shape {tuple(t.shape)}")
    if x.shape != ref.shape:
        raise ValueError(f"x: expected the shape of ref {tuple(ref.shape)}, got {tuple(x.shape)}")


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio ``10 log10(data_range^2 / MSE)`` in dB, per image ``[...]``.

    Identical images give ``inf``.
    """
    _check_pair(x, ref)
    if not data_range > 0:
        raise ValueError(f"data_range: expected a positive float, got {data_range!r}")
    mse = (x.double() - ref.double()).square().flatten(-3).mean(-1)
    return 10.0 * torch.log10(data_range**2 / mse)  # mse == 0 -> inf


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The normalised 1-D Gaussian window ``[size]`` (float64); SSIM uses its outer product."""
    j = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-0.5 * (j / sigma) ** 2)
    return w / w.sum()


def ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean structural similarity per image ``[...]``, Wang et al. (2004).

    Local statistics are Gaussian-weighted (11x11, sigma 1.5, weighted population covariance)
    over the windows that fit inside the image (a 'valid' filter, as in the reference MATLAB
    code); the SSIM map is averaged over positions and channels. ``K1 = 0.01``, ``K2 = 0.03``.
    Images smaller than 11 pixels use the largest odd window that fits.
    """
    _check_pair(x, ref)
    if not data_range > 0:
        raise ValueError(f"data_range: expected a positive float, got {data_range!r}")
    lead = x.shape[:-3]
    c, h, w = x.shape[-3:]
    size = min(SSIM_WINDOW, h if h % 2 else h - 1, w if w % 2 else w - 1)
    if size < 1:
        raise ValueError(f"x: expected images of at least 1x1 pixels, got {h}x{w}")
    g = gaussian_window(size, SSIM_SIGMA)
    kernel = torch.outer(g, g).to(x.device).expand(c, 1, size, size)

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=c)

    a = x.double().reshape(-1, c, h, w)
    b = ref.double().reshape(-1, c, h, w)
    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a.square()
    var_b = filt(b * b) - mu_b.square()
    cov = filt(a * b) - mu_a * mu_b
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    smap = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2))
    return smap.flatten(1).mean(1).reshape(lead) if lead else smap.mean()

