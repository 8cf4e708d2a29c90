"""Every `flexigpt` subcommand with bad input: exit status 2 and exactly one line on stderr,
``flexigpt <command>: error: ...`` naming the argument, no traceback. Each case fails before a
model is loaded (in-process through cli.main, a few through the real entry point in a
subprocess). Then the internal-error path: exit 1, one line naming a log file that holds the
traceback, or the traceback itself with --debug."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from flexigpt_kernels import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fs(tmp_path_factory):
    """Files and folders the cases point at."""
    d = tmp_path_factory.mktemp("cli_errors")
    (d / "a_file").write_text("not a folder")
    (d / "empty_dir").mkdir()
    (d / "full_dir").mkdir()
    (d / "full_dir" / "keep.txt").write_text("user data")
    (d / "empty.txt").write_text("")
    (d / "blank.txt").write_text("  \n\n \t\n")
    (d / "table.csv").write_text("a,b\n1,2\n")
    (d / "no_text").mkdir()
    (d / "no_text" / "x.csv").write_text("a\n")
    (d / "text.txt").write_text("some text\n" * 20)
    (d / "model_dir").mkdir()  # a folder that is a model only by name
    (d / "model_dir" / "weights.bin").write_bytes(b"\0" * 8)
    (d / "bad_config").mkdir()  # damaged files of a model folder and of a checkpoint
    (d / "bad_config" / "config.json").write_text("{")
    (d / "bad_record").mkdir()
    (d / "bad_record" / "config.json").write_text("{}")
    (d / "bad_record" / "flexigpt.json").write_text("[1, 2")
    _truncated_checkpoint(d / "bad_weights")
    return d


def _truncated_checkpoint(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=32,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])


# (argv, words the message must contain); "{d}" is the fixture folder
CASES = [
    # prune
    ("prune --model /nonexistent/model --out {d}/o", ["--model", "does not exist"]),
    ("prune --model {d}/a_file --out {d}/o", ["--model", "is a file"]),
    ("prune --model {d}/empty_dir --out {d}/o", ["--model", "not a model folder"]),
    ("prune --model someorg/some-model --out {d}/o", ["--model", "offline"]),
    ("prune --ratio nan --out {d}/o", ["--ratio", "finite"]),
    ("prune --ratio 1.5 --out {d}/o", ["--ratio", "(0, 1)"]),
    ("prune --gamma-init inf --out {d}/o", ["--gamma-init", "finite"]),
    ("prune --seq-len 0 --out {d}/o", ["--seq-len", ">= 1"]),
    ("prune --num-samples -3 --out {d}/o", ["--num-samples", ">= 1"]),
    ("prune --rank 0 --out {d}/o", ["--rank"]),
    ("prune --rank 1.5 --out {d}/o", ["--rank", "fraction"]),
    ("prune --blocks 1,,2 --out {d}/o", ["--blocks", "empty item"]),
    ("prune --blocks 3,3 --out {d}/o", ["--blocks", "repeated"]),
    ("prune --bases function --out {d}/o", ["--bases", "invalid choice"]),
    ("prune --out {d}/a_file", ["--out", "is a file"]),
    ("prune --out {d}/full_dir", ["--out", "not empty"]),
    ("prune --calib /nonexistent/calib.txt --out {d}/o", ["--calib", "does not exist"]),
    ("prune --calib {d}/empty.txt --out {d}/o", ["--calib", "no text"]),
    ("prune --calib {d}/blank.txt --out {d}/o", ["--calib", "no text"]),
    ("prune --calib {d}/table.csv --out {d}/o", ["--calib", ".csv"]),
    ("prune --calib {d}/no_text --out {d}/o", ["--calib", "no .json/.jsonl/.parquet/.txt file"]),
    ("prune --calib someorg/some-data --out {d}/o", ["--calib", "offline"]),
    ("prune --eval {d}/empty.txt --out {d}/o", ["--eval", "no text"]),
    ("prune --method prune-harder --out {d}/o", ["--method", "invalid choice"]),
    ("prune --dtype int8 --out {d}/o", ["--dtype", "invalid choice"]),
    ("prune --frobnicate --out {d}/o", ["unrecognized arguments"]),
    ("prune --ratio 0.3", ["--out", "required"]),
    # heal
    ("heal /nonexistent/ckpt --data default --steps 1 --out {d}/o", ["DIR", "does not exist"]),
    ("heal {d}/empty_dir --data default --steps 1 --out {d}/o", ["DIR", "not a model folder"]),
    ("heal default --data default --steps 1 --out {d}/o --trainable ''", ["--trainable", "empty"]),
    (
        "heal default --data default --steps 1 --out {d}/o --trainable adapters,everything",
        ["--trainable", "everything"],
    ),
    ("heal default --data default --steps 1 --out {d}/o --lr nan", ["--lr", "finite"]),
    ("heal default --data default --steps 1 --out {d}/o --lr -1", ["--lr", "> 0"]),
    ("heal default --data default --steps 0 --out {d}/o", ["--steps", ">= 1"]),
    ("heal default --data default --steps 1 --tokens 5 --out {d}/o", ["--tokens", "not allowed with"]),
    ("heal default --steps 1 --out {d}/o", ["--data", "required"]),
    ("heal default --data default --steps 1 --out {d}/a_file", ["--out", "is a file"]),
    ("heal default --data {d}/empty.txt --steps 1 --out {d}/o", ["--data", "no text"]),
    (
        "heal default --data default --steps 1 --out {d}/o --eval-data /nonexistent.txt",
        ["--eval-data", "does not exist"],
    ),
    ("heal default --data default --steps 1 --out {d}/o --resume", ["--resume", "--checkpoint-dir"]),
    ("heal default --data default --steps 1 --out {d}/o --distill kl,xyz", ["--distill", "xyz"]),
    ("heal default --data default --steps 1 --out {d}/o --teacher /nonexistent", ["--teacher", "does not exist"]),
    ("heal default --data default --steps 1 --out {d}/o --max-grad-norm inf", ["--max-grad-norm", "finite"]),
    ("heal default --data default --steps 1 --out {d}/o --checkpoint-dir {d}/a_file", ["--checkpoint-dir", "file"]),
    # eval
    ("eval /nonexistent/ckpt", ["DIR", "does not exist"]),
    ("eval {d}/model_dir", ["DIR", "not a model folder"]),
    ("eval someorg/some-model", ["DIR", "offline"]),
    ("eval default --data /nonexistent/held.txt", ["--data", "does not exist"]),
    ("eval default --data {d}/blank.txt", ["--data", "no text"]),
    ("eval default --num-chunks -1", ["--num-chunks", ">= 0"]),
    ("eval default --tasks {d}/missing.yaml", ["--tasks", "does not exist"]),
    ("eval default --include-path /nonexistent", ["--include-path", "does not exist"]),
    ("eval default --limit 0", ["--limit", "> 0"]),
    ("eval default --baseline /nonexistent", ["--baseline", "does not exist"]),
    ("eval {d}/bad_config", ["DIR"]),
    ("eval {d}/bad_weights --data none", ["DIR"]),
    # generate
    ("generate {d}/bad_record --prompt hi", ["DIR"]),
    ("generate /nonexistent/ckpt --prompt hi", ["DIR", "does not exist"]),
    ("generate {d}/empty_dir --prompt hi", ["DIR", "not a model folder"]),
    ("generate {d}/empty_dir --prompt hi --max-new-tokens 0", ["--max-new-tokens", ">= 1"]),
    ("generate {d}/empty_dir --prompt hi --top-p 1.5", ["--top-p", "(0, 1]"]),
    ("generate {d}/empty_dir --prompt hi --temperature 0", ["--temperature", "> 0"]),
    ("generate {d}/empty_dir --prompt ''", ["--prompt", "non-empty"]),
    ("generate {d}/empty_dir --prompt hi --device tpu:7", ["--device"]),
    # extend
    ("extend default --layers 5:3 --out {d}/o", ["--layers", "a < b"]),
    ("extend default --layers ten --out {d}/o", ["--layers", "a:b"]),
    ("extend default --layers 1:3 --repeats 0 --out {d}/o", ["--repeats", ">= 1"]),
    ("extend default --layers 1:3 --scale nan --out {d}/o", ["--scale", "finite"]),
    ("extend default --layers 1:3 --out {d}/a_file", ["--out", "is a file"]),
    ("extend /nonexistent/model --layers 1:3 --out {d}/o", ["DIR_OR_DEFAULT", "does not exist"]),
    ("extend default --layers 1:3 --out {d}/o --data {d}/empty.txt", ["--data", "no text"]),
    # compare
    ("compare --tokens 0", ["--tokens", ">= 1"]),
    ("compare --lr nan", ["--lr", "finite"]),
    ("compare --methods flexigpt,bogus", ["--methods", "bogus"]),
    ("compare --ratio 1", ["--ratio", "(0, 1)"]),
    ("compare --name a/b", ["--name", "without a folder"]),
    ("compare --seed 1,1", ["--seed", "repeated"]),
    ("compare --bases function", ["--bases", "invalid choice"]),
    ("compare --rank-allocation spectrum --no-local-fit", ["--rank-allocation", "--no-local-fit"]),
    ("compare --out-dir {d}/a_file", ["--out-dir", "is a file"]),
    # bench
    ("bench", ["required"]),
    ("bench kernels --shape 1x2", ["--shape", "MxKxNxR"]),
    ("bench kernels --budget -1", ["--budget", "> 0"]),
    ("bench kernels --modes fwd,sideways", ["--modes", "sideways"]),
    ("bench model /nonexistent/model", ["MODEL", "does not exist"]),
    ("bench model {d}/empty_dir", ["MODEL", "not a model folder"]),
    ("bench model --random huge", ["--random", "invalid choice"]),
    ("bench model --variants dense,bogus", ["--variants", "bogus"]),
    ("bench model --ratio 0", ["--ratio", "(0, 1)"]),
    ("bench plot /nonexistent/kernels.csv", ["csv", "does not exist"]),
    # demo
    ("demo --ratio 2", ["--ratio", "(0, 1)"]),
    ("demo --out {d}/a_file", ["--out", "is a file"]),
    ("demo --model /nonexistent/model", ["--model", "does not exist"]),
    ("demo --calib {d}/empty.txt", ["--calib", "no text"]),
    # the dispatcher
    ("frobnicate", ["invalid choice"]),
]


def _argv(case: str, d: Path) -> list[str]:
    import shlex

    return shlex.split(case.format(d=d))


@pytest.fixture
def offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _check_one_line(err: str, command, words) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    prefix = rf"flexigpt {command}( (kernels|model|plot))?: error: " if command else "flexigpt: error: "
    assert re.match(prefix, lines[0]), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.mark.parametrize("case,words", CASES, ids=[c for c, _ in CASES])
def test_bad_input_is_one_line_and_exit_2(case, words, fs, offline, capsys, monkeypatch):
    monkeypatch.chdir(fs)
    argv = _argv(case, fs)
    try:
        status = cli.main(argv)
    except SystemExit as exc:  # argparse errors exit from inside parse_args
        status = exc.code
    captured = capsys.readouterr()
    assert status == 2, captured.err
    _check_one_line(captured.err, argv[0] if argv[0] in cli.COMMANDS else None, words)
    assert not (fs / "o").exists()  # nothing was written


def test_the_table_covers_every_command():
    covered = {c.split()[0] for c, _ in CASES}
    assert set(cli.COMMANDS) <= covered
    assert len(CASES) >= 40


# ----------------------------------------------------------------------------- the real entry point


def _subprocess(*argv, env=None):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "flexigpt_kernels.cli", *argv],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
        cwd=ROOT,
    )


def test_entry_point_missing_model_path(tmp_path):
    res = _subprocess("prune", "--model", "/nonexistent", "--out", str(tmp_path / "o"))
    assert res.returncode == 2
    line = _check_one_line(res.stderr, "prune", ["--model", "/nonexistent", "does not exist"])
    assert "repo" not in line.lower() and "hub" not in line.lower()


def test_entry_point_bad_value(tmp_path):
    res = _subprocess(
        "heal", "default", "--data", "default", "--steps", "1", "--out", str(tmp_path / "o"), "--trainable", ""
    )
    assert res.returncode == 2
    _check_one_line(res.stderr, "heal", ["--trainable"])


# ----------------------------------------------------------------------------- internal errors


@pytest.fixture
def failing_command(monkeypatch):
    """A registered command whose run() raises what the test puts in `raise_`."""
    mod = types.ModuleType("flexigpt_failing_cmd")
    raise_ = {}

    def run(args):
        raise raise_["exc"]

    mod.run = run
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    cli.register_command("failing", mod.__name__, "always fails")
    return raise_


def test_internal_error_writes_a_log_and_exits_1(failing_command, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLEXIGPT_LOG_DIR", str(tmp_path))
    failing_command["exc"] = RuntimeError("the kernel fell over\nsecond line")
    assert cli.main(["failing"]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("flexigpt failing: internal error: RuntimeError: the kernel fell over second line")
    logs = list(tmp_path.glob("flexigpt-failing-*.log"))
    assert len(logs) == 1 and str(logs[0]) in err
    text = logs[0].read_text()
    assert "Traceback" in text and "RuntimeError: the kernel fell over" in text and "def run" not in text
    assert 'raise raise_["exc"]' in text


def test_debug_prints_the_traceback_instead(failing_command, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLEXIGPT_LOG_DIR", str(tmp_path))
    failing_command["exc"] = RuntimeError("boom")
    for argv in (["--debug", "failing"], ["failing", "--debug"]):
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert (
            "Traceback" in err
            and err.rstrip().splitlines()[-1] == "flexigpt failing: internal error: RuntimeError: boom"
        )
    assert not list(tmp_path.glob("*.log"))
    # a user error under --debug: the traceback, then the same one line, still exit 2
    failing_command["exc"] = cli.UsageError("--thing: wrong")
    assert cli.main(["failing", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1] == "flexigpt failing: error: --thing: wrong"


def test_entry_point_internal_error(tmp_path):
    code = (
        "import sys, types; from flexigpt_kernels import cli\n"
        "m = types.ModuleType('boom'); sys.modules['boom'] = m\n"
        "def run(args):\n    a, b = [1, 2, 3]\n"
        "m.run = run; cli.register_command('boom', 'boom', 'fails')\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLEXIGPT_LOG_DIR": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", code, "boom"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 1
    assert len(res.stderr.splitlines()) == 1 and "ValueError: too many values to unpack" in res.stderr
    log = next(tmp_path.glob("flexigpt-boom-*.log"))
    text = log.read_text()
    assert str(log) in res.stderr and "Traceback" in text and "line 4, in run" in text


def test_which_errors_count_as_user_errors():
    """The boundary of cli.is_user_error (see the cli module doc)."""
    import json

    import torch

    from flexigpt_kernels import shared_lora_linear
    from flexigpt_kernels.io import resolve_data

    def caught(fn):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            return exc
        raise AssertionError("no exception")

    assert cli.is_user_error(caught(lambda: resolve_data("")))  # a `raise` of the library: rejected input
    assert cli.is_user_error(caught(lambda: resolve_data("/nonexistent/x.txt")))
    assert cli.is_user_error(cli.UsageError("--x: bad"))
    assert not cli.is_user_error(caught(lambda: json.loads("{")))  # third-party / stdlib code
    x = torch.randn(2, 8)
    bad = caught(lambda: shared_lora_linear(x, torch.randn(4, 9), torch.randn(2, 8), torch.randn(4, 2)))
    assert isinstance(bad, ValueError) and not cli.is_user_error(bad)  # tensor-level checks: a bug upstream
    assert not cli.is_user_error(caught(lambda: [1].index(2)))  # not raised by a `raise` of ours
    assert not cli.is_user_error(RuntimeError("x"))
