"""Every script under benchmarks/ imports (only public mpqkit names that exist) and parses --help."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_benchmark_script_runs_help(script):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout


def test_benchmark_scripts_use_only_public_names():
    for script in SCRIPTS:
        for line in script.read_text().splitlines():
            if line.startswith("from mpqkit") and " import " in line:
                names = [n.strip() for n in line.split(" import ", 1)[1].split(",")]
                assert not [n for n in names if n.startswith("_")], (script.name, line)
