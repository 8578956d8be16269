"""Synthetic fixtures shared by the tests (generated: no dataset file is ever copied into the repository)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
