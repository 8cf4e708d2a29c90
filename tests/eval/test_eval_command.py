"""`flexigpt eval`: perplexity and tasks, dense source and converted model side by side."""

from __future__ import annotations

import json

import pytest

from tests.eval.helpers import byte_tokenizer, tiny_model
from tests.eval.test_lm_eval_tasks import TASK_YAML


@pytest.fixture
def extended_checkpoint(tmp_path):
    """A tiny dense model saved as a Hugging Face folder, and its extension (source recorded)."""
    from flexigpt_kernels.convert.extend import extend
    from flexigpt_kernels.io import save_pretrained

    src = tmp_path / "dense"
    model = tiny_model("llama")
    tok = byte_tokenizer()
    model.save_pretrained(src)
    tok.save_pretrained(src)
    extend(model, range(1, 3), repeats=2, rank=4, gamma_init=0.3, source=str(src.resolve()))
    save_pretrained(model, tmp_path / "ext")  # no tokenizer: eval takes the source's
    text = tmp_path / "heldout.txt"
    text.write_text("\n".join(f"Sentence {i}: a small amount of held-out text for the test." for i in range(30)))
    return src, tmp_path / "ext", text


def test_eval_reports_baseline_and_model(extended_checkpoint, capsys):
    from flexigpt_kernels.cli import main
    from flexigpt_kernels.commands.eval import format_table
    from flexigpt_kernels.eval import perplexity
    from flexigpt_kernels.io import from_pretrained

    src, ext, text = extended_checkpoint
    args = ["eval", str(ext), "--data", str(text), "--seq-len", "32", "--num-chunks", "4"]
    tasks = []
    try:
        import lm_eval  # noqa: F401

        (text.parent / "tiny_mc.jsonl").write_text(
            "".join(
                json.dumps({"question": f"{i}+{i}?", "choices": [str(2 * i), str(i)], "answer": 0}) + "\n"
                for i in range(4)
            )
        )
        (text.parent / "tiny_mc.yaml").write_text(TASK_YAML)
        tasks = ["--tasks", str(text.parent / "tiny_mc.yaml")]
    except ImportError:
        pass
    assert main(args + tasks + ["--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["sources"] == {"model": str(ext.resolve()), "baseline": str(src.resolve())}
    tok = byte_tokenizer()
    model = from_pretrained(ext)
    expect = perplexity(model, tok, str(text), seq_len=32, num_chunks=4, progress=False)
    assert summary["model"]["perplexity"] == pytest.approx(expect, rel=1e-6)
    assert summary["baseline"]["perplexity"] != summary["model"]["perplexity"]
    if tasks:
        for column in ("model", "baseline"):
            assert 0 <= summary[column]["tasks"]["tiny_mc"]["acc"] <= 1
    table = format_table(summary)
    assert f"dense ({src.resolve()})" in table and f"extend ({ext.resolve()})" in table and "perplexity" in table
    if tasks:
        assert "tiny_mc acc" in table
    # --baseline none: the model alone
    assert main(args + ["--baseline", "none", "--json"]) == 0
    alone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert alone["baseline"] is None and alone["model"]["perplexity"] == pytest.approx(expect, rel=1e-6)


def test_baseline_source_rules():
    from flexigpt_kernels.commands.eval import baseline_source, looks_like_default

    model = tiny_model("llama", layers=1)
    assert baseline_source(model, None) is None  # a plain model with no record
    model.flexigpt_meta = {"method": "flexigpt", "num_blocks": 1, "source": "/some/dense"}
    assert baseline_source(model, None) == "/some/dense"
    assert baseline_source(model, "none") is None and baseline_source(model, "default") == "default"
    model.flexigpt_meta = {"method": "flexigpt", "num_blocks": 30}
    assert not looks_like_default(model) and baseline_source(model, None) is None
    model.config.update({"hidden_size": 576, "num_attention_heads": 9, "vocab_size": 49152})
    assert looks_like_default(model) and baseline_source(model, None) == "default"
