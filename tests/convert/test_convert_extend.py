"""extend(): repeated blocks sharing the original weights (docs/method.md section 6).

Tiny random models (hidden 32, 4 blocks, embeddings with std 1 so the residual stream has a
realistic scale relative to the output norm's sqrt(hidden)).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from flexigpt_kernels.convert.extend import extend, extension_order, parse_layers
from flexigpt_kernels.convert.families import decoder_layers, family_of
from flexigpt_kernels.convert.replacement import replacement_blocks
from flexigpt_kernels.nn import OutputNorm, SharedLoRALinear
from tests.eval.helpers import byte_tokenizer, tiny_model

IDS = torch.tensor([[5, 17, 99, 3, 200, 42, 42, 7, 130, 64, 1, 250], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _randomize_adapters(model, std=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SharedLoRALinear):
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * std)


# ------------------------------------------------------------------------------ order


def test_extension_order_block_and_sequential():
    assert extension_order(5, range(1, 3), "block", 3) == [0, 1, 1, 1, 2, 2, 2, 3, 4]
    assert extension_order(5, range(1, 3), "sequential", 3) == [0, 1, 2, 1, 2, 1, 2, 3, 4]
    assert extension_order(3, range(0, 3), "block", 1) == [0, 1, 2]
    with pytest.raises(ValueError, match="pattern"):
        extension_order(5, range(1, 3), "interleave", 2)
    with pytest.raises(ValueError, match="repeats"):
        extension_order(5, range(1, 3), "block", 0)
    with pytest.raises(ValueError, match="inside"):
        extension_order(5, range(3, 7), "block", 2)


def test_parse_layers():
    assert parse_layers("2:5") == range(2, 5)
    assert parse_layers(":3") == range(0, 3)
    assert parse_layers("4:", 6) == range(4, 6)
    assert parse_layers([3, 4, 5]) == range(3, 6)
    for bad in ("3", "a:b", [1, 3]):
        with pytest.raises(ValueError, match="layers"):
            parse_layers(bad)


# ------------------------------------------------------------------------------ structure


@pytest.mark.parametrize("pattern", ["block", "sequential"])
def test_extend_structure(pattern):
    model = tiny_model("llama")
    originals = list(decoder_layers(model))
    _, report = extend(model, range(1, 3), pattern=pattern, repeats=3, rank=4)
    layers = decoder_layers(model)
    expected = extension_order(4, range(1, 3), pattern, 3)
    assert report.order == expected and len(layers) == 8
    assert model.config.num_hidden_layers == 8
    first = {}
    for pos, (src, block) in enumerate(zip(expected, layers)):
        assert block.self_attn.layer_idx == pos
        if src not in first:
            first[src] = pos
            assert block is originals[src] and not hasattr(block, "flexigpt_base")
            continue
        # a repeat: a new module sharing the original's weights, with its own small parameters
        assert block is not originals[src] and block.flexigpt_base == first[src]
        assert report.base_map[pos] == first[src]
        for name in family_of(model).linears:
            lin = block.get_submodule(name)
            assert isinstance(lin, SharedLoRALinear) and lin.rank == 4
            assert lin.weight is originals[src].get_submodule(name).weight  # the same tensor
            assert torch.count_nonzero(lin.lora_b) == 0 and torch.count_nonzero(lin.lora_a) > 0
        assert block.input_layernorm is not originals[src].input_layernorm
        assert torch.equal(block.input_layernorm.weight, originals[src].input_layernorm.weight)
        assert isinstance(block.self_attn.o_proj.output_norm, OutputNorm)
        assert torch.all(block.mlp.down_proj.output_norm.weight == 1e-2)
    assert set(replacement_blocks(model)) == set(report.base_map)
    meta = model.flexigpt_meta
    assert meta["method"] == "extend" and meta["pattern"] == pattern and meta["repeats"] == 3
    assert meta["layers"] == [1, 3] and meta["order"] == expected and meta["num_blocks"] == 4
    assert {int(k): v for k, v in meta["base_map"].items()} == report.base_map
    # repeats add adapters and gammas only: 4 new blocks x (7 adapters + 2 gammas)
    repeat = layers[min(report.base_map)]
    per_block = (
        sum(4 * (m.in_features + m.out_features) for m in repeat.modules() if isinstance(m, SharedLoRALinear)) + 2 * 32
    )
    norms = sum(p.numel() for n, p in repeat.named_parameters() if "layernorm" in n)
    assert report.params_after - report.params_before == 4 * (per_block + norms)
    assert report.adapter_params == 4 * per_block


def test_extend_errors():
    model = tiny_model("llama", layers=3)
    with pytest.raises(ValueError, match="inside"):
        extend(model, range(2, 5))
    extend(model, range(0, 2), repeats=2, rank=2)
    with pytest.raises(ValueError, match="already has replacement blocks"):
        extend(model, range(0, 1))


# ------------------------------------------------------------------------------ function at init


def test_without_output_norm_a_repeat_applies_its_block_again():
    """output_norm=False, B=0: the extended model equals a plain model whose layer list holds
    each repeated block again (own layer index), i.e. f_i(f_i(h)) for pattern "block"."""
    model = tiny_model("llama")
    dup = copy.deepcopy(model)
    extend(model, range(1, 3), pattern="block", repeats=2, rank=4, output_norm=False)
    layers = decoder_layers(dup)
    plain = [
        layers[i] if k == 0 else copy.deepcopy(layers[i]) for i, k in [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0)]
    ]
    for pos, block in enumerate(plain):
        block.self_attn.layer_idx = pos
    dup.model.layers = nn.ModuleList(plain)
    dup.config.num_hidden_layers = 6
    torch.testing.assert_close(_logits(model), _logits(dup), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_small_gamma_stays_close_to_the_original(model_type):
    """Each repeat moves the residual stream by at most 2 * gamma * sqrt(hidden) per token (two
    sub-layers, each adding gamma * LayerNorm(.), RMS <= 1), and the logits move about linearly
    in gamma: measured max |dlogits| / max |logits| on these tiny models ~1.3 * gamma
    (llama: 1.3e-2 at gamma 1e-2, 0.82 at gamma 1)."""
    model = tiny_model(model_type)
    ref = _logits(model)
    hidden = model.config.hidden_size
    rel = {}
    for gamma in (1e-2, 1.0):
        ext = copy.deepcopy(model)
        extend(ext, range(1, 3), pattern="block", repeats=2, rank=4, gamma_init=gamma)
        moves = []
        hooks = [
            b.register_forward_hook(lambda m, a, out: moves.append((out - a[0]).norm(dim=-1).max().item()))  # noqa: B023
            for b in replacement_blocks(ext).values()
        ]
        out = _logits(ext)
        for h in hooks:
            h.remove()
        assert len(moves) == 2 and max(moves) <= 2 * gamma * math.sqrt(hidden) * (1 + 1e-4)
        rel[gamma] = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel[1e-2] < 0.05
    assert rel[1e-2] < rel[1.0] / 10


# ------------------------------------------------------------------------------ generate, save/load, export


@pytest.mark.parametrize("model_type,pattern", [("llama", "block"), ("gemma2", "sequential"), ("qwen2", "block")])
def test_generate_with_cache_matches_no_cache(model_type, pattern):
    model = tiny_model(model_type)
    extend(model, range(1, 3), pattern=pattern, repeats=2, rank=4, gamma_init=1.0)
    _randomize_adapters(model)  # repeats that differ from their originals
    prompt = IDS[:1, :6]
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kw)
        uncached = model.generate(prompt, use_cache=False, **kw)
    assert cached.shape == (1, 14)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_save_load_round_trip(tmp_path, model_type):
    from flexigpt_kernels.io import from_pretrained, save_pretrained

    model = tiny_model(model_type)
    extend(model, range(1, 3), pattern="block", repeats=2, rank=4, gamma_init=0.5)
    _randomize_adapters(model)
    save_pretrained(model, tmp_path / "ext", tokenizer=byte_tokenizer())
    loaded = from_pretrained(tmp_path / "ext")
    assert torch.equal(_logits(loaded), _logits(model))
    assert loaded.flexigpt_meta == model.flexigpt_meta
    assert loaded.config.num_hidden_layers == 6
    assert getattr(loaded.config, "layer_types", None) == getattr(model.config, "layer_types", None)
    layers = decoder_layers(loaded)
    for pos, base in model.flexigpt_meta["base_map"].items():
        assert layers[int(pos)].self_attn.q_proj.weight is layers[base].self_attn.q_proj.weight
        assert layers[int(pos)].self_attn.layer_idx == int(pos)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(loaded.generate(IDS[:1, :5], **kw), model.generate(IDS[:1, :5], **kw))


def test_export_dense(tmp_path):
    """Without output norms a repeat is a plain block (W + sBA): export_dense gives a stock
    checkpoint with the extended layer count; with output norms export is refused."""
    from transformers import AutoModelForCausalLM

    from flexigpt_kernels.io import export_dense

    model = tiny_model("llama")
    extend(model, range(1, 3), pattern="sequential", repeats=2, rank=4, output_norm=False)
    _randomize_adapters(model)
    export_dense(model, tmp_path / "dense")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()
    assert plain.config.num_hidden_layers == 6
    torch.testing.assert_close(_logits(plain), _logits(model), rtol=1e-5, atol=1e-5)

    normed = tiny_model("llama")
    extend(normed, range(1, 3), repeats=2, rank=4)
    with pytest.raises(ValueError, match="output norms"):
        export_dense(normed, tmp_path / "refused")


# ------------------------------------------------------------------------------ CLI


def test_cli_extend(tmp_path, capsys):
    from flexigpt_kernels.cli import main
    from flexigpt_kernels.io import from_pretrained

    src = tmp_path / "src"
    model = tiny_model("llama")
    model.save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    text = tmp_path / "heldout.txt"
    text.write_text("\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(40)))
    out = tmp_path / "ext"
    status = main(
        [
            "extend",
            str(src),
            "--layers",
            "1:3",
            "--pattern",
            "sequential",
            "--repeats",
            "2",
            "--rank",
            "4",
            "--data",
            str(text),
            "--seq-len",
            "32",
            "--eval-chunks",
            "4",
            "--out",
            str(out),
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "4 -> 6 blocks" in printed and "held-out perplexity" in printed
    loaded = from_pretrained(out)
    assert loaded.flexigpt_meta["order"] == [0, 1, 2, 1, 2, 3]
    assert loaded.flexigpt_meta["source"] == str(src.resolve())
    assert main(["extend", str(src), "--layers", "1:3", "--out", str(out), "--no-eval"]) == 2  # --out not empty
    assert "--out" in capsys.readouterr().err
