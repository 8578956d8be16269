import os
from pathlib import Path

import pytest
import torch

# Slow tests (`@pytest.mark.slow`: real datasets in full, subprocess trainings, the docs' commands, the browser,
# exports) run with `--slow`, or when CI=true (`.ci/run`); the default `python -m pytest` stays a few minutes.
# A run that selects only slow tests (`python -m pytest tests/inference/test_bundled.py`) runs them: asked for by name.


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="also run the tests marked slow (the default when the environment has CI=true)")


def _run_slow(config) -> bool:
    return config.getoption("--slow") or os.environ.get("CI", "").lower() in ("true", "1", "yes")


def pytest_collection_modifyitems(config, items):
    if _run_slow(config) or all("slow" in item.keywords for item in items):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow (CI=true runs it too)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    return "slow tests: " + ("included" if _run_slow(config) else "skipped (--slow or CI=true runs them)")


# Test models are tiny: one thread is as fast as two, and far faster when the two cores are shared.
torch.set_num_threads(1)

# Real datasets live beside the project (../shared/data); RESUNETPP_DATA overrides. Never commit them.
SHARED_DATA = Path(os.environ.get("RESUNETPP_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def _dataset(sub: str) -> Path:
    path = SHARED_DATA / sub
    if not path.is_dir():
        pytest.skip(f"real dataset not found at {path} (set RESUNETPP_DATA to the folder holding Kvasir-SEG/ and "
                    "CVC-ClinicDB/)")
    return path


@pytest.fixture(scope="session")
def kvasir_dir() -> Path:
    return _dataset("Kvasir-SEG")


@pytest.fixture(scope="session")
def clinicdb_dir() -> Path:
    return _dataset("CVC-ClinicDB")
