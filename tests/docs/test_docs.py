"""The documentation site builds with no warning (broken links, missing pages, API references that
don't resolve), and the README stays short with its two set-up commands exactly as CI runs them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_docs_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (the `docs` extra)")
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=3600, env={"NO_MKDOCS_2_WARNING": "1",
                                                                                      **__import__("os").environ})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "TrainConfig" in api and "load_model" in api and "Augment" in api


def test_readme_is_short_and_its_setup_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme) < 12_000
    block = re.search(r"## Set-up.*?```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text()
    for command in commands:
        assert command in ci, command
