"""Every script in python/ runs (the quickstart end to end on a tiny model; the study's CLI parses)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )


def test_quickstart_runs_on_a_tiny_model():
    proc = run("python/quickstart.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "max |y - reference|" in out and "shares the base weight: True" in out
    assert "pruned blocks" in out and "generated 8 tokens" in out


def test_recovery_study_cli_parses():
    proc = run("python/recovery_study.py", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--heal" in proc.stdout


def test_serve_batch_rows_equal_single_generation():
    proc = run("python/serve_batch.py", "--max-new-tokens", "6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "equals one by one: True" in proc.stdout


def test_generation_benchmark_cli_parses():
    proc = run("benchmarks/bench_generation.py", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--new-tokens" in proc.stdout
