"""The GPU suite's multi-slice and CUDA-graph decode steps (bench/suite_steps.py), on the CPU:
the static-cache decode step computes the model's next-token logits, every call rewrites the same
cache slot (what a graph replay relies on), the step traces into one graph with no host read of
a tensor value (the CPU proxy for "capturable": torch.compile fullgraph with
capture_scalar_outputs off, so an .item() or a data-dependent shape raises), and both entry
points write their CSV rows. Timings here mean nothing.

The ops alone are checked the same way in tests/ops: test_registration.py
(test_compile_aot_eager_fullgraph_*), test_stacked.py and test_stacked_epilogue.py
(test_compiles_fullgraph_forward_and_backward)."""

from __future__ import annotations

import math

import pytest
import torch

from flexigpt_kernels.bench import suite_steps
from flexigpt_kernels.bench.model import _randomize_adapters, build_random_model
from flexigpt_kernels.bench.results import read_csv
from flexigpt_kernels.convert.replacement import convert_blocks
from flexigpt_kernels.nn import SharedLoRALinear


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pruned():
    model = build_random_model("tiny", torch.device("cpu"), torch.float32)
    convert_blocks(model, {3: 2, 4: 2}, rank=4, svd_init=False)
    _randomize_adapters(model)
    assert sum(isinstance(m, SharedLoRALinear) for m in model.modules()) == 14
    return model.eval()


def _next_token_logits(model, ids):
    """Reference without any cache: greedy token after ids, then the logits after ids + token."""
    with torch.no_grad():
        token = model(input_ids=ids).logits[:, -1:].argmax(-1)
        return model(input_ids=torch.cat([ids, token], 1)).logits[:, -1:]


def test_static_decode_step_is_the_next_token_forward_and_repeatable(pruned):
    ids = suite_steps.random_prompt(pruned, batch=2, prompt_len=7)
    step = suite_steps.static_decode_step(pruned, ids)
    want = _next_token_logits(pruned, ids)
    first, second = step(), step()  # the second call rewrites the same slot: same result
    assert first.shape == (2, 1, pruned.config.vocab_size)
    torch.testing.assert_close(first, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second, first, rtol=0, atol=0)


@pytest.mark.slow
def test_decode_step_traces_in_one_graph_without_host_reads(pruned):
    ids = suite_steps.random_prompt(pruned, batch=1, prompt_len=5, seed=1)
    step = suite_steps.static_decode_step(pruned, ids)
    eager = step()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_scalar_outputs=False, capture_dynamic_output_shape_ops=False):
        compiled = torch.compile(step, fullgraph=True, backend="eager")  # a graph break raises
        got = compiled()
    torch._dynamo.reset()
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)


def test_decode_graph_entry_point_on_cpu(tmp_path, capsys):
    argv = ["decode-graph", "--device", "cpu", "--out", str(tmp_path), "--random", "tiny", "--prompt-len", "8"]
    assert suite_steps.main([*argv, "--batch", "2", "--budget", "0.01", "--threads", "1"]) == 0
    assert "no CUDA graph capture on the CPU" in capsys.readouterr().out
    (csv_path,) = tmp_path.glob("decode_graph_*.csv")
    rows = read_csv(csv_path)
    assert [r["variant"] for r in rows] == ["dense", "flexigpt"]
    assert rows[1]["replaced_blocks"] == "2" and all(r["step"] == "eager (CPU, no capture)" for r in rows)
    assert float(rows[0]["x_dense"]) == pytest.approx(1.0)
    for r in rows:
        for col in ("min_ms", "median_ms", "tok_s", "x_dense", "x_dense_min"):
            assert math.isfinite(float(r[col])) and float(r[col]) > 0, (r["variant"], col)


def test_stacked_entry_point_on_cpu(tmp_path):
    argv = ["stacked", "--device", "cpu", "--out", str(tmp_path), "--m", "1", "--budget", "0.01", "--threads", "1"]
    assert suite_steps.main(argv) == 0
    (csv_path,) = tmp_path.glob("stacked_*.csv")
    rows = read_csv(csv_path)
    assert {r["provider"] for r in rows} == {"stacked-op-cpp", "per-part-op-cpp", "dense"}
    assert {r["layer"] for r in rows} == {"qkv", "gate_up"} and {r["M"] for r in rows} == {"1"}
    assert all(math.isfinite(float(r["x_per_part_min"])) for r in rows)


def test_bad_arguments_exit_2(tmp_path):
    with pytest.raises(SystemExit) as exc:
        suite_steps.main(["decode-graph", "--device", "cpu", "--out", str(tmp_path), "--batch", "0"])
    assert exc.value.code == 2
