"""`flexigpt demo` (`make demo`): the main job on the embedded default model and text.

1. the fused op at SmolLM2's widths against its reference (one line);
2. `flexigpt prune` on SmolLM2-135M with the gensim texts: BI, base map, parameters,
   held-out perplexity of dense / drop / FlexiGPT at initialisation, time per phase;
3. the saved checkpoint reloaded (identical logits, checked by the job) and a greedy
   continuation from the reloaded model.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from . import _pruning as prune_command


def add_arguments(p: argparse.ArgumentParser) -> None:
    prune_command.add_arguments(p, require_out=False)
    p.set_defaults(eval_chunks=40)


def _op_check() -> str:
    import torch

    from ..ops import shared_lora_linear, shared_lora_linear_reference, use_backend

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 128, 576, generator=g)
    w, a = torch.randn(576, 576, generator=g) / 24, torch.randn(32, 576, generator=g) / 24
    b, gamma, res = (
        torch.randn(576, 32, generator=g) / 6,
        torch.rand(576, generator=g),
        torch.randn(4, 128, 576, generator=g),
    )
    expected = shared_lora_linear_reference(
        x.double(), w.double(), a.double(), b.double(), 1.0, norm_weight=gamma.double(), residual=res.double()
    )
    with use_backend("auto"):
        t = time.perf_counter()
        out = shared_lora_linear(x, w, a, b, 1.0, norm_weight=gamma, residual=res)
        ms = (time.perf_counter() - t) * 1e3
    err = (out.double() - expected).abs().max().item()
    return (
        f"op check: shared_lora_linear x[4,128,576] W[576,576] r=32 +norm +residual on "
        f"{x.device.type}: max |out - reference(fp64)| = {err:.2e} ({ms:.1f} ms)"
    )


def run(args: argparse.Namespace) -> int:
    print(_op_check(), flush=True)
    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="flexigpt-demo-")
        args.out = tmp.name
        args.overwrite = True  # our own fresh temporary directory
    try:
        status = prune_command.run(args)
        if status == 0 and args.method == "flexigpt":
            print(_reload_check(args.out), flush=True)
        return status
    finally:
        if tmp is not None:
            tmp.cleanup()


def _reload_check(directory: str) -> str:
    import torch

    from ..io import from_pretrained, load_tokenizer

    model = from_pretrained(directory)
    tok = load_tokenizer(directory)
    ids = tok("The history of the city", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
        gen = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(gen[0][ids.shape[1] :], skip_special_tokens=True)
    return (
        f"reloaded model, logits finite: {bool(torch.isfinite(logits).all())}; "
        f"greedy continuation of 'The history of the city': {text!r}"
    )
