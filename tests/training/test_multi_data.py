"""One model trained on several datasets (`data` joined by ':'), each with its own split: issue 23's general
model. Tiny models on two synthetic disc datasets."""

from __future__ import annotations

import json

import pytest
import torch

import resunetpp.training.loop as T
from helpers.training import tiny, write_discs
from resunetpp.data import SegmentationFolder, make_split
from resunetpp.errors import SettingError
from resunetpp.training.loop import train


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    return write_discs(root / "discs-a", n=20, seed=1), write_discs(root / "discs-b", n=30, seed=2)


def test_a_run_on_two_datasets_keeps_each_split_and_names_its_ids(two, tmp_path):
    a, b = two
    run = train(tiny(f"{a}:{b}", tmp_path / "run", epochs=1))
    split = json.loads((run / "split.json").read_text())
    own = {d.name: make_split(SegmentationFolder(d).ids, seed=0) for d in (a, b)}
    for part in ("train", "val", "test"):
        assert split[part] == [f"{name}/{k}" for name in ("discs-a", "discs-b") for k in own[name][part]]
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"] == split["dataset"] == "discs-a+discs-b"
    assert config["split"]["train"] == len(own["discs-a"]["train"]) + len(own["discs-b"]["train"])
    assert "discs-a: made by make_split" in config["split"]["source"]


def test_each_dataset_may_have_its_own_split(two, tmp_path):
    a, b = two
    ids_a = SegmentationFolder(a).ids
    mine = {"dataset": "discs-a", "seed": 7, "train": ids_a[:12], "val": ids_a[12:16], "test": ids_a[16:]}
    (tmp_path / "a.json").write_text(json.dumps(mine))
    run = train(tiny(f"{a}:{b}", tmp_path / "run", epochs=1, split=f"{tmp_path / 'a.json'}:"))
    split = json.loads((run / "split.json").read_text())
    assert split["train"][:12] == [f"discs-a/{k}" for k in ids_a[:12]]
    assert split["val"][:4] == [f"discs-a/{k}" for k in ids_a[12:16]]
    assert split["train"][12:] == [f"discs-b/{k}" for k in make_split(SegmentationFolder(b).ids, seed=0)["train"]]


def test_join_data_offsets_the_second_dataset_s_indices():
    def data(name, n, value, train, val):
        return T.Data(name, [str(i) for i in range(n)], {"train": [str(i) for i in train], "val": [str(i) for i in val],
                                                         "test": []}, "made",
                      torch.full((n, 3, 2, 2), value, dtype=torch.uint8), torch.zeros(n, 1, 2, 2, dtype=torch.uint8),
                      torch.tensor(train), torch.tensor(val))

    joined = T.join_data([data("x", 3, 10, [0, 1], [2]), data("y", 4, 20, [1, 3], [0, 2])], seed=0)
    assert joined.ids == ["x/0", "x/1", "x/2", "y/0", "y/1", "y/2", "y/3"]
    assert joined.train_idx.tolist() == [0, 1, 4, 6] and joined.val_idx.tolist() == [2, 3, 5]
    assert joined.images[joined.train_idx, 0, 0, 0].tolist() == [10, 10, 20, 20]
    assert joined.split["train"] == ["x/0", "x/1", "y/1", "y/3"]


def test_splits_that_do_not_match_the_datasets_are_refused(two, tmp_path):
    a, b = two
    with pytest.raises(SettingError, match="3 entries for 2 datasets"):
        train(tiny(f"{a}:{b}", tmp_path / "r1", split="x:y:z"))
    with pytest.raises(SettingError, match="the same dataset twice"):
        train(tiny(f"{a}:{a}", tmp_path / "r2"))


def test_evaluating_a_joint_run_on_one_dataset_takes_that_dataset_s_own_held_out_ids(two, tmp_path):
    """Not the committed split of the dataset (which could hold the run's training images) but the ids the
    run itself kept out of training, with their dataset prefix removed."""
    from resunetpp.evaluation.evaluator import resolve_ids

    a, b = two
    run = train(tiny(f"{a}:{b}", tmp_path / "run", epochs=1))
    split = json.loads((run / "split.json").read_text())
    ids, source = resolve_ids(b, "test", run)
    assert ids == [k.removeprefix("discs-b/") for k in split["test"] if k.startswith("discs-b/")] and ids
    assert source == f"test of {run / 'split.json'} (discs-b)"
    ids_a, _ = resolve_ids(a, "val", run)
    assert ids_a == [k.removeprefix("discs-a/") for k in split["val"] if k.startswith("discs-a/")]
