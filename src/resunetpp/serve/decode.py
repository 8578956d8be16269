"""Images from request bodies, decoded in memory (nothing is written to disk), and the API's errors.

The rules match `resunetpp.io.read_image` (16-bit, palette, RGBA, grayscale and TIFFs that Pillow
cannot open all become (H, W, 3) uint8 RGB; no EXIF rotation), with the checks a server needs first:
0 bytes, a size limit, and the pixel count read from the header *before* decoding (a decompression
bomb is refused without allocating its pixels).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..io import to_rgb

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class ApiError(Exception):
    """A request the API refuses: HTTP `status`, a stable machine-readable `code`, a human `message`."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def body(self) -> dict[str, object]:
        return {"error": self.code, "message": self.message, "status": self.status}


def _too_many(what: str, w: int, h: int, max_pixels: int) -> ApiError:
    return ApiError(413, "too_many_pixels", f"{what}: {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
                    "(a decompression bomb is refused before decoding; the server's --max-pixels sets the limit)")


def _decode_tiff(data: bytes, what: str, max_pixels: int) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages[0]
            shape = tuple(page.shape)
            planar = len(shape) == 3 and shape[0] in (3, 4) and shape[-1] not in (3, 4)
            h, w = (shape[1], shape[2]) if planar else (shape[0], shape[1])
            if h * w > max_pixels:
                raise _too_many(what, w, h, max_pixels)
            a = page.asarray()
    except ApiError:
        raise
    except Exception as e:
        raise ApiError(400, "not_an_image", f"{what}: unreadable TIFF ({type(e).__name__}: {e})") from None
    if a.ndim == 3 and a.shape[0] in (3, 4) and a.shape[-1] not in (3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim > 3 or a.ndim < 2 or (a.ndim == 3 and a.shape[-1] not in (1, 3, 4)):
        raise ApiError(400, "not_an_image", f"{what}: unsupported TIFF layout {a.shape} (expected one 2-D image)")
    return a


def _decode_pil(data: bytes, what: str, max_pixels: int) -> np.ndarray:
    try:
        im = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:
        raise ApiError(413, "too_many_pixels", f"{what}: {e}") from None
    except UnidentifiedImageError:
        raise ApiError(400, "not_an_image", f"{what}: not an image Pillow or tifffile can read "
                       "(send a JPEG, PNG, BMP, TIFF or WebP file)") from None
    except Exception as e:
        raise _load_error(what, e) from None
    with im:
        if im.width * im.height > max_pixels:
            raise _too_many(what, im.width, im.height, max_pixels)
        try:
            im.load()
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV", "LA", "PA"):
                im = im.convert("RGBA" if im.mode in ("LA", "PA") else "RGB")
            return np.asarray(im)
        except Image.DecompressionBombError as e:
            raise ApiError(413, "too_many_pixels", f"{what}: {e}") from None
        except Exception as e:
            raise _load_error(what, e) from None


def _load_error(what: str, e: Exception) -> ApiError:
    text = str(e)
    if "truncat" in text.lower() or isinstance(e, EOFError):
        return ApiError(400, "truncated", f"{what}: the image data is truncated (incomplete upload or file): {text}")
    return ApiError(400, "corrupt_image", f"{what}: the image header was read but its data cannot be decoded "
                    f"({type(e).__name__}: {text})")


def decode_image(data: bytes, what: str = "image", max_pixels: int = 25_000_000) -> np.ndarray:
    """(H, W, 3) uint8 RGB from encoded bytes, or an `ApiError` naming the problem."""
    if not data:
        raise ApiError(400, "empty", f"{what}: empty body (0 bytes); send the image file's bytes")
    if data[:4] in TIFF_MAGIC:
        try:
            a = _decode_pil(data, what, max_pixels)
        except ApiError as e:
            if e.code == "too_many_pixels":
                raise
            a = _decode_tiff(data, what, max_pixels)  # e.g. CVC-ClinicDB's TIFFs, which Pillow cannot open
    else:
        a = _decode_pil(data, what, max_pixels)
    a = to_rgb(a)
    if a.ndim != 3 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ApiError(400, "not_an_image", f"{what}: image has no pixels ({a.shape})")
    return np.ascontiguousarray(a)
