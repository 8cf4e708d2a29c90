"""`flexigpt generate DIR`: a tiny converted model saved with its tokenizer, decoded from the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from flexigpt_kernels import cli

from .helpers import hf_greedy, tiny_model

WORDS = [f"w{i}" for i in range(92)]


def _tiny_tokenizer():
    """A word-level tokenizer over 96 ids (4 specials + 92 words), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from flexigpt_kernels.io import save_pretrained

    model = tiny_model("llama", gamma=0.1)
    model.generation_config.eos_token_id = None  # run to max_new_tokens
    directory = tmp_path_factory.mktemp("gen") / "model"
    save_pretrained(model, directory, tokenizer=_tiny_tokenizer())
    return model, directory


def _run(capsys, *argv):
    assert cli.main(["generate", *map(str, argv)]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_command_greedy_matches_model(saved, capsys):
    model, directory = saved
    out = _run(capsys, directory, "--prompt", "w1 w5 w9 w20", "--max-new-tokens", 10, "--draft-tokens", 3, "--json")
    prompt = torch.tensor([[5, 9, 13, 24]])
    assert out["token_ids"] == hf_greedy(model, prompt, 10)[0].tolist()
    stats = out["stats"]
    assert stats["mode"] == "self_speculative" and stats["draft_tokens"] == 3 and stats["new_tokens"] == 10
    assert out["completion"].split() == [WORDS[i - 4] for i in out["token_ids"][4:]]

    plain = _run(
        capsys, directory, "--prompt", "w1 w5 w9 w20", "--max-new-tokens", 10, "--no-self-speculative", "--json"
    )
    assert plain["token_ids"] == out["token_ids"] and plain["stats"]["mode"] == "plain"


def test_generate_command_sampling_and_text_output(saved, capsys):
    _, directory = saved
    a = _run(
        capsys,
        directory,
        "--prompt",
        "w3 w4",
        "--max-new-tokens",
        6,
        "--temperature",
        0.8,
        "--top-p",
        0.9,
        "--seed",
        3,
        "--json",
    )
    b = _run(
        capsys,
        directory,
        "--prompt",
        "w3 w4",
        "--max-new-tokens",
        6,
        "--temperature",
        0.8,
        "--top-p",
        0.9,
        "--seed",
        3,
        "--json",
    )
    assert a["do_sample"] and a["token_ids"] == b["token_ids"]
    assert cli.main(["generate", str(directory), "--prompt", "w3 w4", "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("w3 w4") and "acceptance=" in captured.err
