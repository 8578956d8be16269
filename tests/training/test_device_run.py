"""The GPU campaign's one command, dry-run on the CPU: every stage runs, and what comes back fits the
transfer limits (at most 8 files, 16 MiB each, at most two folders deep), with tables and fp16 weights."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from resunetpp import load_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, kvasir_dir, clinicdb_dir) -> Path:
    out = tmp_path_factory.mktemp("device") / "out"
    # one job of each stage (both tables' ResUNet++, the beyond recipe, one baseline) keeps CI short;
    # the full job list runs the same code path per job
    cmd = ["bash", str(ROOT / "benchmarks" / "device_run.sh"), "--dry-run", "--budget", "86400", "--out", str(out),
           "--data-root", str(kvasir_dir.parent), "--max-workers", "2", "--min-job-seconds", "5",
           "--jobs", "table1-resunetpp,table2-resunetpp,table2-resunetpp-by-sequence,beyond-kvasir,fast-kvasir,"
           "table1-unet,lite-kvasir,strong-kvasir-official,strong-polyp"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=7200, env={**__import__("os").environ,
                                                                                "PYTHON": sys.executable})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


@pytest.mark.slow  # the dry run: several trainings in subprocesses
def test_dry_run_outputs_fit_the_transfer_limits(dry_run):
    files = [p for p in dry_run.rglob("*") if p.is_file()]
    assert 4 <= len(files) <= 8
    assert all(p.stat().st_size <= 16 * 2**20 for p in files)
    assert all(len(p.relative_to(dry_run).parts) <= 3 for p in files)
    names = {p.name for p in files}
    # seven trainings with weights, room for five: the lowest in `WEIGHTS`' priority stay behind, and say so
    assert names == {"device_run.log", "summary.md", "results.tar.gz", "strong-polyp.safetensors",
                     "strong-kvasir-official.safetensors", "table1-resunetpp.safetensors",
                     "table2-resunetpp.safetensors", "table2-resunetpp-by-sequence.safetensors"}
    log = (dry_run / "device_run.log").read_text()
    assert "smoke: trained and evaluated" in log and "SMOKE FAILED" not in log and "FAILED" not in log
    for name in ("beyond-kvasir", "lite-kvasir"):
        assert f"{name}: its weights stay behind (at most 8 files come back)" in log


@pytest.mark.slow  # the dry run: several trainings in subprocesses
def test_dry_run_tables_curves_and_weights(dry_run, tmp_path):
    with tarfile.open(dry_run / "results.tar.gz") as tar:
        names = set(tar.getnames())
        tar.extractall(tmp_path, filter="data")
    for table in ("table1", "table2"):
        assert {f"{table}/table.md", f"{table}/results.json", f"{table}/fig3.png"} <= names
    assert not any(n.endswith((".pt", ".safetensors")) for n in names)
    results = json.loads((tmp_path / "table1" / "results.json").read_text())
    assert set(results["models"]) == {"unet", "resunetpp"}
    assert all(m["epochs_done"] == 2 for m in results["models"].values())
    row = next(line for line in (tmp_path / "table1" / "table.md").read_text().splitlines()
               if line.startswith("| ResUNet++ |"))
    assert "| 2 |" in row  # epochs done, as planned
    # Table II: the random-split and the sequence-grouped job each trained one run, both tabulated
    t2 = json.loads((tmp_path / "table2" / "results.json").read_text())
    assert set(t2["models"]) == set(t2["models_grouped"]) == {"resunetpp"}
    assert t2["models_grouped"]["resunetpp"]["settings"]["split"] == "resunetpp/splits/cvc-clinicdb-by-sequence.json"
    assert json.loads((tmp_path / "table2" / "by-sequence" / "resunetpp" / "split.json").read_text())["train"][:2] == \
        json.loads((ROOT / "src" / "resunetpp" / "splits" / "cvc-clinicdb-by-sequence.json").read_text())["train"][:2]
    assert "| ResUNet++ | by sequence | 2 |" in (tmp_path / "table2" / "table.md").read_text()
    speed = json.loads((tmp_path / "stage0" / "train_speed.json").read_text())
    assert speed["rows"] and all(r["loss_finite"] for r in speed["rows"])
    assert (tmp_path / "beyond-kvasir" / "eval" / "metrics.json").is_file()
    fast = (tmp_path / "fast-kvasir" / "train_config.yaml").read_text()  # its own recipe, evaluated too
    assert "augment: light" in fast and "time_limit: 45" in fast and "compile: 'off'" in fast
    assert (tmp_path / "fast-kvasir" / "eval" / "metrics.json").is_file()
    lite = (tmp_path / "lite-kvasir" / "train_config.yaml").read_text()  # distilled from the bundled model
    assert "model: resunetpp-lite" in lite and "teacher: resunetpp-kvasir-seg" in lite
    assert (tmp_path / "lite-kvasir" / "eval" / "metrics.json").is_file()
    strong = yaml.safe_load((tmp_path / "strong-kvasir-official" / "train_config.yaml").read_text())
    assert {k: strong[k] for k in ("split", "loss", "augment", "multi_scale", "ema", "optimizer", "schedule")} == {
        "split": "official", "loss": "structure", "augment": "strong", "multi_scale": True, "ema": 0.999,
        "optimizer": "adamw", "schedule": "cosine"}
    assert strong["size"] == 32  # the dry run's size; 352 on the GPU
    official = json.loads((tmp_path / "strong-kvasir-official" / "eval" / "metrics.json").read_text())
    assert "kvasir-seg-official" in official["settings"]["split"]  # scored on the official test ids
    # the general model: both datasets' training parts, scored on each test part
    general = json.loads((tmp_path / "strong-polyp" / "config.json").read_text())
    assert general["dataset"] == "kvasir-seg+cvc-clinicdb" and "cvc-clinicdb-by-sequence" in general["split"]["source"]
    # Kvasir-SEG: the ids the run itself held out (its own split.json), CVC-ClinicDB: the by-sequence test part
    for folder, ends in (("eval-kvasir-seg", "strong-polyp/split.json (kvasir-seg)"),
                         ("eval-cvc-clinicdb", "test of the grouped split (cvc-clinicdb-by-sequence.json)")):
        metrics = json.loads((tmp_path / "strong-polyp" / folder / "metrics.json").read_text())
        assert metrics["settings"]["split"].endswith(ends)
    held_out = [k.removeprefix("kvasir-seg/") for k in json.loads((tmp_path / "strong-polyp" / "split.json")
                                                                  .read_text())["test"] if k.startswith("kvasir-seg/")]
    scored = (tmp_path / "strong-polyp" / "eval-kvasir-seg" / "per_image.csv").read_text().splitlines()[1:]
    assert [line.split(",")[0] for line in scored] == held_out
    # the fp16 weights load back as a model with their config
    run = tmp_path / "w"
    run.mkdir()
    (run / "model.safetensors").write_bytes((dry_run / "table1-resunetpp.safetensors").read_bytes())
    (run / "config.json").write_text((tmp_path / "table1" / "resunetpp" / "config.json").read_text())
    model = load_model(run)
    assert next(model.parameters()).dtype.is_floating_point


def test_jobs_run_in_the_order_given_and_a_misspelt_one_stops_before_anything_runs(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import device_run

    assert [j[0] for j in device_run.job_queue("table1-resunet,beyond-kvasir")] == ["table1-resunet", "beyond-kvasir"]
    assert device_run.job_queue(None) == device_run.JOBS
    with pytest.raises(SystemExit, match="unknown table1-resnet; the jobs are table1-resunetpp"):
        device_run.main(["--dry-run", "--out", str(tmp_path / "out"), "--jobs", "table1-resunet,table1-resnet"])
    assert not (tmp_path / "out").exists()


def test_trainings_only_runs_the_workers_asked_for_sharing_one_process_s_speed():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import device_run

    assert device_run.trainings_only_pool(None) == (1, device_run.EAGER_IMG_S)
    assert device_run.trainings_only_pool(3) == (3, device_run.EAGER_IMG_S / 3)
    assert device_run.parser().parse_args(["--trainings-only", "--workers", "3"]).workers == 3


def test_beyond_epochs_fit_the_seconds_given_at_the_measured_speed():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import argparse

    import device_run

    args = argparse.Namespace(per_worker_img_s=546)
    assert device_run.beyond_epochs(args, 190) == 112  # the H100 slot's 190 s: 800 images / 546 img/s x 1.15
    assert device_run.beyond_epochs(args, 10) == 40 and device_run.beyond_epochs(args, 1e5) == 300
    # the strong recipe's multi-scale 352x352 steps cost 2.03x a 256x256 one: fewer epochs in the same time
    assert device_run.STRONG_COST == pytest.approx((272**2 + 352**2 + 448**2) / 3 / 256**2)
    assert device_run.beyond_epochs(args, 190, device_run.STRONG_COST) == 55
    assert device_run.beyond_epochs(args, 600, device_run.STRONG_COST, 1290) == 108  # the general model: both sets


@pytest.mark.parametrize("job, compiled", [("table2-resunet", True), ("table1-resunet-mod", True),
                                           ("table2-unet", False), ("table1-resunetpp", False)])
def test_on_a_gpu_only_the_baselines_measured_to_repay_compiling_are_compiled(job, compiled, tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import device_run

    import resunetpp.training.reproduce

    seen = {}
    monkeypatch.setattr(resunetpp.training.reproduce, "reproduce", lambda *a, **kw: seen.update(kw))
    for name in ("kvasir-seg-256", "cvc-clinicdb-256"):
        (tmp_path / name).mkdir()
    device_run.main(["--job", job, "--data-root", str(tmp_path), "--work", str(tmp_path / "work"),
                     "--time-limit", "100"])
    assert seen["device"] == "cuda" and seen["overrides"]["eval_every"] == 2
    assert (seen["overrides"].get("compile") == "default") is compiled
