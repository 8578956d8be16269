"""Kvasir-SEG's official 880/120 split, committed as `kvasir-seg-official.json`: its shape, its source (the
published test list in ../shared/splits, skipped when absent), the real ids (../shared/data, skipped when absent)
and its recomputation by `official_split` / `save_official_split`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from resunetpp.data.splits import (
    OFFICIAL_SPLITS,
    load_split,
    official_split,
    official_split_path,
    read_id_list,
    save_official_split,
)

# The published lists live beside the project, as the datasets do (conftest.SHARED_DATA): never commit them.
# RESUNETPP_SPLITS overrides the folder.
SHARED_SPLITS = Path(os.environ.get("RESUNETPP_SPLITS", Path(__file__).resolve().parents[2].parent / "shared"
                                    / "splits"))
PUBLISHED = SHARED_SPLITS / "kvasir-seg-official-val.txt"


@pytest.fixture(scope="module")
def committed() -> dict:
    return load_split(official_split_path("kvasir-seg"))


def published_test_ids() -> list[str]:
    if not PUBLISHED.is_file():
        pytest.skip(f"published Kvasir-SEG test list not found at {PUBLISHED} (../shared/splits beside the "
                    "checkout; RESUNETPP_SPLITS overrides)")
    return read_id_list(PUBLISHED)


def test_the_committed_file_is_found_and_loads(committed):
    path = official_split_path("Kvasir-SEG")
    assert path.name == "kvasir-seg-official.json" and path.is_file()
    assert OFFICIAL_SPLITS == {"kvasir-seg": "kvasir-seg-official"}
    with pytest.raises(KeyError, match="no committed official split for 'cvc-clinicdb'"):
        official_split_path("cvc-clinicdb")
    assert committed["dataset"] == "kvasir-seg" and committed["seed"] == 0
    train, val, test = (committed[p] for p in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (792, 88, 120)
    assert len(set(train) | set(val) | set(test)) == 1000  # disjoint (load_split also refuses overlaps)
    raw = json.loads(path.read_text())
    assert "ColonSegNet" in raw["source"] and "bfee960" in raw["source"]
    assert "seed 0" in raw["val_from"] and "save_official_split" in raw["made_by"]
    assert list(raw) == ["dataset", "seed", "source", "val_from", "made_by", "train", "val", "test"]


def test_recomputing_it_gives_the_same_file(committed, tmp_path):
    ids = committed["train"] + committed["val"] + committed["test"]
    again = official_split(sorted(ids), committed["test"], seed=0, val_fraction=0.1)
    assert again == {p: committed[p] for p in ("train", "val", "test")}
    assert official_split(list(reversed(ids)), committed["test"]) == again  # the ids' order does not matter
    out = save_official_split("kvasir-seg", ids, committed["test"], tmp_path / "s.json")
    assert out.read_bytes() == official_split_path("kvasir-seg").read_bytes()
    other = official_split(ids, committed["test"], seed=1)
    assert other["test"] == again["test"] and other["val"] != again["val"]


def test_the_test_part_is_the_published_list(committed):
    published = published_test_ids()
    assert len(published) == 120
    assert committed["test"] == published  # the same ids, in the published file's order


def test_the_ids_are_the_dataset_s_image_stems(committed, kvasir_dir):
    stems = sorted(p.stem for p in (kvasir_dir / "images").iterdir() if p.is_file())
    assert sorted(committed["train"] + committed["val"] + committed["test"]) == stems


def test_official_split_keeps_the_test_order_and_checks_its_input():
    ids = [str(i) for i in range(1, 101)]
    s = official_split(ids, ["50", "3", "77"], seed=0, val_fraction=0.25)
    assert s["test"] == ["50", "3", "77"]
    assert (len(s["train"]), len(s["val"])) == (73, 24)  # round(0.25 * 97) = 24
    assert not set(s["val"]) & {"50", "3", "77"} and s["val"] == sorted(s["val"], key=int)
    with pytest.raises(ValueError, match="not among the dataset's ids"):
        official_split(ids, ["101"])
    with pytest.raises(ValueError, match="duplicate test ids"):
        official_split(ids, ["1", "1"])
    with pytest.raises(ValueError, match="duplicate ids"):
        official_split(ids + ["1"], ["2"])
    with pytest.raises(ValueError, match="val_fraction"):
        official_split(ids, ["1"], val_fraction=1.0)


def test_read_id_list_skips_blanks_and_comments(tmp_path):
    f = tmp_path / "ids.txt"
    f.write_text("# published test ids\nb\n\n  a  \nc\n")
    assert read_id_list(f) == ["b", "a", "c"]


def test_train_and_evaluate_take_the_committed_splits_by_name(tmp_path):
    """`--split official` / `--split grouped`: train gets the whole file, evaluate its test part; a dataset
    without such a split is refused in one line that lists those that have one."""
    from typer.testing import CliRunner

    from helpers.training import write_discs
    from resunetpp.cli import app
    from resunetpp.data.splits import grouped_split_path, load_split
    from resunetpp.evaluation.evaluator import resolve_ids
    from resunetpp.training.config import TrainConfig, resolve_split

    split, source = resolve_split(TrainConfig(data="x", split="official"), "kvasir-seg")
    assert [len(split[p]) for p in ("train", "val", "test")] == [792, 88, 120] and "kvasir-seg-official" in source
    split, _ = resolve_split(TrainConfig(data="x", split="grouped"), "cvc-clinicdb")
    assert split["test"] == load_split(grouped_split_path("cvc-clinicdb"))["test"]
    kvasir = write_discs(tmp_path / "Kvasir-SEG", n=2)  # a folder named like the dataset is taken for it
    ids, source = resolve_ids(kvasir, "official")
    assert ids == load_split(official_split_path("kvasir-seg"))["test"] and source.startswith("test of the official")
    r = CliRunner().invoke(app, ["evaluate", "--data", str(write_discs(tmp_path / "CVC-ClinicDB", n=2)),
                                 "--split", "official"])
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert lines == ["error: no committed official split for 'cvc-clinicdb'; known: kvasir-seg (make one with "
                     "`save_official_split`)"]
