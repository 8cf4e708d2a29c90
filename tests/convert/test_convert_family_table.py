import pytest
import torch
import torch.nn as nn

from flexigpt_kernels.convert import (
    FAMILIES,
    SUPPORTED_MODEL_TYPES,
    block_influence,
    decoder_layers,
    family_of,
    linear_names,
    num_layers,
)

from .conftest import TINY_CONFIGS, tiny_model

EXPECTED_FAMILY = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "opt": "opt",
}


def test_every_family_has_a_tiny_model():
    assert set(EXPECTED_FAMILY) == set(TINY_CONFIGS)
    assert set(EXPECTED_FAMILY.values()) == set(FAMILIES)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_family_names_match_the_real_modules(model_type):
    model = tiny_model(model_type, layers=3)
    family = family_of(model)
    assert family.name == EXPECTED_FAMILY[model_type]
    layers = decoder_layers(model)
    assert isinstance(layers, nn.ModuleList) and len(layers) == 3 and num_layers(model) == 3
    layer = layers[1]
    assert linear_names(model) == family.attention + family.mlp
    for name in family.linears:
        assert isinstance(layer.get_submodule(name), nn.Linear), name
    assert family.attn_out in family.attention and family.mlp_out in family.mlp
    assert layer.get_submodule(family.attn_out).out_features == model.config.hidden_size
    assert layer.get_submodule(family.mlp_out).out_features == model.config.hidden_size
    for name in family.norms + tuple(n for n in (family.attn_out_norm, family.mlp_out_norm) if n):
        assert layer.get_submodule(name).weight.shape[-1] in (model.config.hidden_size, 16), name
    # every linear of the layer is listed, and nothing else
    listed = {n for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    assert listed == set(family.linears)


def test_family_specifics():
    qwen2 = decoder_layers(tiny_model("qwen2", layers=2))[0].self_attn
    assert qwen2.q_proj.bias is not None and qwen2.o_proj.bias is None
    opt = decoder_layers(tiny_model("opt", layers=2))[0]
    assert all(opt.get_submodule(n).bias is not None for n in FAMILIES["opt"].linears)
    assert isinstance(opt.final_layer_norm, nn.LayerNorm) and opt.final_layer_norm.bias is not None
    phi3 = tiny_model("phi3", layers=2)
    layer = decoder_layers(phi3)[0]
    c = phi3.config
    head_dim = c.hidden_size // c.num_attention_heads
    assert layer.self_attn.qkv_proj.out_features == (c.num_attention_heads + 2 * c.num_key_value_heads) * head_dim
    assert layer.mlp.gate_up_proj.out_features == 2 * c.intermediate_size


def test_layer_list_is_the_live_one_the_forward_uses():
    model = tiny_model("llama", layers=3)
    assert decoder_layers(model) is model.model.layers
    assert decoder_layers(model.model) is model.model.layers  # the base model works too
    opt = tiny_model("opt", layers=2)
    assert decoder_layers(opt) is opt.model.decoder.layers


def test_multimodal_gemma3_finds_the_text_decoder():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = dict(TINY_CONFIGS["gemma3_text"], num_hidden_layers=2, vocab_size=300)
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=299,
        boi_token_index=297,
        eoi_token_index=298,
    )
    model = Gemma3ForConditionalGeneration(config)
    assert family_of(model).name == "gemma3"
    assert decoder_layers(model) is model.model.language_model.layers
    assert num_layers(model) == 2
    bi = block_influence(model.eval(), torch.randint(3, 250, (2, 8)), progress=False)
    assert bi.shape == (2,) and torch.isfinite(bi).all()


def test_unsupported_model_lists_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'") as err:
        family_of(model)
    for model_type in SUPPORTED_MODEL_TYPES:
        assert model_type in str(err.value)
    with pytest.raises(ValueError, match="unsupported model_type None"):
        decoder_layers(nn.Linear(2, 2))


def test_missing_layer_list_is_reported():
    model = tiny_model("llama", layers=2)
    model.model.layers = nn.Sequential(*model.model.layers)
    with pytest.raises(ValueError, match="no decoder layer list.*model.layers"):
        decoder_layers(model)
