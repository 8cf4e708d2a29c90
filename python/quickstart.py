"""Quickstart: the fused op, the module, and prune -> save -> load -> generate on a model.

python python/quickstart.py            # a tiny random Llama (seconds)
python python/quickstart.py --default  # the embedded SmolLM2-135M and its texts (~1 min)
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import flexigpt_kernels as fk


def op_and_module() -> None:
    x, w = torch.randn(4, 576), torch.randn(1536, 576) / 24
    a, b = torch.randn(32, 576) / 24, torch.randn(1536, 32) / 6
    y = fk.shared_lora_linear(x, w, a, b, 1.0, norm_weight=torch.ones(1536))
    ref = fk.shared_lora_linear_reference(x, w, a, b, 1.0, norm_weight=torch.ones(1536))
    print(f"op: y {tuple(y.shape)}, max |y - reference| = {(y - ref).abs().max().item():.2e}")
    base, target = torch.nn.Linear(576, 1536), torch.nn.Linear(576, 1536)
    layer = fk.SharedLoRALinear.from_difference(target, base, rank=32, output_norm=fk.OutputNorm(1536))
    print(f"module: {layer.extra_repr()}; shares the base weight: {layer.weight is base.weight}")


def model_and_data(default: bool):
    if default:
        from flexigpt_kernels.assets import default_texts, load_default_model

        model, tok = load_default_model()
        return model, tok, default_texts("calibration"), default_texts("heldout")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    tokens = torch.randint(0, 256, (16, 64))
    return LlamaForCausalLM(cfg).eval(), None, tokens[:8], tokens[8:]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--default", action="store_true", help="use the embedded SmolLM2-135M and texts")
    args = p.parse_args(argv)
    op_and_module()
    model, tok, calib, held = model_and_data(args.default)
    before = fk.perplexity(model, tok, held, seq_len=64 if tok is None else 256, num_chunks=8, progress=False)
    model, report = fk.prune(model, calib, tokenizer=tok, ratio=0.3, local_fit="gamma", progress=False)
    after = fk.perplexity(model, tok, held, seq_len=64 if tok is None else 256, num_chunks=8, progress=False)
    print(
        f"pruned blocks {report.pruned} -> bases {report.base_map}; "
        f"stored parameters {report.params_before:,} -> {report.params_after:,}; "
        f"perplexity {before:.2f} -> {after:.2f}"
    )
    with tempfile.TemporaryDirectory() as out:
        fk.save_pretrained(model, out, tokenizer=tok)
        reloaded = fk.from_pretrained(out)
    prompt = torch.tensor([[1, 2, 3, 4]])
    ids, stats = fk.generate(reloaded, prompt, max_new_tokens=8, draft_tokens=4, return_stats=True)
    print(f"reloaded and generated {ids.shape[1] - prompt.shape[1]} tokens self-speculatively: {stats.summary()}")


if __name__ == "__main__":
    main()
