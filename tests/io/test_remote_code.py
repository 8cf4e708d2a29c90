"""The checkpoint's own model_type and custom code (io/remote_code), in this environment:
config.json's shape, the custom classes against the family table and the op's spec, the
custom-code model against fk.from_pretrained, and format-1 checkpoints (migration).

The same checkpoints loaded where flexigpt_kernels cannot be imported: test_remote_code_isolated.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

import flexigpt_kernels.io.remote_code.modeling_flexigpt as modeling
from flexigpt_kernels.convert.extend import extend
from flexigpt_kernels.convert.families import SUPPORTED_MODEL_TYPES
from flexigpt_kernels.convert.prune import prune
from flexigpt_kernels.io import FLEXIGPT_CONFIG_NAME, from_pretrained, load_tokenizer, save_pretrained
from flexigpt_kernels.io.checkpoint import serving_architecture
from flexigpt_kernels.io.remote_code import CONFIG_CLASSES, REMOTE_CODE_FILES
from flexigpt_kernels.ops.reference import reference_forward
from tests.eval.helpers import byte_tokenizer, tiny_model

from .helpers import one_thread

#: the source model_types with custom classes: every text-only entry of the family table
FAMILY_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "opt")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(autouse=True)
def _modules_cache(tmp_path_factory, monkeypatch):
    """transformers copies custom code into HF_MODULES_CACHE: keep it out of the home folder."""
    import transformers.dynamic_module_utils as dmu

    cache = tmp_path_factory.getbasetemp() / "hf_modules"
    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(cache))


@torch.no_grad()
def family_model(model_type: str, *, method: str = "flexigpt") -> torch.nn.Module:
    """A tiny random model of `model_type` (vocab 257, the byte tokenizer's), pruned at blocks 1
    and 2 (rank 3) or extended (layers 1:3 repeated), with adapters and gammas perturbed so that
    every stored tensor of a replacement block changes the logits."""
    kw = {"ffn_dim": 64, "word_embed_proj_dim": 32} if model_type == "opt" else {}
    model = tiny_model(model_type, layers=4, hidden=32, **kw)
    if method == "extend":
        model, _ = extend(model, "1:3", repeats=2, rank=3, gamma_init=0.5)
    else:
        model, _ = prune(model, None, blocks=[1, 2], rank=3, method=method, progress=False)
    gen = torch.Generator().manual_seed(7)
    for name, p in model.named_parameters():
        if name.endswith(("lora_a", "lora_b")) or ".output_norm." in name:
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def save_family(model_type: str, directory, *, method: str = "flexigpt"):
    return save_pretrained(family_model(model_type, method=method), directory, byte_tokenizer())


def ids(batch: int = 2, length: int = 9, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_custom_classes_cover_the_family_table():
    # the multimodal gemma3 (Gemma3ForConditionalGeneration) is the one entry without a custom class
    assert set(CONFIG_CLASSES) == set(SUPPORTED_MODEL_TYPES) - {"gemma3"}
    for model_type, config_class in CONFIG_CLASSES.items():
        hf_config = transformers.CONFIG_MAPPING[model_type]
        assert issubclass(config_class, hf_config) and config_class.model_type == f"flexigpt_{model_type}"
        hf_model = transformers.MODEL_FOR_CAUSAL_LM_MAPPING[hf_config]
        custom = getattr(modeling, serving_architecture(hf_model.__name__))  # the name config.json gives
        assert issubclass(custom, hf_model) and custom.config_class is config_class
    assert modeling.fused_shared_lora_linear is not None  # flexigpt_kernels is importable here


@pytest.mark.parametrize(
    "rank,bias,norm,dtype",
    [
        (1, False, False, torch.float32),
        (3, True, True, torch.float32),
        (5, True, False, torch.float16),
        (2, False, True, torch.float16),
    ],
)
def test_plain_replacement_linear_is_the_spec(rank, bias, norm, dtype):
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(2, 3, 19, generator=gen).to(dtype)
    w, a, b = (torch.randn(s, generator=gen).to(dtype) / 4 for s in ((23, 19), (rank, 19), (23, rank)))
    bias_t = torch.randn(23, generator=gen).to(dtype) if bias else None
    gamma = torch.rand(23, generator=gen).to(dtype) + 0.5 if norm else None
    got = modeling.shared_lora_linear_reference(x, w, a, b, 0.7, bias_t, gamma, 1e-5)
    want = reference_forward(x.reshape(-1, 19), w, a, b, 0.7, bias_t, gamma, 1e-5, None).out.reshape(2, 3, 23)
    assert got.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_config_json_names_its_own_model_type(tmp_path):
    path = save_family("qwen2", tmp_path / "qwen2_ckpt")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "flexigpt_qwen2"
    assert config["architectures"] == ["FlexiGPTQwen2ForCausalLM"]
    assert config["auto_map"] == {
        "AutoConfig": "configuration_flexigpt.FlexiGPTQwen2Config",
        "AutoModelForCausalLM": "modeling_flexigpt.FlexiGPTQwen2ForCausalLM",
    }
    record = json.loads((path / FLEXIGPT_CONFIG_NAME).read_text())
    spec = config["flexigpt"]
    assert spec["shared"] == record["shared"] and spec["output_norms"] == record["output_norms"]
    assert spec["base_map"] == record["base_map"] and set(spec["blocks"]) == {"model.layers.1", "model.layers.2"}
    assert record["hf_model_type"] == "qwen2" and record["format_version"] == 2
    for name in REMOTE_CODE_FILES:  # the package's files, byte for byte
        assert (path / name).read_bytes() == (Path(modeling.__file__).parent / name).read_bytes()


def test_drop_checkpoint_stays_plain(tmp_path):
    path = save_family("llama", tmp_path / "drop_ckpt", method="drop")
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config and "flexigpt" not in config
    assert not any((path / n).exists() for n in REMOTE_CODE_FILES)


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "phi3"])
def test_custom_code_model_equals_fk_model(model_type, tmp_path):
    path = save_family(model_type, tmp_path / f"{model_type}_here")
    ours = from_pretrained(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    assert type(theirs).__name__ == json.loads((path / "config.json").read_text())["architectures"][0]
    x = ids()
    with torch.no_grad():
        # the fused op computes both here, so the logits are identical
        assert torch.equal(ours(x).logits, theirs(x).logits)
    blocks = {n for n, m in theirs.named_modules() if hasattr(m, "flexigpt_base")}
    assert blocks == {"model.layers.1", "model.layers.2"}
    # the base weight is the kept block's own tensor (stored once)
    j = int(ours.flexigpt_meta["base_map"]["1"])
    shared = theirs.get_submodule("model.layers.1.mlp.down_proj")
    assert shared.weight is theirs.get_submodule(f"model.layers.{j}.mlp.down_proj").weight


def test_stock_transformers_refuses_without_the_custom_code(tmp_path):
    path = save_family("llama", tmp_path / "refused")
    for kwargs in ({}, {"trust_remote_code": False}):
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    # without the custom code (e.g. a copy that dropped it): transformers' unknown model type error
    stripped = tmp_path / "stripped"
    shutil.copytree(path, stripped)
    config = json.loads((stripped / "config.json").read_text())
    del config["auto_map"]
    (stripped / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="flexigpt_llama"):
        transformers.AutoModelForCausalLM.from_pretrained(stripped)


def test_our_loaders_never_run_or_ask_for_the_custom_code(tmp_path, monkeypatch):
    path = save_family("llama", tmp_path / "no_prompt")
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("transformers asked whether to run custom code"))
    assert load_tokenizer(path).eos_token == "<|endoftext|>"
    assert type(from_pretrained(path)).__name__ == "LlamaForCausalLM"


def _as_format_1(path) -> None:
    """Rewrite a checkpoint folder into the shape format 1 wrote: the plain Hugging Face
    config.json (its model_type, with the serving architecture name), no custom code, no
    card, flexigpt.json without hf_model_type and card."""
    config = json.loads((path / "config.json").read_text())
    record = json.loads((path / FLEXIGPT_CONFIG_NAME).read_text())
    config["model_type"] = record.pop("hf_model_type")
    for key in ("auto_map", "flexigpt"):
        config.pop(key)
    record.pop("card")
    record["format_version"] = 1
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (path / FLEXIGPT_CONFIG_NAME).write_text(json.dumps(record, indent=2))
    for name in (*REMOTE_CODE_FILES, "README.md"):
        (path / name).unlink()


@pytest.mark.parametrize("model_type,method", [("llama", "flexigpt"), ("gemma2", "flexigpt"), ("llama", "extend")])
def test_format_1_checkpoint_loads_and_resaves_as_format_2(model_type, method, tmp_path):
    model = family_model(model_type, method=method)
    path = save_pretrained(model, tmp_path / "old", byte_tokenizer())
    _as_format_1(path)
    loaded = from_pretrained(path)
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    assert loaded.flexigpt_meta["format_version"] == 2 and loaded.flexigpt_meta["method"] == method
    again = save_pretrained(loaded, tmp_path / "new")
    config = json.loads((again / "config.json").read_text())
    assert config["model_type"] == f"flexigpt_{model_type}" and "auto_map" in config
    assert json.loads((again / FLEXIGPT_CONFIG_NAME).read_text())["format_version"] == 2
    theirs = transformers.AutoModelForCausalLM.from_pretrained(again, trust_remote_code=True)
    with torch.no_grad():
        assert torch.equal(model(x).logits, theirs(x).logits)


def test_vllm_config_registration_parses_config_json(tmp_path, monkeypatch):
    """What the vLLM plugin registers lets AutoConfig read config.json without trust_remote_code
    (vLLM then picks the model class from `architectures`)."""
    from transformers.models.auto import configuration_auto

    from flexigpt_kernels.integrations.vllm import register_configs

    path = save_family("mistral", tmp_path / "vllm_cfg")
    mapping = configuration_auto.CONFIG_MAPPING
    monkeypatch.setattr(mapping, "_extra_content", dict(mapping._extra_content))  # undone after the test
    register_configs()
    register_configs()  # idempotent
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    assert type(config) is CONFIG_CLASSES["mistral"] and config.architectures == ["FlexiGPTMistralForCausalLM"]
    assert config.flexigpt["base_map"] == json.loads((path / FLEXIGPT_CONFIG_NAME).read_text())["base_map"]
