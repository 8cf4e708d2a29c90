"""torch.compile on a converted model (CPU, inductor): no graph break inside a replacement block
or anywhere in the forward, the same logits as eager, and graph-break-free static-shape decode
steps (the precondition for CUDA graphs: no host sync, no data-dependent shape in a step)."""

from __future__ import annotations

import pytest
import torch

from flexigpt_kernels.convert.families import decoder_layers
from flexigpt_kernels.generation import make_cache, skip_blocks

from .helpers import tiny_model

IDS = torch.tensor([[5, 17, 42, 8, 91, 33, 2, 9]])


@pytest.fixture
def model():
    torch._dynamo.reset()
    yield tiny_model("llama", layers=2, blocks=(1,), gamma=0.1)  # block 1 shares block 0
    torch._dynamo.reset()


def _graph_breaks(fn, *args, **kwargs):
    explanation = torch._dynamo.explain(fn)(*args, **kwargs)
    return explanation.graph_break_count, [str(r.reason) for r in explanation.break_reasons]


def test_replacement_block_traces_as_one_graph(model):
    block = decoder_layers(model)[1]
    assert hasattr(block, "flexigpt_base")
    hidden = torch.randn(1, IDS.shape[1], 64)
    positions = torch.arange(IDS.shape[1]).unsqueeze(0)
    rotary = model.model.rotary_emb(hidden, position_ids=positions)
    with torch.no_grad():
        count, reasons = _graph_breaks(
            block, hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary
        )
    assert count == 0, reasons


@pytest.mark.slow
def test_compiled_forward_matches_eager(model):
    """One inductor compilation of the whole forward with fullgraph=True: a graph break
    anywhere (inside a block included) would raise."""
    with torch.no_grad():
        eager = model(IDS).logits
        compiled = torch.compile(model, backend="inductor", fullgraph=True)(IDS).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_decode_steps_have_no_graph_break(model):
    """The three step kinds of self-speculative decoding, traced by dynamo after a prefill:
    a full-model verify step (k + 1 tokens), a full-model single step, and a draft step with
    the replacement block skipped and its KV cache absent. No graph break means no .item() /
    host read and no data-dependent shape inside a step; with the static cache the shapes are
    fixed too, so each step kind is capturable as one CUDA graph. (The dynamic cache traces
    without breaks as well, but its shapes grow every step.)"""
    full = make_cache(model, max_cache_len=32)  # static: preallocated, fixed shapes
    draft = make_cache(model, [1], max_cache_len=32)
    n = IDS.shape[1]

    def step(ids, cache, start):
        positions = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
        return model(input_ids=ids, cache=cache, use_cache=True, position_ids=positions).logits

    with torch.no_grad():
        step(IDS, full, 0)
        assert _graph_breaks(step, IDS[:, :5], full, n) == (0, [])
        full.crop(-4)
        assert _graph_breaks(step, IDS[:, :1], full, n + 1) == (0, [])
        with skip_blocks(model, [1]):
            step(IDS, draft, 0)
            assert _graph_breaks(step, IDS[:, :1], draft, n) == (0, [])
