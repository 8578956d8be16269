"""Reading images and masks as they really come: JPEG, PNG, BMP and TIFF (including
CVC-ClinicDB's 3-sample TIFFs that Pillow cannot open), grayscale, RGBA, palette and 16-bit.

Every failure raises `ImageReadError`, whose message starts with the file's path.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
MAX_PIXELS = 100_000_000  # larger images are refused rather than exhausting memory
MASK_VALUES = ("auto", "255", "01")  # how mask files encode the polyp (see read_mask)


class ImageReadError(ValueError):
    """An image or mask file that cannot be used; `path` names it."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.integer):
        # 16-bit and wider: scale the type's full range onto 0..255; clip, as negative values
        # of signed types would otherwise wrap around to bright ones
        a = a.astype(np.float64) * (255.0 / np.iinfo(a.dtype).max)
    else:
        a = np.nan_to_num(a.astype(np.float64))
        if a.size and a.max() <= 1.0:
            a = a * 255.0
    return np.clip(a, 0, 255).round().astype(np.uint8)


def _read_array(path: Path) -> np.ndarray:
    if not path.is_file():
        raise ImageReadError(path, "file not found")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            a = tifffile.imread(path)
        except Exception as e:
            # LZW / JPEG-compressed TIFFs need imagecodecs in tifffile; Pillow decodes them itself
            a = _read_with_pillow(path, fallback_of=e)
        if a.ndim == 3 and a.shape[0] in (3, 4) and a.shape[-1] not in (3, 4):
            a = np.moveaxis(a, 0, -1)  # planar (C, H, W) TIFF
        if a.ndim > 3 or (a.ndim == 3 and a.shape[-1] not in (1, 3, 4)):
            raise ImageReadError(path, f"unsupported TIFF layout {a.shape} (expected one 2-D image)")
        if a.size > MAX_PIXELS * 4:
            raise ImageReadError(path, f"image too large ({a.shape})")
        return a
    return _read_with_pillow(path)


def _read_with_pillow(path: Path, fallback_of: Exception | None = None) -> np.ndarray:
    try:
        with warnings.catch_warnings():  # huge images get our own clean error below, not Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            if im.width * im.height > MAX_PIXELS:
                raise ImageReadError(path, f"image too large ({im.width}x{im.height} pixels, limit {MAX_PIXELS:,})")
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV", "LA", "PA"):
                im = im.convert("RGBA" if im.mode in ("LA", "PA") else "RGB")
            return np.asarray(im)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageReadError(path, f"image too large ({e})") from None
    except Exception as e:
        if fallback_of is not None:
            raise ImageReadError(path, f"unreadable TIFF ({fallback_of})") from None
        raise ImageReadError(path, f"not a readable image ({type(e).__name__}: {e})") from None


def to_rgb(a: np.ndarray) -> np.ndarray:
    """Any decoded image array -> (H, W, 3) uint8 RGB: grayscale repeated, alpha dropped, 16-bit and
    float scaled to 8-bit. The one conversion for files (`read_image`) and bytes (`resunetpp serve`)."""
    a = _to_uint8(a)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    elif a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[-1] == 4:
        a = a[:, :, :3]
    return np.ascontiguousarray(a)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB. Grayscale is repeated, alpha dropped, 16-bit scaled to 8-bit."""
    path = Path(path)
    a = to_rgb(_read_array(path))
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageReadError(path, f"image has no pixels ({a.shape})")
    return a


def mask_grey(path: str | os.PathLike) -> np.ndarray:
    """(H, W) grey level of a mask file on 0..255: the mean of its colour channels (float for colour files)."""
    path = Path(path)
    a = _to_uint8(_read_array(path))
    if a.ndim == 3:
        a = a[:, :, :3].mean(axis=2)
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageReadError(path, f"mask has no pixels ({a.shape})")
    return a


def mask_from_grey(grey: np.ndarray, values: str = "auto") -> np.ndarray:
    """(H, W) bool from a mask's grey levels. values="255": foreground is grey > 127 (0/255 masks, JPEG
    noise and CVC-ClinicDB's faint 1..20 background values fall on the right side); "01": foreground
    is grey > 0 (0/1 label images); "auto" (default): "01" when the largest value is exactly 1, else "255"."""
    if values not in MASK_VALUES:
        raise ValueError(f"unknown mask values {values!r}; choose one of {', '.join(MASK_VALUES)}")
    if values == "01" or (values == "auto" and grey.size and int(grey.max()) == 1):
        return grey > 0
    return grey > 127


def read_mask(path: str | os.PathLike, values: str = "auto") -> np.ndarray:
    """(H, W) bool: the polyp pixels of a mask file (see `mask_from_grey` for `values`).

    Masks come as 1- or 3-channel files, often JPEG with noise around 0 and 255; the mean of
    the colour channels is thresholded at 127, so JPEG ringing and faint values (1..20 in
    CVC-ClinicDB) fall on the right side. 0/1 label images (largest value 1) are detected.
    """
    return mask_from_grey(mask_grey(path), values)
