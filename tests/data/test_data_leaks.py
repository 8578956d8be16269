"""Leak audit (issue 13): perceptual hashes, near-duplicate groups, committed sequences, grouped splits, the
`data split --group-by` command and the leak warning of `data check`."""

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers.data import make_dataset
from resunetpp.cli import app
from resunetpp.data import check_dataset, default_split, leaks, load_split
from resunetpp.data.splits import grouped_split_path

runner = CliRunner()


def test_phash_and_near_duplicate_groups():
    rng = np.random.default_rng(0)
    a = (rng.random((64, 80, 3)) * 255).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-3, 4, a.shape), 0, 255).astype(np.uint8)  # a, slightly noisy
    c = (rng.random((64, 80, 3)) * 255).astype(np.uint8)
    h = {"a": leaks.phash(a), "b": leaks.phash(b), "c": leaks.phash(c), "d": leaks.phash(a)}
    assert leaks.hamming(h["a"], h["d"]) == 0 and leaks.hamming(h["a"], h["b"]) <= leaks.NEAR_DUPLICATE_BITS
    assert leaks.hamming(h["a"], h["c"]) > leaks.NEAR_DUPLICATE_BITS
    assert leaks.near_duplicate_groups(h) == [["a", "b", "d"]]
    assert leaks.near_duplicate_groups({"x": 0b1111, "y": 0b0111, "z": 0b0011}, max_distance=1) == [["x", "y", "z"]]


def test_grouped_split_keeps_groups_whole_and_is_deterministic():
    ids = [str(i) for i in range(1, 101)]
    groups = [ids[k:k + 10] for k in range(0, 100, 10)]
    one = leaks.grouped_split(ids, groups, seed=3)
    assert one == leaks.grouped_split(ids, groups, seed=3)
    assert {k: len(v) for k, v in one.items()} == {"train": 80, "val": 10, "test": 10}
    assert leaks.split_leaks(one, groups) == []
    random_split = {"train": ids[:80], "val": ids[80:90], "test": ids[90:95] + ids[:5]}
    assert leaks.split_leaks(random_split, groups) == [{"test": ids[:5], "train": ids[5:10]}]


def test_committed_sequences_and_grouped_splits():
    seqs = leaks.sequences("cvc-clinicdb")
    assert len(seqs) == 31  # the dataset's paper: 612 frames from 31 sequences
    flat = [int(i) for s in seqs for i in s]
    assert flat == list(range(1, 613))  # consecutive ids, each once
    by_seq = load_split(grouped_split_path("cvc-clinicdb"))
    assert [len(by_seq[p]) for p in ("train", "val", "test")] == [490, 61, 61]
    assert leaks.split_leaks(by_seq, seqs) == []
    assert by_seq == {**leaks.grouped_split([str(i) for i in range(1, 613)], seqs, seed=0),
                      "dataset": "cvc-clinicdb", "seed": 0}
    random_split = load_split(default_split("cvc-clinicdb"))
    assert len(leaks.split_leaks(random_split, seqs)) == 28
    assert leaks.neighbour_leaks(random_split, seqs) == (59, 33)
    groups = json.loads((grouped_split_path("kvasir-seg").parent / "kvasir-seg-near-duplicates.json").read_text())
    kv = load_split(grouped_split_path("kvasir-seg"))
    assert len(groups["groups"]) == 4 and leaks.split_leaks(kv, groups["groups"]) == []
    assert [len(kv[p]) for p in ("train", "val", "test")] == [800, 100, 100]
    assert len(leaks.split_leaks(load_split(default_split("kvasir-seg")), groups["groups"])) == 1
    with pytest.raises(KeyError, match="no committed sequence file for dataset 'kvasir-seg'"):
        leaks.sequences("kvasir-seg")


def test_bad_sequence_file_is_named(tmp_path):
    bad = tmp_path / "seq.json"
    bad.write_text('{"sequences": [["1", "2"], ["2"]]}')
    with pytest.raises(ValueError, match=r"seq\.json: ids in more than one sequence: 2"):
        leaks.load_sequences(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"seq\.json: not a sequence file"):
        leaks.load_sequences(bad)


def _with_duplicate(tmp_path):
    raw = make_dataset(tmp_path / "polyps", n=10, size=(48, 64))
    # image 10 becomes a copy of image 1 (its mask too): a near-duplicate pair
    shutil.copy(raw / "images" / "1.png", raw / "images" / "10.png")
    shutil.copy(raw / "masks" / "1.png", raw / "masks" / "10.png")
    return raw


def test_cli_split_group_by_and_check_warning(tmp_path):
    raw = _with_duplicate(tmp_path)
    out = tmp_path / "g.json"
    r = runner.invoke(app, ["data", "split", str(raw), "--group-by", "near-duplicates", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "grouped by near-duplicates (1 groups of 2+ images kept whole)" in r.output
    parts = load_split(out)
    assert {p for p in ("train", "val", "test") if {"1", "10"} & set(parts[p])} in ({"train"}, {"val"}, {"test"})
    leaky = tmp_path / "leaky.json"
    leaky.write_text(json.dumps({"dataset": "polyps", "seed": 0, "train": [str(i) for i in range(1, 9)],
                                 "val": ["9"], "test": ["10"]}))
    report = check_dataset(raw, split=leaky)
    assert report.ok and report.counts["split leaks"] == 1
    assert "near-duplicate images in different parts" in report.warnings[-1].what and \
        "1.png (train), 10.png (test)" in report.warnings[-1].what
    r = runner.invoke(app, ["data", "check", str(raw), "--split", str(leaky)])
    assert r.exit_code == 0 and "split leaks" in r.output and "10.png (test)" in r.output
    r = runner.invoke(app, ["data", "split", str(raw), "--group-by", "sequences", "--out", str(out)])
    assert r.exit_code == 3 and "no committed sequence file for dataset 'polyps'" in r.output
    seq = tmp_path / "seq.json"
    seq.write_text(json.dumps({"sequences": [[str(i) for i in range(1, 6)], [str(i) for i in range(6, 10)]]}))
    r = runner.invoke(app, ["data", "split", str(raw), "--group-by", "sequences", "--sequences", str(seq),
                            "--out", str(out)])
    assert r.exit_code == 3 and "seq.json: 1 id(s)" in r.output and "in no sequence, e.g. 10" in r.output


@pytest.mark.slow
def test_real_clinicdb_check_warns_about_the_random_split(clinicdb_dir):
    from resunetpp.data.check import audit_split, scan
    from resunetpp.data.layouts import locate

    report = scan(locate(clinicdb_dir), deep=False)
    report.deep = True
    audit_split(report, default_split("cvc-clinicdb"))  # no hashes (quick scan): only the sequence audit
    assert report.counts["split leaks"] == 1
    assert "28 of 31 video sequences" in report.warnings[-1].what and "59 of 61 test frames" in report.warnings[-1].what
