"""The browser page (`/`, its files under `/static`) and the service routes: `GET /v1/health` (liveness and
load) and `GET /v1/model` (the model card).

The page and its files are public; they hold no data. The page is plain HTML/CSS/JS, nothing fetched from
elsewhere (its Content-Security-Policy allows only this server).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from resunetpp.inference.segmenter import Segmenter
from resunetpp.serve.state import DISCLAIMER, ERROR_DOC, ServeSettings, check_token, state_of
from resunetpp.version import __version__

STATIC_DIR = Path(__file__).parent / "static"
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
                           "connect-src 'self' ws: wss:; style-src 'self'; script-src 'self'")

router = APIRouter()


@router.get("/", include_in_schema=False)
async def page():
    return FileResponse(STATIC_DIR / "index.html",
                        headers={"Cache-Control": "no-cache", "Content-Security-Policy": CONTENT_SECURITY_POLICY})


@router.get("/v1/health", tags=["service"])
async def health(request: Request):
    """Liveness and load; no token needed."""
    state = state_of(request)
    gate, settings, stats = state.gate, state.settings, state.stats
    return {"status": "ok", "version": __version__, "auth_required": bool(settings.token),
            "queue": {"pending": gate.pending, "capacity": gate.capacity},
            "batching": {"images_waiting": gate.images_waiting,
                         "expected_wait_s": round(gate.expected_wait_s(), 2), "max_queue_s": settings.max_queue_s,
                         "infer_batch": settings.infer_batch, "infer_workers": settings.infer_workers,
                         "running": state.batcher.running, "batches": state.batcher.batches,
                         "model_ms_per_image": None if gate.s_per_image is None else
                         round(gate.s_per_image * 1000, 1)},
            "streams": stats.streams, "uptime_s": round(time.time() - stats.started, 1)}


@router.get("/v1/model", tags=["service"], responses={401: ERROR_DOC})
async def model(request: Request):
    """The model card: architecture, weights, input size, threshold, preprocessing, metrics, limits."""
    state = state_of(request)
    check_token(state.settings, request.headers.get("authorization"))
    return model_card(state.seg, state.settings)


def model_card(seg: Segmenter, settings: ServeSettings) -> dict[str, Any]:
    """What `GET /v1/model` answers.

    Args:
        seg: The served segmenter.
        settings: The server's limits (shown, the token left out).

    Returns:
        The model, its weights and preprocessing, its training data and metrics, the weights folder's
        MODEL_CARD.md or README.md (at most 20000 characters), the intended use and the limits.
    """
    cfg = seg.config
    return {
        "model": cfg.get("model"),
        "model_kwargs": cfg.get("model_kwargs", {}),
        "parameters": _parameters(seg),
        "weights": Path(seg.weights).name if seg.weights else None,
        "backend": seg.backend,
        "precision": seg.precision,
        "input_size": list(seg.input_size),
        "threshold": seg.threshold,
        "normalization": {"mean": seg.mean, "std": seg.std},
        "tta": seg.tta,
        "crf": seg.crf,
        "min_area": seg.min_area,
        "dataset": cfg.get("dataset"),
        "split": cfg.get("split") if isinstance(cfg.get("split"), (str, type(None))) else "custom",
        "metrics": cfg.get("metrics"),
        "trained_with_version": cfg.get("version"),
        "server_version": __version__,
        "intended_use": DISCLAIMER,
        "card": _card_text(seg),
        "limits": asdict(settings) | {"token": None},
    }


def _parameters(seg: Segmenter) -> int | None:
    model = getattr(getattr(seg, "_run", None), "model", None)  # a torch model; None for onnx / OpenVINO
    return None if model is None else sum(p.numel() for p in model.parameters())


def _card_text(seg: Segmenter) -> str | None:
    if seg.weights is None:
        return None
    folder = seg.weights if Path(seg.weights).is_dir() else Path(seg.weights).parent
    for name in ("MODEL_CARD.md", "README.md"):
        if (folder / name).is_file():
            return (folder / name).read_text(errors="replace")[:20000]
    return None
