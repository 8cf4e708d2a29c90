"""Smoke tests of every benchmark entry point at the smallest shapes (they must not rot):
`flexigpt bench kernels` (one tiny shape), `bench plot`, `bench model` (a tiny random Llama),
and benchmarks/gpu_suite.sh in its CPU smoke mode. Timings here mean nothing; the tests check
that each entry point runs and writes every column it promises."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexigpt_kernels import cli
from flexigpt_kernels.bench import formulas, shapes
from flexigpt_kernels.bench.providers import default_providers
from flexigpt_kernels.bench.results import read_csv

ROOT = Path(__file__).resolve().parents[2]
# One thread: the timings mean nothing here, and two OpenMP threads on a busy machine can wait a
# scheduler slice per parallel region (seconds for a tiny model). The CLI sets the thread count,
# so the fixture below restores the session's.
THREADS = "1"


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def kernels_run(tmp_path_factory):
    n = torch.get_num_threads()
    out = tmp_path_factory.mktemp("kernels")
    status = cli.main(
        [
            "bench",
            "kernels",
            "--device",
            "cpu",
            "--shape",
            "2x32x48x4",
            "--budget",
            "0.01",
            "--threads",
            THREADS,
            "--out",
            str(out),
        ]
    )
    torch.set_num_threads(n)
    assert status == 0
    (csv_path,) = out.glob("kernels_*.csv")
    return out, csv_path


def test_grid_is_the_issues(monkeypatch):
    full = shapes.grid()
    assert {(s.model, s.layer, s.n, s.k, s.r) for s in full} == {
        ("llama2-7b", "q/o", 4096, 4096, 256),
        ("llama2-7b", "gate/up", 11008, 4096, 256),
        ("llama2-7b", "down", 4096, 11008, 256),
        ("smollm2", "q/o", 576, 576, 32),
        ("smollm2", "gate/up", 1536, 576, 32),
        ("smollm2", "down", 576, 1536, 32),
    }
    assert sorted({s.m for s in full}) == [1, 8, 32, 512, 2048, 8192]
    quick = shapes.quick_grid()
    assert {s.model for s in quick} == {"smollm2"} and sorted({s.m for s in quick}) == [1, 512]
    assert shapes.parse_shape("1x4096x4096x256") == shapes.Shape("custom", "4096x4096", 1, 4096, 4096, 256)
    with pytest.raises(ValueError):
        shapes.parse_shape("1x8x8x16")  # rank above min(K, N)


def test_formulas():
    s = shapes.Shape("custom", "", m=4, k=6, n=10, r=2)
    assert formulas.op_flops(s, False, "fwd") == 2 * 4 * 6 * 10 + 2 * 4 * 2 * 16
    assert formulas.floor_factor(s, "fwd") == pytest.approx(1 + 2 * 16 / 60)
    # fwd+bwd (W frozen): op 4MKN + 6Mr(K+N) over dense 4MKN
    assert formulas.floor_factor(s, "fwd+bwd") == pytest.approx(
        formulas.op_flops(s, False, "fwd+bwd") / formulas.dense_flops(s, "fwd+bwd")
    )
    assert formulas.op_bytes(s, False, "fwd", 2) == 2 * (4 * 6 + 10 * 6 + 2 * 16 + 4 * 10)


def test_kernels_writes_every_provider_with_ratios(kernels_run):
    out, csv_path = kernels_run
    rows = read_csv(csv_path)
    providers = set(default_providers(torch.device("cpu"))) | {"floor"}
    assert {r["provider"] for r in rows} == providers
    assert {(r["variant"], r["mode"]) for r in rows} == {(v, m) for v in shapes.VARIANTS for m in shapes.MODES}
    assert len(rows) == len(providers) * 4
    for r in rows:
        for col in ("min_us", "median_us", "x_floor", "x_floor_min", "x_unfused", "x_unfused_min", "tflops", "gbps"):
            assert math.isfinite(float(r[col])) and float(r[col]) > 0, (r["provider"], col, r[col])
        for col in ("device_name", "torch", "triton", "date", "commit", "run_id"):
            assert r[col], col
    floors = [r for r in rows if r["provider"] == "floor"]
    assert all(float(r["x_floor"]) == pytest.approx(1.0) for r in floors)
    md = csv_path.with_suffix(".md").read_text()
    assert "x floor" in md and "x unfused" in md


def test_plot_draws_pngs(kernels_run, tmp_path):
    pytest.importorskip("matplotlib")
    _, csv_path = kernels_run
    assert cli.main(["bench", "plot", str(csv_path), "--out", str(tmp_path)]) == 0
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == [f"{csv_path.stem}_custom_x_floor.png", f"{csv_path.stem}_custom_x_unfused.png"]
    assert all((tmp_path / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_unfused_view_computes_the_same_model():
    from flexigpt_kernels.bench.model import (
        UnfusedSharedLoRALinear,
        _randomize_adapters,
        build_random_model,
        unfused_view,
    )
    from flexigpt_kernels.convert.prune import prune
    from flexigpt_kernels.nn import SharedLoRALinear

    torch.set_num_threads(1)
    model = build_random_model("tiny", torch.device("cpu"), torch.float32)
    model, _ = prune(model, None, blocks=[3, 4], rank=4, svd_init=False, progress=False)
    _randomize_adapters(model)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        with unfused_view(model) as n:
            assert n == 14  # 2 blocks x 7 linears
            assert sum(isinstance(m, UnfusedSharedLoRALinear) for m in model.modules()) == 14
            unfused = model(input_ids=ids).logits
    assert sum(isinstance(m, UnfusedSharedLoRALinear) for m in model.modules()) == 0
    assert sum(isinstance(m, SharedLoRALinear) for m in model.modules()) == 14  # swapped back
    torch.testing.assert_close(unfused, ours, rtol=1e-4, atol=1e-4)


def test_model_entry_point(tmp_path):
    status = cli.main(
        [
            "bench",
            "model",
            "--random",
            "tiny",
            "--device",
            "cpu",
            "--seq-len",
            "16",
            "--new-tokens",
            "3",
            "--rounds",
            "1",
            "--batches",
            "1,2",
            "--threads",
            THREADS,
            "--out",
            str(tmp_path),
        ]
    )
    assert status == 0
    (csv_path,) = tmp_path.glob("model_*.csv")
    rows = read_csv(csv_path)
    assert [r["variant"] for r in rows] == ["dense", "drop", "flexigpt", "flexigpt-unfused"]
    dense = rows[0]
    assert float(dense["prefill_1x16_x_dense"]) == pytest.approx(1.0)
    for r in rows:
        for col in (
            "prefill_1x16_min_ms",
            "prefill_2x16_median_ms",
            "prefill_2x16_x_dense",
            "decode_tok_s",
            "decode_x_dense",
            "weights_MiB",
            "prefill_1x16_flop_floor",
            "decode_flop_floor",
        ):
            assert math.isfinite(float(r[col])), (r["variant"], col)
    assert int(rows[1]["layers"]) == 4 and int(rows[2]["replaced_blocks"]) == 2  # 0.3 x 6 blocks
    assert float(rows[1]["prefill_1x16_flop_floor"]) < 1.0 < float(rows[2]["prefill_1x16_flop_floor"])
    assert rows[3]["same_tokens_as_flexigpt"].endswith("/4")
    assert "flexigpt-unfused" in csv_path.with_suffix(".md").read_text()


def test_gpu_suite_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_suite.sh")], check=True)


@pytest.mark.slow
def test_gpu_suite_runs_in_cpu_smoke_mode(tmp_path):
    """Every command the GPU suite runs, on the CPU at the smallest shapes."""
    env = dict(os.environ, FLEXIGPT_SUITE_SMOKE="1", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary] == [
        "build",
        "parity_kernels",
        "parity_fp32",
        "kernels_decode_smollm2",
        "kernels_prefill_smollm2",
        "stacked",
        "model",
        "decode_graph",
        "plot",
    ]
    for csv_name in ("kernels", "stacked", "model", "decode_graph"):
        assert list(tmp_path.glob(f"{csv_name}_*.csv")), csv_name
    assert "no CUDA graph capture on the CPU" in (tmp_path / "decode_graph.log").read_text()
    assert "CUDA decode extension: False" in (tmp_path / "environment.txt").read_text()
    assert list(tmp_path.glob("*.png"))
    for group in ("parity_kernels", "parity_fp32"):  # -m gpu selects the GPU tests
        assert "tests collected" in (tmp_path / f"{group}.log").read_text()
