"""Splits: deterministic 80/10/10 over naturally sorted ids, JSON round trip, validation, committed files."""

from __future__ import annotations

import json

import pytest

from resunetpp.data import default_split, load_split, make_split, save_split

IDS = [str(i) for i in range(1, 613)]


def test_make_split_is_deterministic_disjoint_and_80_10_10():
    a = make_split(IDS, seed=0)
    assert a == make_split(list(reversed(IDS)), seed=0)  # input order does not matter
    assert [len(a[p]) for p in ("train", "val", "test")] == [490, 61, 61]
    assert sorted(a["train"] + a["val"] + a["test"], key=int) == IDS
    assert not (set(a["train"]) & set(a["val"]) or set(a["train"]) & set(a["test"]) or set(a["val"]) & set(a["test"]))
    assert a["test"] == sorted(a["test"], key=int)  # parts sorted naturally
    b = make_split(IDS, seed=1)
    assert b["test"] != a["test"]
    k = make_split([f"id{i}" for i in range(1000)], seed=0)
    assert [len(k[p]) for p in ("train", "val", "test")] == [800, 100, 100]
    c = make_split(IDS, seed=0, fractions=(0.5, 0.25, 0.25))
    assert [len(c[p]) for p in ("train", "val", "test")] == [306, 153, 153]


def test_make_split_rejects_bad_input():
    with pytest.raises(ValueError, match="duplicate ids"):
        make_split(["1", "1", "2"])
    with pytest.raises(ValueError, match="summing to 1"):
        make_split(IDS, fractions=(0.8, 0.1))


def test_save_load_round_trip(tmp_path):
    split = make_split(IDS, seed=5)
    path = save_split(split, tmp_path / "s.json", dataset="cvc-clinicdb", seed=5)
    obj = json.loads(path.read_text())
    assert list(obj) == ["dataset", "seed", "train", "val", "test"]
    loaded = load_split(path)
    assert loaded == {"dataset": "cvc-clinicdb", "seed": 5, **split}
    save_split(loaded, tmp_path / "t.json")  # a loaded split keeps its dataset and seed
    assert load_split(tmp_path / "t.json") == loaded


@pytest.mark.parametrize("content,message", [
    ("{not json", "not a readable JSON split file"),
    ('["a"]', "must be a JSON object"),
    ('{"train": ["1"], "val": []}', "'test' must be a list of id strings"),
    ('{"train": ["1", 2], "val": [], "test": []}', "'train' must be a list of id strings"),
    ('{"train": ["1"], "val": ["1"], "test": []}', "id '1' appears in both 'train' and 'val'"),
    ('{"train": ["1", "1"], "val": [], "test": []}', "id '1' appears twice in train"),
    ('{"train": [], "val": ["1"], "test": []}', "the train list is empty"),
])
def test_load_split_names_the_file(tmp_path, content, message):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(ValueError) as err:
        load_split(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)
    with pytest.raises(FileNotFoundError, match="nope.json: split file not found"):
        load_split(tmp_path / "nope.json")


def test_committed_splits_are_package_data_and_valid():
    for name, sizes in (("kvasir-seg", [800, 100, 100]), ("cvc-clinicdb", [490, 61, 61])):
        path = default_split(name)
        assert path.is_file() and path.parent.name == "splits"
        split = load_split(path)
        assert split["dataset"] == name and split["seed"] == 0
        assert [len(split[p]) for p in ("train", "val", "test")] == sizes
    assert load_split(default_split("cvc-clinicdb")) == {"dataset": "cvc-clinicdb", "seed": 0,
                                                         **make_split(IDS, seed=0)}
    with pytest.raises(KeyError, match="no committed split for 'etis'"):
        default_split("etis")
