"""Train/val/test splits as JSON files of ids (the paper's protocol: 80/10/10 by seed).

File format: ``{"dataset": name, "seed": s, "train": [...], "val": [...], "test": [...]}``.

`make_split` sorts the ids naturally ("2" before "10"; CVC-ClinicDB's ids are its file stems "1".."612",
so they sort numerically), shuffles them with Python's ``random.Random(seed)`` (stable across Python
versions and platforms), takes round(0.1 n) for val and test each and the rest for train, and sorts each
part naturally. The committed splits (`default_split`) are ``make_split(ids, seed=0)`` over the real
datasets' ids: 800/100/100 for Kvasir-SEG and 490/61/61 for CVC-ClinicDB.

Leak-free splits (`grouped_split_path`, `resunetpp.data.leaks.grouped_split`): `cvc-clinicdb-by-sequence.json`
keeps each of the 31 video sequences (`cvc-clinicdb-sequences.json`) in one part, 490/61/61 frames;
`kvasir-seg-by-near-duplicates.json` keeps each near-duplicate group (`kvasir-seg-near-duplicates.json`) in one
part, 800/100/100. Both are ``grouped_split(ids, groups, seed=0)``.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Sequence
from importlib.resources import files
from pathlib import Path

from resunetpp.data.layouts import KNOWN_DATASETS, natural_sorted
from resunetpp.utils import write_json

PARTS = ("train", "val", "test")


def make_split(ids: Iterable[str], seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, list[str]]:
    """A random split of `ids`, the same for the same ids and seed.

    Args:
        ids: the dataset's ids (unique).
        seed: the shuffle's seed.
        fractions: the train, val and test shares: three non-negative numbers summing to 1.

    Returns:
        {"train": [...], "val": [...], "test": [...]}: a seeded shuffle of the naturally sorted ids, cut by
        `fractions` (val and test rounded), each part naturally sorted.

    Raises:
        ValueError: duplicate ids, or `fractions` that are not three shares summing to 1.
    """
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"make_split: duplicate ids {dup}")
    fractions = [float(f) for f in fractions]
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"make_split: fractions must be three non-negative numbers summing to 1, got {fractions}")
    order = natural_sorted(ids)
    random.Random(seed).shuffle(order)
    n = len(order)
    n_val, n_test = round(fractions[1] * n), round(fractions[2] * n)
    n_train = n - n_val - n_test
    parts = (order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:])
    return {name: natural_sorted(part) for name, part in zip(PARTS, parts)}


def save_split(split: dict, path: str | os.PathLike, dataset: str | None = None, seed: int | None = None) -> Path:
    """Write a split (as made by make_split or read by load_split) as JSON; returns the path."""
    _validate(split, str(path))
    obj = {"dataset": dataset if dataset is not None else split.get("dataset"),
           "seed": seed if seed is not None else split.get("seed")}
    obj.update({p: list(split[p]) for p in PARTS})
    write_json(path, obj)
    return Path(path)


def _validate(obj, where: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: a split must be a JSON object with train, val and test lists")
    seen: dict[str, str] = {}
    for part in PARTS:
        ids = obj.get(part)
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError(f"{where}: {part!r} must be a list of id strings")
        for i in ids:
            if i in seen:
                where_else = "twice in " + part if seen[i] == part else f"in both {seen[i]!r} and {part!r}"
                raise ValueError(f"{where}: id {i!r} appears {where_else}")
            seen[i] = part
    if not obj["train"]:
        raise ValueError(f"{where}: the train list is empty")


def load_split(path: str | os.PathLike) -> dict:
    """Read and validate a split file; errors name the file."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: split file not found") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON split file ({e})") from None
    _validate(obj, str(path))
    return {"dataset": obj.get("dataset"), "seed": obj.get("seed"), **{p: obj[p] for p in PARTS}}


def default_split(name: str) -> Path:
    """Path of the committed split for "kvasir-seg" or "cvc-clinicdb"."""
    return _committed(name, {k: k for k in KNOWN_DATASETS}, "split", "make_split")


# Leak-free splits (resunetpp.data.leaks): whole video sequences / near-duplicate groups in one part each
GROUPED_SPLITS = {"cvc-clinicdb": "cvc-clinicdb-by-sequence", "kvasir-seg": "kvasir-seg-by-near-duplicates"}


def grouped_split_path(name: str) -> Path:
    """Path of the committed grouped split: CVC-ClinicDB by sequence, Kvasir-SEG by near-duplicate group."""
    return _committed(name, GROUPED_SPLITS, "grouped split",
                      "leaks.grouped_split")


def _committed(name: str, files_by_name: dict[str, str], what: str, how: str) -> Path:
    key = name.lower()
    if key not in files_by_name:
        raise KeyError(f"no committed {what} for {name!r}; known: {', '.join(files_by_name)} (make one with `{how}`)")
    return Path(str(files("resunetpp") / "splits" / f"{files_by_name[key]}.json"))
