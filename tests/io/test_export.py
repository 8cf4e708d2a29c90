"""export_dense: a plain Hugging Face checkpoint that stock transformers loads to the same
logits; refused (with the reason) for models with output norms."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from safetensors import safe_open

from flexigpt_kernels.io import FLEXIGPT_CONFIG_NAME, dense_state_dict, export_dense, save_pretrained
from flexigpt_kernels.nn import SharedLoRALinear

from .helpers import converted, inputs, llama_config, logits, one_thread, tiny_tokenizer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _stock(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def model():
    return converted(output_norm=False)


def test_export_from_model_loads_with_stock_transformers(model, tmp_path):
    out = export_dense(model, tmp_path / "dense")
    assert FLEXIGPT_CONFIG_NAME not in os.listdir(out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not [k for k in keys if "lora" in k or "output_norm" in k]
    assert "model.layers.1.self_attn.q_proj.weight" in keys and "lm_head.weight" not in keys  # tied, once
    stock = _stock(out)
    assert type(stock) is transformers.LlamaForCausalLM
    assert stock.lm_head.weight is stock.model.embed_tokens.weight
    ids = inputs()
    torch.testing.assert_close(logits(stock, ids), logits(model, ids), atol=1e-5, rtol=0)
    # the merged weight: W_base + s B A
    shared = model.model.layers[1].self_attn.q_proj
    assert isinstance(shared, SharedLoRALinear)
    torch.testing.assert_close(
        stock.model.layers[1].self_attn.q_proj.weight, shared.weight + shared.scale * shared.lora_b @ shared.lora_a
    )


def test_export_from_directory_untied_with_biases(tmp_path):
    model = converted(output_norm=False, config=llama_config(tie_word_embeddings=False, attention_bias=True))
    assert model.model.layers[1].self_attn.q_proj.bias is not None  # the pruned block's own bias
    src = save_pretrained(model, tmp_path / "ckpt", tiny_tokenizer())
    out = export_dense(src, tmp_path / "dense")
    assert "tokenizer.json" in os.listdir(out)  # copied along
    stock = _stock(out)
    ids = inputs(seed=3)
    torch.testing.assert_close(logits(stock, ids), logits(model, ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(stock.model.layers[1].self_attn.q_proj.bias, model.model.layers[1].self_attn.q_proj.bias)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4


def test_export_refuses_output_norms(tmp_path):
    model = converted(output_norm=True)
    with pytest.raises(ValueError) as info:
        export_dense(model, tmp_path / "dense")
    message = str(info.value)
    assert "no counterpart in the stock llama architecture" in message
    assert "output_norm=False" in message and "flexigpt_kernels.from_pretrained" in message
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="output norms"):
        dense_state_dict(model)


def test_export_refuses_non_empty_directory(model, tmp_path):
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        export_dense(model, tmp_path / "dense")
    with pytest.raises(FileExistsError, match="did not write"):  # overwrite replaces only our own folders
        export_dense(model, tmp_path / "dense", overwrite=True)
    (tmp_path / "dense" / "x").unlink()
    export_dense(model, tmp_path / "dense")
    export_dense(model, tmp_path / "dense", overwrite=True)  # an export of ours: replaced
    assert sorted(os.listdir(tmp_path)) == ["dense"]


@pytest.mark.slow  # a fresh interpreter importing torch + transformers: ~5-20 s on 2 busy cores
def test_stock_transformers_loads_export_without_this_package(model, tmp_path):
    import subprocess
    import sys

    out = export_dense(model, tmp_path / "dense")
    ids = inputs()
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys, torch, transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "with torch.no_grad():\n"
        f"    torch.save(m(ids).logits, {str(tmp_path / 'logits.pt')!r})\n"
        "assert not [n for n in sys.modules if n.startswith('flexigpt_kernels')]\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env, timeout=300)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), logits(model, ids), atol=1e-5, rtol=0)
