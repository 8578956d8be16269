"""Where training runs: the device, the process group under torchrun, seeds and RNG states.

`start(cfg)` returns a `Runtime` (device, rank, world size, bf16 autocast, determinism) and sets up
the process group when torchrun started several processes; `stop(rt)` undoes what it changed.
CUDA runs use bf16 autocast and cudnn.benchmark; CPU runs float32 and deterministic algorithms.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from resunetpp.device import resolve_device
from resunetpp.inference.transforms import default_normalization


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    amp: bool = False
    deterministic: bool = True
    previous_determinism: tuple[bool, bool] = (False, False)

    @property
    def ddp(self) -> bool:
        return self.world > 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def start(cfg) -> Runtime:
    """The device and (under torchrun, which sets WORLD_SIZE) the process group: NCCL on CUDA, gloo on CPU."""
    device, rank, world = resolve_device(cfg.device), 0, 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    cuda = device.type == "cuda"
    rt = Runtime(device, rank, world, amp=cuda if cfg.amp is None else cfg.amp,
                 deterministic=(not cuda) if cfg.deterministic is None else cfg.deterministic,
                 previous_determinism=(torch.are_deterministic_algorithms_enabled(),
                                       torch.is_deterministic_algorithms_warn_only_enabled()))
    if rt.deterministic and cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(rt.deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = cuda and not rt.deterministic
    return rt


def stop(rt: Runtime) -> None:
    torch.use_deterministic_algorithms(rt.previous_determinism[0], warn_only=rt.previous_determinism[1])
    if rt.ddp and dist.is_initialized():
        dist.destroy_process_group()


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain types, so `torch.load(weights_only=True)` reads it."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def normalization_on(device: torch.device) -> dict[str, torch.Tensor]:
    """default_normalization() as tensors on `device`: given lists, `normalize` would copy them to the
    GPU on every batch, and each such copy synchronises the device."""
    return {k: torch.tensor(v, device=device) for k, v in default_normalization().items()}


def weights_finite(model: torch.nn.Module, ddp: bool = False) -> bool:
    """All parameters finite, with one device sync (one foreach norm: NaN/inf anywhere makes it non-finite).
    Under DDP the ranks agree on the verdict, so none of them waits on another that stopped."""
    params = [p.detach() for p in model.parameters()]
    ok = torch.isfinite(torch.stack(torch._foreach_norm(params)).sum()).float().reshape(1)
    if ddp:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())
