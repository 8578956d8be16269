"""The bundled trained weights, found by looking in the package's `weights/` folder (not a fixed list): every
sub-folder with a `model.safetensors` and a `config.json` is one, named after its folder.

`bundled()` gives, for each (the default first, then by name): the name, the architecture (config "model"),
the dataset it was trained on, its test Dice (config metrics.test.dice, from the model card's evaluation),
the size of its weights file on disk, and its folder. `resunetpp models` prints them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from resunetpp import hub


@dataclass(frozen=True)
class BundledWeights:
    name: str
    model: str | None  # the registry name of the architecture
    dataset: str | None
    test_dice: float | None
    size_bytes: int  # model.safetensors on disk
    folder: Path

    @property
    def size_mib(self) -> float:
        return self.size_bytes / 2**20


def default_name() -> str | None:
    """The bundled model `Segmenter()` and `--weights`-less commands use."""
    return hub.DEFAULT_PRETRAINED


def bundled(weights_dir: str | Path | None = None) -> list[BundledWeights]:
    """Every bundled trained model under `weights_dir` (default: the package's; module docstring); [] if none."""
    out = []
    root = Path(hub.WEIGHTS_DIR if weights_dir is None else weights_dir)
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        weights, config = folder / hub.WEIGHTS_NAME, folder / hub.CONFIG_NAME
        if not (weights.is_file() and config.is_file()):
            continue
        try:
            cfg = json.loads(config.read_text())
        except (OSError, ValueError):
            cfg = {}
        test = ((cfg.get("metrics") or {}).get("test") or {}) if isinstance(cfg, dict) else {}
        dice = test.get("dice") if isinstance(test, dict) else None
        out.append(BundledWeights(name=folder.name, model=cfg.get("model"), dataset=cfg.get("dataset"),
                                  test_dice=float(dice) if isinstance(dice, (int, float)) else None,
                                  size_bytes=weights.stat().st_size, folder=folder))
    default = default_name()
    return sorted(out, key=lambda w: (w.name != default, w.name))
