"""`resunetpp serve`: the HTTP API, WebSocket stream and browser page (needs the `serve` extra:
fastapi, uvicorn, python-multipart). `create_app(segmenter)` builds the FastAPI app."""

from __future__ import annotations

from resunetpp.serve.app import create_app
from resunetpp.serve.decode import ApiError, decode_image
from resunetpp.serve.state import DISCLAIMER, TOKEN_ENV, ServeSettings
from resunetpp.serve.stream import websocket_library

__all__ = ["DISCLAIMER", "TOKEN_ENV", "ApiError", "ServeSettings", "create_app", "decode_image",
           "websocket_library"]
