"""Batch inference with Hugging Face generate() on a converted (pruned or extended) model.

    python python/serve_batch.py DIR --prompt "The river" --prompt "In 1990, the city"
    python python/serve_batch.py                 # a tiny random pruned model, random prompts

A converted model is a stock transformers model whose replacement blocks hold
SharedLoRALinear modules, so generate() (KV cache, batching, left padding, sampling) works
unchanged. Left-pad the prompts and pass the attention mask; every row of a batch equals
generating that prompt alone (checked below in the tiny mode).

What a serving engine needs to run such a model natively (instead of `export_dense`, which
re-materialises every shared weight): flexigpt.json's sharing map (replacement linear -> the
base linear whose weight it reads), each replacement linear's adapter (lora_a [r, in],
lora_b [out, r], scale, own bias) and the output norms (gamma [hidden], eps) applied to the
attention and MLP outputs before the residual adds; the op `flexigpt_kernels.shared_lora_linear`
computes one replacement linear with its norm and residual in one call.
"""

from __future__ import annotations

import argparse

import torch

import flexigpt_kernels as fk


def tiny_pruned_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg).eval()
    fk.prune(model, None, blocks=[2, 3], rank=8, progress=False)
    return model


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, max_len] ids and attention mask with the prompts aligned to the right."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], pad_id: int, max_new_tokens: int) -> list[list[int]]:
    ids, mask = left_pad(prompts, pad_id)
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id
    )
    return [row[ids.shape[1] :].tolist() for row in out]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory", nargs="?", help="a checkpoint written by flexigpt_kernels.save_pretrained")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    args = p.parse_args(argv)
    if args.directory is None:
        model = tiny_pruned_model()
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(1, 256, (n,), generator=g).tolist() for n in (3, 7, 5)]
        batch = generate_batch(model, prompts, 0, args.max_new_tokens)
        alone = [generate_batch(model, [pr], 0, args.max_new_tokens)[0] for pr in prompts]
        print(f"batch of {len(prompts)} (left-padded) equals one by one: {batch == alone}")
        return
    model = fk.from_pretrained(args.directory)
    tok = fk.load_tokenizer(args.directory)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in (args.prompt or ["The history of"])]
    for text, new in zip(args.prompt or ["The history of"], generate_batch(model, prompts, pad, args.max_new_tokens)):
        print(f"{text!r} -> {tok.decode(new, skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
