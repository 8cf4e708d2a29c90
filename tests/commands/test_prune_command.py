"""The main job: `flexigpt prune` end to end on a tiny model (real tokenizer, local text files),
and run_prune_job's summary on token tensors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flexigpt_kernels.cli import main
from flexigpt_kernels.prune_job import check_out_dir, format_summary, run_prune_job


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(vocab=256, layers=6):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def test_run_prune_job_reports_and_saves(tmp_path):
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    calib, held = torch.randint(0, 256, (8, 32), generator=g), torch.randint(0, 256, (4, 32), generator=g)
    summary = run_prune_job(
        model,
        None,
        calib,
        held,
        ratio=0.34,
        rank=8,
        seq_len=32,
        num_samples=8,
        eval_chunks=4,
        out=str(tmp_path / "out"),
        local_fit="gamma",
        progress=False,
    )
    rep = summary["report"]
    assert len(rep["pruned"]) == 2 and set(rep["base_map"]) == {str(b) for b in rep["pruned"]}
    assert set(summary["perplexity"]) == {"dense", "flexigpt", "drop"}
    assert all(v > 1 for v in summary["perplexity"].values())
    p = summary["parameters"]
    assert p["drop"] < p["flexigpt"] < p["dense"]
    own_norms = len(rep["pruned"]) * 2 * 64  # each replacement block keeps its two RMSNorms
    assert p["flexigpt"] == p["drop"] + p["adapters_and_norms"] + own_norms  # shared weights stored once
    assert summary["reload_identical_logits"] is True
    text = format_summary(summary)
    assert "held-out perplexity" in text and "BI" in text
    json.dumps(summary)  # JSON-ready


def test_out_dir_is_not_overwritten_unless_asked(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="overwrite"):
        check_out_dir(str(tmp_path), overwrite=False)
    with pytest.raises(FileExistsError, match="did not write"):  # overwrite replaces only our own folders
        check_out_dir(str(tmp_path), overwrite=True)
    check_out_dir(str(tmp_path / "new"), overwrite=False)


def test_prune_cli_end_to_end(tmp_path, capsys, default_model_and_tokenizer):
    _, tok = default_model_and_tokenizer
    model = tiny_llama(vocab=len(tok), layers=4)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    text = " ".join(["The river flows past the old mill and the town grows around it."] * 40)
    (tmp_path / "calib.txt").write_text("\n".join([text] * 4))
    out = tmp_path / "pruned"
    argv = [
        "prune",
        "--model",
        str(tmp_path / "model"),
        "--calib",
        str(tmp_path / "calib.txt"),
        "--eval",
        str(tmp_path / "calib.txt"),
        "--ratio",
        "0.5",
        "--rank",
        "4",
        "--seq-len",
        "32",
        "--num-samples",
        "4",
        "--eval-chunks",
        "2",
        "--out",
        str(out),
        "--json",
    ]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["report"]["method"] == "flexigpt" and len(summary["report"]["pruned"]) == 2
    assert summary["reload_identical_logits"] is True
    assert (out / "flexigpt.json").exists() and (out / "model.safetensors").exists()
    assert main(argv) == 2  # a second run refuses the non-empty --out before any work
    assert "--out" in capsys.readouterr().err
