"""The device a command runs on: "auto", "cpu", "cuda" or "cuda:N", checked against this machine."""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A device name that is unknown, or names hardware this machine does not have (a usage error)."""


def resolve_device(name: str | torch.device) -> torch.device:
    """The device `name` names, checked against this machine.

    Args:
        name: "auto" (CUDA when available, else the CPU), "cpu", "cuda", "cuda:N", ..., or a torch.device.

    Returns:
        The torch.device.

    Raises:
        DeviceError: An unknown name, or a CUDA device this machine does not have.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r}: CUDA is not available on this machine; use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
