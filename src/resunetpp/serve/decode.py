"""Images from request bodies, decoded in memory (nothing is written to disk), and the API's errors.

The decoder is the CLI's own (`resunetpp.io.decode_array`, then `to_rgb`): the same formats, the same
TIFF handling (a multi-page TIFF is refused by both), the pixel count read from the header *before*
decoding (a decompression bomb is refused without allocating its pixels). This module only turns
its `ImageReadError` into the API's error (status, code, message).
"""

from __future__ import annotations

import numpy as np

from resunetpp.io import ImageReadError, decode_array, to_rgb


class ApiError(Exception):
    """A request the API refuses: HTTP `status`, a stable machine-readable `code`, a human `message`."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def body(self) -> dict[str, object]:
        return {"error": self.code, "message": self.message, "status": self.status}


def decode_image(data: bytes, what: str = "image", max_pixels: int = 25_000_000) -> np.ndarray:
    """(H, W, 3) uint8 RGB from encoded bytes, or an `ApiError` naming the problem."""
    if not data:
        raise ApiError(400, "empty", f"{what}: empty body (0 bytes); send the image file's bytes")
    try:
        a = to_rgb(decode_array(data, what, max_pixels))
    except ImageReadError as e:
        status = 413 if e.code == "too_many_pixels" else 400
        code = e.code if e.code in ("too_many_pixels", "truncated", "corrupt_image") else "not_an_image"
        message = str(e)
        if e.code == "too_many_pixels":
            message += " (the server's max_pixels sets the limit)"
        raise ApiError(status, code, message) from None
    if a.ndim != 3 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ApiError(400, "not_an_image", f"{what}: image has no pixels ({a.shape})")
    return np.ascontiguousarray(a)
