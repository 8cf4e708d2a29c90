"""The kernel benchmark's multi-slice group: `flexigpt bench kernels` appends the stacked op's
rows beside one call per part and dense to the kernels CSV (timings are not asserted)."""

from __future__ import annotations

import torch

from flexigpt_kernels import cli
from flexigpt_kernels.bench.results import read_csv
from flexigpt_kernels.bench.stacked import STACKS


def test_kernels_cli_appends_the_stacked_group(tmp_path):
    threads = torch.get_num_threads()
    status = cli.main(
        [
            "bench",
            "kernels",
            "--device",
            "cpu",
            "--models",
            "smollm2",
            "--m",
            "1",
            "--variants",
            "linear",
            "--modes",
            "fwd",
            "--budget",
            "0.01",
            "--threads",
            "1",
            "--no-plot",
            "--out",
            str(tmp_path),
        ]
    )
    torch.set_num_threads(threads)
    assert status == 0
    (csv_path,) = tmp_path.glob("kernels_*.csv")
    rows = [r for r in read_csv(csv_path) if r["variant"] == "stacked"]
    assert {(r["layer"], r["provider"]) for r in rows} == {
        (layer, p) for layer, *_ in STACKS for p in ("stacked-op-cpp", "per-part-op-cpp", "dense")
    }
    for r in rows:
        assert float(r["min_us"]) > 0 and r["M"] == "1" and r["parts"] in ("2", "3")
        if r["provider"] == "per-part-op-cpp":
            assert float(r["x_per_part"]) == 1.0
    assert "Multi-slice op" in next(tmp_path.glob("kernels_*.md")).read_text()
