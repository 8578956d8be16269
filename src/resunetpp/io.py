"""Reading images and masks as they really come: JPEG, PNG, BMP and TIFF (including
CVC-ClinicDB's 3-sample TIFFs that Pillow cannot open), grayscale, RGBA, palette and 16-bit.

Every failure raises `ImageReadError`, whose message starts with the file's path.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
MAX_PIXELS = 100_000_000  # larger images are refused rather than exhausting memory
MASK_VALUES = ("auto", "255", "01")  # how mask files encode the polyp (see read_mask)


class ImageReadError(ValueError):
    """An image or mask that cannot be used; `path` names it (a file, or what a server received), `code` says
    why in one stable word (empty, not_an_image, truncated, corrupt_image, too_many_pixels, not_found)."""

    def __init__(self, path: str | os.PathLike, reason: str, code: str = "not_an_image"):
        self.path = Path(path)
        self.reason = reason
        self.code = code
        super().__init__(f"{path}: {reason}")


TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


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
        raise ImageReadError(path, "file not found", "not_found")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)", "empty")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageReadError(path, f"unreadable file ({e.strerror or e})", "not_found") from None
    return decode_array(data, path)


# why bytes that no decoder recognises are refused: the same words from every reader (files, uploads, checks)
NOT_AN_IMAGE = ("not a readable image (not an image Pillow or tifffile can read: send a JPEG, PNG, BMP, TIFF or "
                "WebP file)")


def _too_many(what, w: int, h: int, limit: int) -> ImageReadError:
    return ImageReadError(what, f"image too large: {w}x{h} = {w * h:,} pixels, over the limit of {limit:,} "
                          "(refused before decoding)", "too_many_pixels")


def decode_array(data: bytes, what: str | os.PathLike = "image", max_pixels: int | None = None) -> np.ndarray:
    """The one image decoder of the CLI and the server: encoded bytes (JPEG, PNG, BMP, TIFF, WebP) -> the
    decoded array (any dtype and channels; `to_rgb` makes it RGB), or `ImageReadError` naming `what`.
    The pixel count is read from the header and checked against `max_pixels` (default `MAX_PIXELS`)
    before decoding, so a decompression bomb is refused without allocating its pixels. TIFFs that
    Pillow cannot open (CVC-ClinicDB's 3-sample ones) go through tifffile. A TIFF of several pages
    (a stack, not one image) is refused, by every front end alike."""
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if not data:
        raise ImageReadError(what, "empty (0 bytes)", "empty")
    if data[:4] in TIFF_MAGIC:
        try:
            return _decode_pil(data, what, limit)
        except ImageReadError as e:
            if e.code in ("too_many_pixels", "multi_page"):
                raise
            return _decode_tiff(data, what, limit, e)  # e.g. CVC-ClinicDB's TIFFs, which Pillow cannot open
    return _decode_pil(data, what, limit)


def _decode_tiff(data: bytes, what, limit: int, pillow_error: ImageReadError) -> np.ndarray:
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            pages = [p for p in tif.pages if not getattr(p, "is_reduced", False)]
            if len(pages) > 1:
                raise _multi_page(what, len(pages))
            page = tif.pages[0]
            shape = tuple(page.shape)
            planar = len(shape) == 3 and shape[0] in (3, 4) and shape[-1] not in (3, 4)
            h, w = (shape[1], shape[2]) if planar else (shape[0], shape[1])
            if h * w > limit:
                raise _too_many(what, w, h, limit)
            a = page.asarray()
    except ImageReadError:
        raise
    except Exception as e:
        raise ImageReadError(what, f"unreadable TIFF ({type(e).__name__}: {e}; Pillow: {pillow_error.reason})",
                             "not_an_image") from None
    if a.ndim == 3 and a.shape[0] in (3, 4) and a.shape[-1] not in (3, 4):
        a = np.moveaxis(a, 0, -1)  # planar (C, H, W) TIFF
    if a.ndim > 3 or a.ndim < 2 or (a.ndim == 3 and a.shape[-1] not in (1, 3, 4)):
        raise ImageReadError(what, f"unsupported TIFF layout {a.shape} (expected one 2-D image)", "not_an_image")
    return a


def _multi_page(what, pages: int) -> ImageReadError:
    return ImageReadError(what, f"a TIFF of {pages} pages (a stack, not one image); save each page as its own "
                          "file", "multi_page")


def _decode_pil(data: bytes, what, limit: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():  # huge images get our own clean error below, not Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:
        raise ImageReadError(what, f"image too large ({e})", "too_many_pixels") from None
    except UnidentifiedImageError:
        raise ImageReadError(what, NOT_AN_IMAGE, "not_an_image") from None
    except Exception as e:
        raise decode_error(what, e) from None
    with im:
        if im.width * im.height > limit:
            raise _too_many(what, im.width, im.height, limit)
        if im.format == "TIFF" and getattr(im, "n_frames", 1) > 1:
            raise _multi_page(what, im.n_frames)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im.load()
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV", "LA", "PA"):
                im = im.convert("RGBA" if im.mode in ("LA", "PA") else "RGB")
            return np.asarray(im)
        except Image.DecompressionBombError as e:
            raise ImageReadError(what, f"image too large ({e})", "too_many_pixels") from None
        except Exception as e:
            raise decode_error(what, e) from None


def decode_error(what, e: Exception) -> ImageReadError:
    text = str(e)
    if "truncat" in text.lower() or isinstance(e, EOFError):
        return ImageReadError(what, f"not a readable image: the image data is truncated (an incomplete upload or "
                              f"file): {text}", "truncated")
    return ImageReadError(what, f"not a readable image: its header was read but its data cannot be decoded "
                          f"({type(e).__name__}: {text})", "corrupt_image")


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
