"""Every family of the table, end to end on a tiny random model built from its config:
prune() -> logits finite, shared weights are the base's tensors, stored parameters fall,
generate() with the KV cache matches generate() without it, save -> load gives identical
logits. Plus the "drop" baseline with the cache, and an unsupported architecture."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers

from flexigpt_kernels.convert.families import FAMILIES, decoder_layers, family_of, num_layers
from flexigpt_kernels.convert.prune import prune, stored_parameters
from flexigpt_kernels.io import export_dense, from_pretrained, save_pretrained
from flexigpt_kernels.nn import OutputNorm, SharedLoRALinear

VOCAB = 128
_TOKENS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=96,
    max_position_embeddings=64,
    **_TOKENS,
)
_ALTERNATING = ["sliding_attention", "full_attention"] * 2

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **_COMMON),
    "mistral": lambda: transformers.MistralConfig(num_key_value_heads=2, **_COMMON),
    "qwen2": lambda: transformers.Qwen2Config(num_key_value_heads=2, **_COMMON),
    "qwen3": lambda: transformers.Qwen3Config(num_key_value_heads=2, head_dim=16, **_COMMON),
    # sliding_window < prompt + new tokens, so the sliding layers' cache actually slides
    "gemma2": lambda: transformers.Gemma2Config(
        num_key_value_heads=2, head_dim=16, sliding_window=6, layer_types=_ALTERNATING, **_COMMON
    ),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        num_key_value_heads=2, head_dim=16, sliding_window=6, layer_types=_ALTERNATING, **_COMMON
    ),
    "phi3": lambda: transformers.Phi3Config(num_key_value_heads=2, **_COMMON),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        ffn_dim=96,
        word_embed_proj_dim=64,
        max_position_embeddings=64,
        **_TOKENS,
    ),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one intra-op thread is ~100x faster than two on a busy 2-core box
    (OpenMP spin-waits), e.g. a 64x96 SVD 2.6 ms vs 250 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()


def _inputs(seed: int = 1, shape=(2, 7)) -> torch.Tensor:
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@functools.cache
def _converted(family: str):
    """(model, report, params before) for `family`, pruned once per session; do not modify."""
    model = _tiny_model(family)
    before = stored_parameters(model)
    calibration = _inputs(seed=0, shape=(2, 8))
    model, report = prune(model, calibration, ratio=0.5, rank=4, seq_len=8, num_samples=2, progress=False)
    return model.eval(), report, before


def _greedy(model, ids, use_cache):
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=0,
        )


def test_table_and_tests_cover_the_same_families():
    assert set(CONFIGS) == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_conversion_runs_and_shares_weights(family):
    model, report, before = _converted(family)
    assert family_of(model).name == family
    assert report.method == "flexigpt" and len(report.pruned) == 2
    assert sorted(report.base_map) == report.pruned
    assert model.flexigpt_meta["family"] == family
    layers, linears = decoder_layers(model), FAMILIES[family].linears
    for i, j in report.base_map.items():
        assert j not in report.pruned
        assert layers[i].flexigpt_base == j
        for name in linears:
            shared, base = layers[i].get_submodule(name), layers[j].get_submodule(name)
            assert isinstance(shared, SharedLoRALinear) and not isinstance(base, SharedLoRALinear)
            assert shared.weight is base.weight  # the same tensor object, never a copy
            assert shared.rank == 4
    with torch.no_grad():
        logits = model(_inputs()).logits
    assert logits.shape == (2, 7, VOCAB)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_stored_parameters_fall_by_weights_minus_adapters(family):
    model, report, before = _converted(family)
    layers = decoder_layers(model)
    released = sum(layers[i].get_submodule(n).weight.numel() for i in report.base_map for n in FAMILIES[family].linears)
    added = sum(
        p.numel()
        for i in report.base_map
        for m in layers[i].modules()
        if isinstance(m, (SharedLoRALinear, OutputNorm))
        for n, p in m.named_parameters(recurse=False)
        if n != "bias"
    )
    assert added > 0
    assert report.params_before == before
    assert report.params_after == stored_parameters(model) == before - released + added
    assert report.params_after < before


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_generate_with_cache_matches_without(family):
    model, _, _ = _converted(family)
    ids = _inputs(seed=2, shape=(1, 5))
    with_cache, without_cache = _greedy(model, ids, True), _greedy(model, ids, False)
    assert with_cache.shape[1] > ids.shape[1]
    assert torch.equal(with_cache, without_cache)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_save_load_identical_logits(family, tmp_path):
    model, report, _ = _converted(family)
    save_pretrained(model, tmp_path / "ckpt")
    loaded = from_pretrained(tmp_path / "ckpt")
    ids = _inputs(seed=3)
    with torch.no_grad():
        expected, got = model(ids).logits, loaded(ids).logits
    assert torch.equal(expected, got)
    assert loaded.flexigpt_meta == model.flexigpt_meta
    assert stored_parameters(loaded) == report.params_after
    layers = decoder_layers(loaded)
    for i, j in report.base_map.items():
        for name in FAMILIES[family].linears:
            assert layers[i].get_submodule(name).weight is layers[j].get_submodule(name).weight


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_export_dense_without_output_norms_matches_stock(family, tmp_path):
    model, _ = prune(_tiny_model(family), None, blocks=[1, 2], rank=4, output_norm=False, progress=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):  # not just the SVD init: every adapter entry matters
                p.add_(0.05 * torch.randn_like(p))
    out = export_dense(model, tmp_path / "dense")
    stock = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any(isinstance(m, SharedLoRALinear) for m in stock.modules())
    ids = _inputs(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=f"no counterpart in the stock {family} architecture"):
        export_dense(_converted(family)[0], tmp_path / "refused")


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_drop_generates_with_cache(family):
    model = _tiny_model(family)
    original_types = list(getattr(model.config, "layer_types", None) or [])
    model, report = prune(model, None, blocks=[1, 2], method="drop", progress=False)
    assert report.pruned == [1, 2] and num_layers(model) == 2 == model.config.num_hidden_layers
    layers = decoder_layers(model)
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1]
    if original_types:
        assert model.config.layer_types == [original_types[0], original_types[3]]
    ids = _inputs(seed=4, shape=(1, 5))
    assert torch.equal(_greedy(model, ids, True), _greedy(model, ids, False))


def test_unsupported_architecture_lists_supported_ones():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'") as info:
        prune(model, None, blocks=[1], progress=False)
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "opt"):
        assert model_type in str(info.value)
