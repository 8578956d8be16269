import os
from pathlib import Path

import pytest
import torch

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
