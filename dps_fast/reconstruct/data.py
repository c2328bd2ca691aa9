"""Inputs and outputs of ``dps-fast reconstruct``: image folders and tensor files in, PNG and
``.pt`` files out, every file written atomically (temporary file + ``os.replace``).

Inputs are loaded lazily, one item at a time, as float32 ``[C, H, W]`` tensors in ``[-1, 1]``:

* a folder of images (PNG, JPEG, BMP, WebP, TIFF; top level only, sorted by file name), read with
  Pillow and converted to the model's channels (RGB or grayscale); an item is named by its file
  stem (the full file name where two files share a stem);
* a tensor file ``.npy`` / ``.pt`` holding ``[N, C, H, W]`` values in ``[-1, 1]`` (named
  ``00000``, ``00001``, ...); a ``.pt`` may also be a dict with the tensor under ``"x"``;
* in Python, a tensor ``[N, C, H, W]`` or a sequence of ``(name, [C, H, W] tensor)`` pairs.

A bad item (unreadable, wrong size, values out of range) raises :class:`InputError`, which the
runner reports and skips; a bad *source* (missing path, wrong tensor rank) raises ValueError.

Example:
    >>> ds = open_dataset(torch.zeros(2, 3, 8, 8))
    >>> ds.names, ds.load(1).shape
    (['00000', '00001'], torch.Size([3, 8, 8]))
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = [
    "InputError", "Dataset", "open_dataset", "MeasurementSource", "open_measurements",
    "IMAGE_EXTENSIONS", "TENSOR_EXTENSIONS", "atomic_write_bytes", "save_png", "save_tensors",
    "write_json", "read_json", "remove_stale_tmp", "to_uint8", "item_dir",
    "MANIFEST", "METRICS", "ITEMS", "DONE", "TENSORS",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
TENSOR_EXTENSIONS = (".npy", ".pt", ".pth")
# Tolerance on the [-1, 1] range of tensor inputs (float rounding of a (x / 127.5 - 1) conversion).
RANGE_TOL = 1e-3
TMP_MARK = ".tmp-"
MEASUREMENT_KEYS = ("measurement", "y")

# Output layout: OUT/manifest.json, OUT/metrics.csv and one folder per item, OUT/items/NAME/,
# holding PNGs, tensors.pt and, written last, the marker done.json.
MANIFEST = "manifest.json"
METRICS = "metrics.csv"
ITEMS = "items"
DONE = "done.json"
TENSORS = "tensors.pt"

DataSource = Union[str, os.PathLike, torch.Tensor, np.ndarray, Sequence[tuple[str, torch.Tensor]]]


class InputError(Exception):
    """One input item cannot be used (unreadable, wrong size, ...): reported and skipped."""


@dataclass
class Dataset:
    """Lazily loaded items: ``names[i]`` and ``load(i) -> [C, H, W]`` float32 in ``[-1, 1]``.

    ``paths[i]`` is the file an item came from (None for tensors). ``load`` raises
    :class:`InputError` for an item that cannot be used.
    """

    names: list[str]
    paths: list[Optional[str]]
    loader: Callable[[int], torch.Tensor]

    def __len__(self) -> int:
        return len(self.names)

    def load(self, i: int) -> torch.Tensor:
        return self.loader(i)


# ---- conversions ------------------------------------------------------------------------------
def to_uint8(img: torch.Tensor) -> np.ndarray:
    """``[C, H, W]`` in ``[-1, 1]`` -> ``[H, W, C]`` (or ``[H, W]`` for C = 1) uint8, rounded."""
    a = ((img.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    a = a.permute(1, 2, 0).numpy()
    return a[..., 0] if a.shape[-1] == 1 else a


def _from_uint8(a: np.ndarray) -> torch.Tensor:
    """``[H, W, C]`` uint8 -> ``[C, H, W]`` float32 in ``[-1, 1]``."""
    return torch.from_numpy(np.array(a, dtype=np.uint8, copy=True)).permute(2, 0, 1).float() / 127.5 - 1.0


def _resize_tensor(x: torch.Tensor, size: int) -> torch.Tensor:
    """Scale the shorter side of ``[C, H, W]`` to ``size`` (bicubic, antialiased), centre-crop."""
    h, w = x.shape[-2:]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    if (nh, nw) != (h, w):
        x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, top:top + size, left:left + size].clamp(-1, 1).contiguous()


def _size_error(name: str, h: int, w: int, size: int) -> InputError:
    return InputError(f"{name}: image is {w}x{h} pixels, the model needs {size}x{size}; pass --resize "
                      f"(resize=True) to scale the shorter side to {size} and centre-crop")


def _check_tensor_item(name: str, x: torch.Tensor, channels: Optional[int], size: Optional[int],
                       resize: bool) -> torch.Tensor:
    if x.dim() != 3:
        raise InputError(f"{name}: expected an image [C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(f"{name}: expected float values in [-1, 1], got dtype {x.dtype}")
    x = x.detach().float().cpu()
    if not torch.isfinite(x).all():
        raise InputError(f"{name}: expected finite values, got NaN or inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 - RANGE_TOL or hi > 1 + RANGE_TOL:
        raise InputError(f"{name}: expected values in [-1, 1] (images scaled as x / 127.5 - 1), "
                         f"got [{lo:.3g}, {hi:.3g}]")
    if channels is not None and x.shape[0] != channels:
        raise InputError(f"{name}: expected {channels} channels, got {x.shape[0]}")
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        if not resize:
            raise _size_error(name, x.shape[-2], x.shape[-1], size)
        x = _resize_tensor(x, size)
    return x.clamp(-1, 1)


def read_image(path: str, name: str, channels: Optional[int] = 3, size: Optional[int] = None,
               resize: bool = False) -> torch.Tensor:
    """One image file -> ``[C, H, W]`` float32 in ``[-1, 1]`` (C from ``channels``: 3 RGB, 1 gray).

    Raises :class:`InputError` if the file cannot be decoded or has the wrong size.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if size is not None and im.size != (size, size) and not resize:
                raise _size_error(name, im.size[1], im.size[0], size)
            im = im.convert("L" if channels == 1 else "RGB")
            if size is not None and im.size != (size, size):
                w, h = im.size
                s = size / min(h, w)
                nw, nh = max(size, round(w * s)), max(size, round(h * s))
                im = im.resize((nw, nh), Image.Resampling.BICUBIC)
                left, top = (nw - size) // 2, (nh - size) // 2
                im = im.crop((left, top, left + size, top + size))
            a = np.asarray(im, dtype=np.uint8)
    except InputError:
        raise
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise InputError(f"{name}: cannot read image file {path}: {exc}") from None
    if a.ndim == 2:
        a = a[..., None]
    return _from_uint8(a)


def _load_tensor_file(path: str, keys: Sequence[str] = ("x",)) -> Any:
    """A ``.npy`` (memory-mapped) or ``.pt`` tensor; a ``.pt`` dict gives its first entry in ``keys``."""
    if path.endswith(".npy"):
        return np.load(path, mmap_mode="r")
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(obj, dict):
        for key in keys:
            if key in obj:
                return obj[key]
        raise ValueError(f"{path}: expected a tensor or a dict with a tensor under {' or '.join(map(repr, keys))}, "
                         f"got keys {sorted(obj)}")
    return obj


def _stack_names(n: int) -> list[str]:
    return [f"{i:0{max(5, len(str(n - 1)))}d}" for i in range(n)] if n else []


def _tensor_dataset(data: Any, channels: Optional[int], size: Optional[int], resize: bool,
                    what: str) -> Dataset:
    if not isinstance(data, (torch.Tensor, np.ndarray)) or data.ndim != 4:
        shape = tuple(getattr(data, "shape", ()))
        raise ValueError(f"{what}: expected images [N, C, H, W], got {type(data).__name__} of shape {shape}")
    n, c, h, w = data.shape
    if channels is not None and c != channels:
        raise ValueError(f"{what}: expected {channels} channels (the model's), got [N, C, H, W] = {tuple(data.shape)}")
    if size is not None and (h, w) != (size, size) and not resize:
        raise ValueError(f"{what}: images are {w}x{h} pixels, the model needs {size}x{size}; pass --resize "
                         f"(resize=True) to scale the shorter side to {size} and centre-crop")
    names = _stack_names(n)

    def load(i: int) -> torch.Tensor:
        item = data[i]
        x = torch.from_numpy(np.array(item)) if isinstance(item, np.ndarray) else item
        return _check_tensor_item(names[i], x, channels, size, resize)

    return Dataset(names, [None] * n, load)


def _unique_names(files: list[Path]) -> list[str]:
    stems = [f.stem for f in files]
    dup = {s for s in stems if stems.count(s) > 1}
    return [f.name if f.stem in dup else f.stem for f in files]


def open_dataset(source: DataSource, channels: Optional[int] = 3, image_size: Optional[int] = None,
                 resize: bool = False) -> Dataset:
    """The clean inputs: a folder of images, a ``.npy``/``.pt`` file, a tensor or (name, tensor) pairs.

    Args:
        channels: the model's channels (images are converted; tensors must match).
        image_size: the model's square image size; other sizes are an :class:`InputError` per image
            (a ValueError for a whole tensor) unless ``resize``.
        resize: scale the shorter side to ``image_size`` and centre-crop.
    """
    if isinstance(source, (torch.Tensor, np.ndarray)):
        return _tensor_dataset(source, channels, image_size, resize, "input")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            names = _unique_names(files)

            def load(i: int) -> torch.Tensor:
                return read_image(str(files[i]), names[i], channels, image_size, resize)

            return Dataset(names, [str(f) for f in files], load)
        if path.is_file():
            if path.suffix.lower() not in TENSOR_EXTENSIONS:
                raise ValueError(f"input: expected a folder of images or a {'/'.join(TENSOR_EXTENSIONS)} file, "
                                 f"got {str(path)!r}")
            try:
                data = _load_tensor_file(str(path))
            except (OSError, RuntimeError, ValueError, EOFError) as exc:
                raise ValueError(f"input: cannot read tensor file {str(path)!r}: {exc}") from None
            ds = _tensor_dataset(data, channels, image_size, resize, f"input {str(path)!r}")
            ds.paths = [str(path)] * len(ds)
            return ds
        raise FileNotFoundError(f"input: no such file or folder {str(path)!r}")
    pairs = list(source)
    bad = [type(p).__name__ for p in pairs if not (isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str))]
    if bad:
        raise TypeError(f"input: expected a path, a tensor [N, C, H, W] or (name, tensor) pairs, got items {bad[:3]}")
    names = [p[0] for p in pairs]
    if len(set(names)) != len(names):
        raise ValueError("input: expected unique names in the (name, tensor) pairs")
    return Dataset(names, [None] * len(pairs),
                   lambda i: _check_tensor_item(names[i], torch.as_tensor(pairs[i][1]), channels, image_size, resize))


# ---- given measurements -----------------------------------------------------------------------
@dataclass
class MeasurementSource:
    """Given measurements ``y``: ``load(name, index) -> [*y]`` float32.

    ``names`` lists the items the source holds (used when there are no clean inputs).
    """

    names: list[str]
    loader: Callable[[str, int], torch.Tensor]

    def load(self, name: str, index: int) -> torch.Tensor:
        return self.loader(name, index)


def _measurement_files(folder: Path) -> dict[str, Path]:
    """name -> file in a measurement folder: ``NAME/tensors.pt`` (the ``items`` folder of a
    reconstruct output),
    ``NAME.pt``/``.pth``/``.npy`` or an image ``NAME.png`` etc. (tensor files win over images)."""
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_dir() and (p / TENSORS).is_file():
            found[p.name] = p / TENSORS
    for exts in (TENSOR_EXTENSIONS, IMAGE_EXTENSIONS):
        for p in sorted(folder.iterdir()):
            if p.is_file() and p.suffix.lower() in exts:
                found.setdefault(p.stem, p)
    return found


def open_measurements(source: DataSource, channels: Optional[int] = 3) -> MeasurementSource:
    """Measurements read as given: a folder (one file per item name) or a tensor ``[N, *y]``
    (``.npy``/``.pt`` file or in-memory) indexed like the inputs."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir() and (path / ITEMS).is_dir():  # the output folder of an earlier run
            path = path / ITEMS
        if path.is_dir():
            files = _measurement_files(path)

            def load_file(name: str, index: int) -> torch.Tensor:
                f = files.get(name)
                if f is None:
                    raise InputError(f"{name}: no measurement for this item in {str(path)!r} (looked for "
                                     f"{name}/tensors.pt, {name}.pt, {name}.npy or an image {name}.png)")
                if f.suffix.lower() in IMAGE_EXTENSIONS:
                    return read_image(str(f), name, channels)
                try:
                    obj = _load_tensor_file(str(f), MEASUREMENT_KEYS)
                except (OSError, RuntimeError, ValueError, EOFError) as exc:
                    raise InputError(f"{name}: cannot read measurement file {f}: {exc}") from None
                return torch.as_tensor(np.array(obj) if isinstance(obj, np.ndarray) else obj).float()

            return MeasurementSource(sorted(files), load_file)
        if path.is_file():
            try:
                data = _load_tensor_file(str(path), MEASUREMENT_KEYS)
            except (OSError, RuntimeError, ValueError, EOFError) as exc:
                raise ValueError(f"measurements: cannot read {str(path)!r}: {exc}") from None
            source = data
        else:
            raise FileNotFoundError(f"measurements: no such file or folder {str(path)!r}")
    if not isinstance(source, (torch.Tensor, np.ndarray)) or source.ndim < 2:
        raise ValueError(f"measurements: expected a folder or a tensor [N, ...], got {type(source).__name__}")
    data = source
    names = _stack_names(data.shape[0])

    def load_row(name: str, index: int) -> torch.Tensor:
        if not 0 <= index < data.shape[0]:
            raise InputError(f"{name}: no measurement row {index} (the measurements hold {data.shape[0]})")
        row = data[index]
        return (torch.from_numpy(np.array(row)) if isinstance(row, np.ndarray) else row).float()

    return MeasurementSource(names, load_row)


# ---- atomic outputs ---------------------------------------------------------------------------
def atomic_write_bytes(path: Union[str, os.PathLike], data: bytes, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a
    part: a temporary file in the same folder, flushed (and fsync'ed), then ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_tmp(folder: Union[str, os.PathLike]) -> int:
    """Delete temporary files a killed writer left in ``folder``; returns how many."""
    n = 0
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".") and TMP_MARK in p.name:
                p.unlink(missing_ok=True)
                n += 1
    return n


def item_dir(out_dir: Union[str, os.PathLike], name: str) -> Path:
    """The folder of item ``name``'s outputs."""
    return Path(out_dir) / ITEMS / name


def save_png(path: Union[str, os.PathLike], img: torch.Tensor) -> None:
    """``[C, H, W]`` in ``[-1, 1]`` -> an 8-bit PNG (RGB for 3 channels, grayscale for 1)."""
    from PIL import Image

    if img.dim() != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"img: expected [C, H, W] with C = 1 or 3, got shape {tuple(img.shape)}")
    buf = io.BytesIO()
    Image.fromarray(to_uint8(img)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def save_tensors(path: Union[str, os.PathLike], tensors: dict[str, Any]) -> None:
    """``torch.save`` a dict of tensors atomically."""
    buf = io.BytesIO()
    torch.save(tensors, buf)
    atomic_write_bytes(path, buf.getvalue())


def write_json(path: Union[str, os.PathLike], obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def read_json(path: Union[str, os.PathLike]) -> Optional[Any]:
    """The JSON in ``path``, or None if it is missing or unreadable (a torn write cannot happen,
    but a user may have edited it)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
