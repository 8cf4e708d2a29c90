"""Tiny random Llama models for the training tests (hidden 64, 4 layers, vocab 128), and the
two-process launcher of the distributed tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

VOCAB, SEQ = 128, 32


def tiny_llama(seed: int = 0, layers: int = 4, vocab: int = VOCAB):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        eos_token_id=vocab - 1,
        bos_token_id=vocab - 1,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).float().eval()
    return model


def tiny_pruned(method: str = "flexigpt", seed: int = 0, blocks=(1, 2), rank: int = 4, vocab: int = VOCAB):
    from flexigpt_kernels.convert.prune import prune

    model = tiny_llama(seed, vocab=vocab)
    model, _ = prune(model, None, blocks=list(blocks), rank=rank, method=method, progress=False)
    return model


def interleaved_groups_model():
    """6 tiny Llama blocks pruned at blocks 1 and 3 (seed 0): the base map gives two sharing
    groups whose members are far apart and interleave, {0, 3} and {1, 5}."""
    from flexigpt_kernels.convert.prune import prune

    model, _ = prune(tiny_llama(0, layers=6), None, blocks=[1, 3], rank=2, progress=False)
    return model


def frozen_prefix_model():
    """6 tiny Llama blocks pruned at block 4 (seed 2): one sharing group {4, 5}, and blocks 0-3
    (units of their own) run before the first trainable parameter."""
    from flexigpt_kernels.convert.prune import prune

    model, _ = prune(tiny_llama(2, layers=6), None, blocks=[4], rank=2, progress=False)
    return model


def token_data(n: int = 64, seed: int = 1) -> torch.Tensor:
    """Learnable token streams: a few repeated random patterns, so a few steps lower the loss."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randint(0, VOCAB, (4, 8), generator=g)
    idx = torch.randint(0, 4, (n, SEQ // 8), generator=g)
    return patterns[idx].reshape(n, SEQ)


def byte_tokenizer():
    """Byte-level tokenizer without merges: 256 byte tokens + EOS (id 256); pairs with vocab=257."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", bos_token="<eos>")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cmd: list[str], timeout: int, env: dict | None, check: bool) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **(env or {}),
    }
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node 2 ARGS` from the repository root (one
    thread per process, this checkout first on the path); asserts it succeeded."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]  # fmt: skip
    return _launch(cmd, timeout, None, check=True)


def accelerate_launch(
    config: str, *args: str, env: dict | None = None, check: bool = True, timeout: int = 600
) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file CONFIG --num_processes 2 --mixed_precision no ARGS` from
    the repository root, in the same environment as torchrun() plus `env`; with check, asserts
    it succeeded."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
           *args]  # fmt: skip
    return _launch(cmd, timeout, env, check)


def assert_same_params(saved: dict, model, rtol=1e-4, atol=1e-5):
    trained = dict(model.named_parameters())
    assert set(saved) == {n for n, p in trained.items() if p.requires_grad}
    for name, value in saved.items():
        torch.testing.assert_close(value, trained[name].detach(), rtol=rtol, atol=atol, msg=name)


def assert_matches_one_process(got: dict, one, model):
    """A 2-process run's record (losses, eval, world size, tokens, trained params) equals the
    one-process run `one` that trained `model`."""
    assert got["world_size"] == 2 and got["tokens"] == one.tokens_seen
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(one.losses), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        torch.tensor([p for _, p in got["eval"]]),
        torch.tensor([p for _, p in one.eval_perplexities]),
        rtol=1e-5,
        atol=1e-5,
    )
    assert_same_params(got["params"], model)
