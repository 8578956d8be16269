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

Published splits (`official_split_path`): `kvasir-seg-official.json` is Kvasir-SEG's official 880/120 split
(ColonSegNet's `val.txt`, used by DDANet, NanoNet, HarDNet-MSEG and others): "test" holds the 120 published
ids in the published file's order, and "val" (88) is carved from the 880 official training ids with seed 0,
leaving 792 for "train", so model selection never sees the official test images. It is
``official_split(ids, test_ids, seed=0, val_fraction=0.1)``, written by `save_official_split`; its extra
fields ("source", "val_from", "made_by") say so, and `load_split` ignores them.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence
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


def save_split(split: dict, path: str | os.PathLike, dataset: str | None = None, seed: int | None = None,
               extra: Mapping[str, str] | None = None) -> Path:
    """Write a split (as made by make_split or read by load_split) as JSON; returns the path.

    `extra` adds fields (a description: source, method) between "seed" and the parts; `load_split` skips them.
    """
    _validate(split, str(path))
    obj = {"dataset": dataset if dataset is not None else split.get("dataset"),
           "seed": seed if seed is not None else split.get("seed")}
    for key, value in (extra or {}).items():
        if key in obj or key in PARTS:
            raise ValueError(f"save_split: extra field {key!r} would replace the split's own")
        obj[key] = value
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


# Published splits: the test part as its authors published it, a seeded val carved from their training part
OFFICIAL_SPLITS = {"kvasir-seg": "kvasir-seg-official"}

OFFICIAL_SOURCES = {
    "kvasir-seg": "Kvasir-SEG's official 880/120 split as published with the dataset and used by ColonSegNet "
                  "(Jha et al., IEEE Access 2021), DDANet, NanoNet, HarDNet-MSEG and others: the test ids are the "
                  "val.txt of the DebeshJha/ColonSegNet repository, commit bfee960, in that file's order.",
}


def official_split_path(name: str) -> Path:
    """Path of the committed published split: Kvasir-SEG's official 880/120 split.

    Its "test" part is the 120 published test ids (in the published order); "train" (792) and "val" (88)
    share the 880 official training ids by seed 0, so selecting a model on "val" never sees a test image.
    Give it to `resunetpp train --split` and `resunetpp evaluate --split` like any split file.

    Args:
        name: "kvasir-seg" (case-insensitive).

    Raises:
        KeyError: a dataset without a committed published split; the message lists the known ones.
    """
    return _committed(name, OFFICIAL_SPLITS, "official split", "save_official_split")


def read_id_list(path: str | os.PathLike) -> list[str]:
    """The ids of a text file, one a line, in the file's order (blank lines and "#" lines skipped)."""
    lines = (line.strip() for line in Path(path).read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def official_split(all_ids: Iterable[str], test_ids: Sequence[str], seed: int = 0,
                   val_fraction: float = 0.1) -> dict[str, list[str]]:
    """A published train/test split with a validation part carved from its training part.

    Args:
        all_ids: every id of the dataset (unique).
        test_ids: the published test ids, kept in their order; all of them must be in `all_ids`.
        seed: the seed that picks val among the other ids.
        val_fraction: val's share of the other ids (rounded), in [0, 1).

    Returns:
        {"train": [...], "val": [...], "test": [...]}: test = `test_ids` as given; train and val =
        ``make_split(other ids, seed, (1 - val_fraction, val_fraction, 0))``'s train and val, each sorted
        naturally. Kvasir-SEG: 792 / 88 / 120.

    Raises:
        ValueError: duplicate ids, test ids missing from `all_ids`, or a `val_fraction` outside [0, 1).
    """
    all_ids, test_ids = [str(i) for i in all_ids], [str(i) for i in test_ids]
    if not 0 <= val_fraction < 1:
        raise ValueError(f"official_split: val_fraction must be in [0, 1), got {val_fraction}")
    for what, ids in (("ids", all_ids), ("test ids", test_ids)):
        if len(set(ids)) != len(ids):
            dup = natural_sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise ValueError(f"official_split: duplicate {what} {dup}")
    known = set(all_ids)
    missing = [i for i in test_ids if i not in known]
    if missing:
        raise ValueError(f"official_split: {len(missing)} test ids are not among the dataset's ids, e.g. {missing[:5]}")
    test = set(test_ids)
    rest = make_split([i for i in all_ids if i not in test], seed=seed,
                      fractions=(1.0 - val_fraction, val_fraction, 0.0))
    return {"train": rest["train"], "val": rest["val"], "test": test_ids}


def save_official_split(name: str, all_ids: Iterable[str], test_ids: Sequence[str], path: str | os.PathLike,
                        seed: int = 0, val_fraction: float = 0.1) -> Path:
    """Write `official_split(all_ids, test_ids, seed, val_fraction)` with fields naming its source and making.

    The committed `kvasir-seg-official.json` is ``save_official_split("kvasir-seg", <the image file stems of
    Kvasir-SEG/images>, read_id_list("kvasir-seg-official-val.txt"), path)`` (a test checks it).

    Raises:
        KeyError: a `name` without a known source (`OFFICIAL_SOURCES`).
        ValueError: as `official_split`.
    """
    key = name.lower()
    if key not in OFFICIAL_SOURCES:
        raise KeyError(f"no published split known for {name!r}; known: {', '.join(OFFICIAL_SOURCES)}")
    split = official_split(all_ids, test_ids, seed=seed, val_fraction=val_fraction)
    n_train, n_val, n_test = (len(split[p]) for p in PARTS)
    extra = {
        "source": OFFICIAL_SOURCES[key],
        "val_from": f"val ({n_val}) was carved from the official training part ({n_train + n_val} ids) with seed "
                    f"{seed} (val_fraction {val_fraction}), leaving {n_train} for train; test ({n_test}) is the "
                    "official test part, never used for model selection.",
        "made_by": f"resunetpp.data.splits.save_official_split({key!r}, <image file stems of the dataset's "
                   f"images/>, read_id_list(<the published test list>), path, seed={seed}, "
                   f"val_fraction={val_fraction})",
    }
    return save_split(split, path, dataset=key, seed=seed, extra=extra)


# committed splits a command can ask for by name (`--split official`, `--split grouped`)
NAMED_SPLITS = {"official": official_split_path, "grouped": grouped_split_path}


def named_split_path(kind: str, name: str) -> Path:
    """The committed split `kind` ("official": the published one; "grouped": the leak-free one) of dataset
    `name`.

    Raises:
        KeyError: no such split for that dataset; the message lists the datasets that have one.
    """
    return NAMED_SPLITS[kind](name)


def dataset_part(split: dict, part: str, name: str) -> list[str] | None:
    """The ids of dataset `name` in `part` of `split`: all of them when the split is that dataset's, its
    "<name>/<id>" ids without the prefix when the split joins several datasets ("a+b", `train --data A:B`),
    None when it holds none of `name`'s."""
    datasets = str(split.get("dataset") or "").split("+")
    if datasets == [name]:
        return list(split[part])
    if name not in datasets:
        return None
    return [k.split("/", 1)[1] for k in split[part] if k.startswith(f"{name}/")]
