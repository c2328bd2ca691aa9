"""The PNGs the DPS code writes: ``clear_color`` (min-max normalised) saved as ``plt.imsave`` does.

The DPS code saves every image (measurement, label, reconstruction, progress) as
``plt.imsave(path, clear_color(x))``: ``clear_color`` takes ``|x|`` of complex tensors, squeezes
``[1, C, H, W]`` to ``[H, W, C]`` and maps it to ``[0, 1]`` by its own minimum and maximum (in
float32 numpy); ``plt.imsave`` stores an RGBA PNG with ``uint8(v * 255)`` (truncation; a NaN
pixel, e.g. of a diverged chain, becomes transparent black). :func:`save_like_plt` writes the same pixels with Pillow, so matplotlib is not needed.

Example:
    >>> a = clear_color(torch.arange(12.0).reshape(1, 3, 2, 2))
    >>> a.shape, float(a[0, 0, 0]), float(a[1, 1, 2])
    ((2, 2, 3), 0.0, 1.0)
"""

from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
import torch

from ...reconstruct.data import atomic_write_bytes

__all__ = ["clear_color", "to_rgba8", "save_like_plt"]


def clear_color(x: torch.Tensor) -> np.ndarray:
    """``[1, C, H, W]`` (or ``[C, H, W]``) -> ``[H, W, C]`` float32 in ``[0, 1]`` (min-max), as
    the DPS code's ``clear_color``; a single channel gives ``[H, W]``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        x = x.abs()
    a = x.detach().float().cpu().squeeze().numpy()
    if a.ndim == 3:
        a = np.transpose(a, (1, 2, 0))
    elif a.ndim != 2:
        raise ValueError(f"x: expected one image [1, C, H, W] or [C, H, W], got shape {tuple(x.shape)}")
    a = np.array(a, dtype=np.float32, copy=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        a -= np.min(a)
        a /= np.max(a)
    return a


def to_rgba8(img: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` (or ``[H, W]``) floats in ``[0, 1]`` -> ``[H, W, 4]`` uint8 as ``plt.imsave``
    converts an RGB float image: ``uint8(v * 255)``, alpha 255, and a pixel with a NaN channel
    all 0 (transparent black). A 2-D array is written as gray (``plt.imsave`` would apply a
    colormap)."""
    a = np.asarray(img, dtype=np.float32)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"img: expected [H, W, 3] or [H, W], got shape {a.shape}")
    nan = np.isnan(a).any(axis=2)
    a = np.where(nan[..., None], np.float32(0.0), a)
    if a.size and (a.max() > 1 or a.min() < 0):
        raise ValueError(f"img: expected values in [0, 1], got [{a.min()}, {a.max()}]")
    out = np.empty(a.shape[:2] + (4,), dtype=np.uint8)
    out[..., :3] = (a * 255).astype(np.uint8)
    out[..., 3] = np.where(nan, 0, 255)
    return out


def save_like_plt(path: Union[str, os.PathLike], x: torch.Tensor) -> None:
    """Write ``clear_color(x)`` as the RGBA PNG ``plt.imsave`` would (atomically)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(to_rgba8(clear_color(x))).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue(), fsync=False)
