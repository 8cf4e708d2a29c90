"""lm-evaluation-harness on an in-memory tiny model with a local task file, offline."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tests.eval.helpers import byte_tokenizer, tiny_model

pytest.importorskip("lm_eval", reason="lm-eval is optional: pip install 'lm-eval==0.4.13'")

TASK_YAML = """\
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: tiny_mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture
def task_file(tmp_path):
    """A multiple-choice task of 8 questions, data beside the YAML (relative data_files)."""
    rows = [
        {"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(2 * i + 1), "no"], "answer": i % 3}
        for i in range(8)
    ]
    (tmp_path / "tiny_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "tiny_mc.yaml"
    path.write_text(TASK_YAML)
    return path


def test_local_task_file_on_an_in_memory_model(task_file, monkeypatch):
    from flexigpt_kernels.eval import evaluate_tasks

    monkeypatch.chdir(task_file.parent.parent)  # relative data_files resolve against the YAML, not the cwd
    model = tiny_model("llama", layers=2)
    tok = byte_tokenizer()
    random.seed(123)
    torch.manual_seed(123)
    before = (random.random(), torch.rand(1))
    random.seed(123)
    torch.manual_seed(123)
    res = evaluate_tasks(model, tok, [str(task_file)], batch_size=8)
    metrics = res.metrics["tiny_mc"]
    assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["acc_norm"] <= 1.0
    assert metrics["acc"] * 8 == int(metrics["acc"] * 8)  # a fraction of the 8 questions
    assert metrics["num_samples"] == 8
    assert tok.pad_token is None  # the caller's tokenizer is not modified
    assert (random.random(), torch.rand(1)) == before  # global random state untouched

    # the same number, computed by hand from the model's log-likelihoods of each choice
    rows = [json.loads(line) for line in (task_file.parent / "tiny_mc.jsonl").read_text().splitlines()]
    correct = 0
    with torch.no_grad():
        for row in rows:
            ctx = tok(f"Question: {row['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
            scores = []
            for choice in row["choices"]:
                cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([ctx + cont])
                logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
                scores.append(sum(logp[len(ctx) - 1 + k, c].item() for k, c in enumerate(cont)))
            correct += int(max(range(len(scores)), key=scores.__getitem__) == row["answer"])
    assert metrics["acc"] == pytest.approx(correct / len(rows))


def test_unknown_task_name_is_a_clear_error(tmp_path):
    from flexigpt_kernels.eval import evaluate_tasks

    with pytest.raises(ValueError, match="no such task file"):
        evaluate_tasks(tiny_model("llama", layers=1), byte_tokenizer(), [str(tmp_path / "missing.yaml")])
