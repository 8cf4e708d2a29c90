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


def test_profile_vllm_cli_parses_and_rejects_a_bad_batch():
    proc = run("python/profile_vllm.py", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--batch" in proc.stdout
    proc = run("python/profile_vllm.py", "--batch", "9")
    assert proc.returncode == 2 and "--batch must be in 1..8, got 9" in proc.stderr


def test_profile_vllm_summary_splits_the_replacement_blocks_excess():
    """Two kept blocks (0, 2) and one replacement block (1) whose linears cost 30 us more and
    whose attention kernel 5 us more: the excess, its split and the prediction from it."""
    sys.path.insert(0, str(ROOT / "python"))
    try:
        from profile_vllm import summarize
    finally:
        sys.path.remove(str(ROOT / "python"))
    dense, flex = {}, {}
    for i in range(3):
        extra = 1.0 if i == 1 else 0.0
        for sub, us, more in (("self_attn.qkv_proj", 10, 20), ("mlp.down_proj", 20, 10), ("self_attn.attn", 5, 5)):
            dense[f"model.layers.{i}.{sub}"] = us
            flex[f"model.layers.{i}.{sub}"] = us + extra * more
        dense[f"model.layers.{i}"], flex[f"model.layers.{i}"] = 100.0, 100.0 + extra * 35
    text = "\n".join(summarize(dense, flex, [1]))
    assert "dense 300 us, FlexiGPT 335 us" in text
    assert "replacement blocks (1): 35 us more" in text and "kept blocks +0 us" in text
    assert "| self_attn.qkv_proj | 10.0 | 30.0 | +20.0 |" in text
    assert "30 us of the excess inside its linear layers, 5 us outside them" in text
    assert f"{300 / 330:.3f}" in text
