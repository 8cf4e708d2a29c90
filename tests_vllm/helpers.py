"""Helpers of the vLLM integration tests: tiny FlexiGPT models, greedy decoding on both sides."""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch

MAX_MODEL_LEN = 256
NEW_TOKENS = 32
# the tiny model's architecture: the CPU attention backend needs head_dim >= 32
TINY = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=MAX_MODEL_LEN,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    initializer_range=0.2,
)
TINY_BLOCKS = [2, 3]
# SmolLM2-135M at ratio 0.3: the 9 blocks of lowest Block Influence (README, "The main job"),
# given explicitly so that the fixture needs no calibration pass
SMOL_BLOCKS = [3, 12, 13, 14, 15, 16, 17, 25, 26]


def tiny_model(model_type: str = "llama", **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**TINY, "tie_word_embeddings": True, **overrides})
    return AutoModelForCausalLM.from_config(config).eval()


@torch.no_grad()
def perturb_adapters(model, seed: int = 5, std: float = 0.05):
    """Randomise adapters and own biases, and set gammas near 1 (not the 1e-2 of a fresh
    conversion), so that every tensor of a replacement block changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if ".output_norm." in name:
            p.copy_(1 + 4 * std * torch.randn(p.shape, generator=gen))
        elif name.endswith(("lora_a", "lora_b")) or (".bias" in name and "layers." in name):
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model


def pruned_tiny(model_type: str = "llama", output_norm: bool = True, **overrides):
    from flexigpt_kernels.convert.prune import prune

    model, _ = prune(
        tiny_model(model_type, **overrides), None, blocks=TINY_BLOCKS, rank=8, output_norm=output_norm, progress=False
    )
    return perturb_adapters(model)


@contextlib.contextmanager
def running_llm(path, **kwargs):
    """vllm.LLM on `path` (fp32, eager, 256 tokens), its engine process shut down on exit."""
    from vllm import LLM

    kw = dict(dtype="float32", max_model_len=MAX_MODEL_LEN, enforce_eager=True, seed=0)
    kw.update(kwargs)
    llm = LLM(model=str(path), **kw)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()


@torch.no_grad()
def hf_greedy(model, prompts: list[list[int]], new_tokens: int):
    """(tokens, per-step logits) of Hugging Face greedy generate(), one prompt at a time,
    never stopping at EOS (vLLM is asked for ignore_eos)."""
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = None
    tokens, logits = [], []
    for prompt in prompts:
        out = model.generate(
            torch.tensor([prompt]),
            generation_config=config,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        tokens.append(out.sequences[0, len(prompt) :].tolist())
        logits.append(torch.cat(out.logits).float())
    return tokens, logits


def vllm_greedy(llm, prompts: list[list[int]], new_tokens: int, logprobs: int = 0):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, logprobs=logprobs or None)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], [o.outputs[0].logprobs for o in outs]


def assert_logprobs_match(tokens, logprobs, hf_logits, tol: float = 1e-4) -> None:
    """vLLM's log-probabilities of its chosen tokens equal log_softmax of Hugging Face's logits."""
    for toks, lps, logits in zip(tokens, logprobs, hf_logits):
        ours = torch.tensor([lp[t].logprob for t, lp in zip(toks, lps)])
        ref = torch.log_softmax(logits, -1)[torch.arange(len(toks)), torch.tensor(toks)]
        torch.testing.assert_close(ours, ref, atol=tol, rtol=tol)


def assert_same_greedy(hf_tokens, hf_logits, vllm_tokens, *, tie: float = 1e-3) -> list[tuple[int, int, float]]:
    """Equal tokens; where they first differ the two candidates must be a near tie in the
    Hugging Face logits (|difference| < tie), which then ends the comparison of that row.
    Returns the (row, step, gap) of such ties and warns about them."""
    ties = []
    for row, (a, b, lg) in enumerate(zip(hf_tokens, vllm_tokens, hf_logits)):
        assert len(a) == len(b), (row, a, b)
        for step, (x, y) in enumerate(zip(a, b)):
            if x != y:
                gap = float((lg[step, x] - lg[step, y]).abs())
                assert gap < tie, f"row {row} step {step}: HF {x}, vLLM {y}, logit gap {gap:.3g}"
                ties.append((row, step, gap))
                break
    if ties:
        warnings.warn(f"greedy tokens differ only at near ties (row, step, logit gap): {ties}", stacklevel=2)
    return ties


def checkpoint_bytes(directory) -> int:
    """Bytes of the tensors a checkpoint directory's model.safetensors stores."""
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return sum(f.get_tensor(k).nbytes for k in f.keys())
