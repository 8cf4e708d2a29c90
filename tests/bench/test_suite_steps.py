"""The GPU suite's multi-slice and CUDA-graph decode steps (bench/suite_steps.py), on the CPU:
the static-cache decode step computes the model's next-token logits, every call rewrites the same
cache slot (what a graph replay relies on), the step traces into one graph in which nothing
depends on tensor data (the CPU proxy for "capturable": torch.compile fullgraph, so a graph break
raises, and no node with an unbacked symbol, which is what an .item() or a data-dependent shape
leaves), and both entry points write their CSV rows. Timings here mean nothing.

The ops alone are traced fullgraph in tests/ops: test_registration.py
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


def _compile_recording_data_dependence(fn):
    """torch.compile(fn, fullgraph=True) (a graph break raises) with a backend that runs the
    traced graph as is and lists its nodes whose value or shape depends on tensor data (unbacked
    symbols: an .item(), a boolean-mask index, nonzero: what a CUDA graph cannot capture)."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    found = []

    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            v = node.meta.get("example_value")
            for x in v if isinstance(v, (tuple, list)) else [v]:
                if isinstance(x, (torch.Tensor, torch.SymInt, torch.SymFloat, torch.SymBool)):
                    if free_unbacked_symbols(x):
                        found.append(node.format_node())
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend), found


def test_the_data_dependence_check_catches_host_reads():
    x = torch.randn(5)
    for fn in (lambda t: t * t.max().item(), lambda t: t[t > 0]):
        compiled, found = _compile_recording_data_dependence(fn)
        compiled(x)
        assert found
    compiled, found = _compile_recording_data_dependence(lambda t: t * 2)
    compiled(x)
    assert found == []
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_single_and_stacked_ops_trace_without_data_dependence(backend):
    """Both ops' forward (inputs requiring grad) in one graph with nothing that depends on tensor
    data: their Python wrappers, validation and backend routing read shapes only."""
    from flexigpt_kernels.ops import shared_lora_linear, use_backend
    from flexigpt_kernels.ops.stacked import shared_lora_linear_stacked

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, generator=g, requires_grad=True)
    w, gamma, res = torch.randn(24, 16, generator=g), torch.ones(24), torch.randn(3, 24, generator=g)
    a = torch.randn(8, 16, generator=g, requires_grad=True)
    b1 = torch.randn(16, 4, generator=g, requires_grad=True)
    b2 = torch.randn(8, 4, generator=g, requires_grad=True)

    def single(x):
        return shared_lora_linear(x, w[:16], a[:4], b1, 0.5, norm_weight=gamma[:16], residual=res[:, :16])

    def stacked(x):
        return shared_lora_linear_stacked(x, w, list(a.split(4)), [b1, b2], [0.5, 2.0])

    for fn in (single, stacked):
        with use_backend(backend):
            want = fn(x)
            compiled, found = _compile_recording_data_dependence(fn)
            got = compiled(x)
            torch._dynamo.reset()
        assert found == [], fn.__name__
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert got.requires_grad  # traced with the autograd wrapper in place


@pytest.mark.slow
def test_decode_step_traces_in_one_graph_without_host_reads(pruned):
    ids = suite_steps.random_prompt(pruned, batch=1, prompt_len=5, seed=1)
    step = suite_steps.static_decode_step(pruned, ids)
    eager = step()
    compiled, found = _compile_recording_data_dependence(step)
    got = compiled()
    torch._dynamo.reset()
    assert found == []
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
