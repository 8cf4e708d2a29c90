"""The main job: prune a model, measure it against the dense model and the drop baseline,
save it. Used by `flexigpt prune` and `flexigpt demo`; returns a JSON-ready summary."""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from .convert.prune import prune, stored_parameters
from .eval import perplexity


def check_out_dir(out: str, overwrite: bool) -> None:
    """Refuse what save_pretrained would refuse (see io._write.check_output_directory), before the work."""
    from .io._write import check_output_directory

    check_output_directory(out, overwrite=overwrite)


def run_prune_job(
    model,
    tokenizer,
    calibration,
    heldout,
    *,
    ratio: float = 0.3,
    blocks=None,
    rank=None,
    method: str = "flexigpt",
    out: str | None = None,
    overwrite: bool = False,
    baseline: bool = True,
    seq_len: int = 256,
    num_samples: int = 32,
    eval_chunks: int = 40,
    gamma_init: float | None = None,
    local_fit=None,
    bases: str = "weights",
    select: str = "influence",
    verify_save: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Prune `model` in place and return {report, perplexity, parameters, seconds, out}.

    heldout: texts (or a token tensor) for perplexity; None skips every evaluation.
    baseline: also evaluate the drop baseline of the same blocks on a deep copy of the dense
        model (needs one extra model copy in memory; pass False to skip).
    """
    seconds: dict[str, float] = {}
    ppl: dict[str, float] = {}
    reload_identical = None
    ev = dict(seq_len=seq_len, num_chunks=eval_chunks, progress=progress)
    if heldout is not None:
        t = time.perf_counter()
        ppl["dense"] = perplexity(model, tokenizer, heldout, desc="perplexity (dense)", **ev)
        seconds["eval_dense"] = time.perf_counter() - t
    dense_copy = copy.deepcopy(model) if (baseline and heldout is not None and method == "flexigpt") else None
    kwargs = {} if gamma_init is None else {"gamma_init": gamma_init}
    if method == "flexigpt" and local_fit is not None:
        kwargs["local_fit"] = local_fit
    if method == "flexigpt":
        kwargs["bases"] = bases
        kwargs["select"] = select
    _, report = prune(
        model,
        calibration,
        tokenizer=tokenizer,
        ratio=ratio,
        blocks=blocks,
        rank=rank,
        method=method,
        seq_len=seq_len,
        num_samples=num_samples,
        progress=progress,
        **kwargs,
    )
    seconds.update(report.seconds)
    if heldout is not None:
        t = time.perf_counter()
        ppl[method] = perplexity(model, tokenizer, heldout, desc=f"perplexity ({method})", **ev)
        seconds[f"eval_{method}"] = time.perf_counter() - t
    if dense_copy is not None:
        prune(dense_copy, None, blocks=report.pruned, method="drop", progress=False)
        t = time.perf_counter()
        ppl["drop"] = perplexity(dense_copy, tokenizer, heldout, desc="perplexity (drop)", **ev)
        seconds["eval_drop"] = time.perf_counter() - t
        params_drop = stored_parameters(dense_copy)
        del dense_copy
    else:
        params_drop = None
    if out is not None:
        from .io import save_pretrained
        from .io.model_card import set_card_info

        set_card_info(
            model,
            perplexity=ppl or None,
            source_parameters=report.params_before,  # for the model card
            perplexity_setup=f"{eval_chunks} held-out windows of {seq_len} tokens, no BOS" if ppl else None,
        )
        t = time.perf_counter()
        save_pretrained(model, out, tokenizer=tokenizer, overwrite=overwrite)
        seconds["save"] = time.perf_counter() - t
        if verify_save and method == "flexigpt":
            t = time.perf_counter()
            reload_identical = _reloads_identically(model, out)
            seconds["verify_save"] = time.perf_counter() - t
    return {
        "report": report.to_dict(),
        "perplexity": ppl,
        "parameters": {
            "dense": report.params_before,
            method: report.params_after,
            **({"drop": params_drop} if params_drop is not None else {}),
            "adapters_and_norms": report.adapter_params,
        },
        "seconds": seconds,
        "out": out,
        "reload_identical_logits": reload_identical,
        "torch_threads": torch.get_num_threads(),
    }


@torch.no_grad()
def _reloads_identically(model, out: str) -> bool:
    """Load the saved checkpoint back and compare logits with the in-memory model."""
    from .io import from_pretrained

    ids = torch.arange(1, 33).unsqueeze(0) % model.config.vocab_size
    device = next(model.parameters()).device
    reloaded = from_pretrained(out).to(device)
    return bool(torch.equal(model(ids.to(device)).logits, reloaded(ids.to(device)).logits))


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable table printed by the CLI."""
    rep = summary["report"]
    lines = []
    scores = rep["scores"]
    lines.append(
        f"method: {rep['method']}  blocks: {rep['num_blocks']}  pruned: {len(rep['pruned'])}"
        + (f"  rank: {rep['rank']}" if rep.get("rank") else "")
    )
    lines.append("")
    lines.append(f"{'block':>5}  {'BI':>7}  {'base':>4}  {'distance':>9}")
    for b in rep["pruned"]:
        bi = f"{scores[b]:.4f}" if scores else "-"
        base = rep["base_map"].get(str(b), "-")
        dist = rep["base_distance"].get(str(b))
        lines.append(f"{b:>5}  {bi:>7}  {base!s:>4}  {dist if dist is None else format(dist, '.3f')!s:>9}")
    if rep.get("ties"):
        lines.append(f"ties (pruned, chosen, runner-up): {rep['ties']}")
    lines.append("")
    p = summary["parameters"]
    lines.append("parameters stored (shared tensors once):")
    for k, v in p.items():
        lines.append(
            f"  {k:<20} {v:>14,}" + (f"  ({v / p['dense']:.1%} of dense)" if k != "dense" and p.get("dense") else "")
        )
    if summary["perplexity"]:
        lines.append("")
        lines.append("held-out perplexity:")
        for k, v in summary["perplexity"].items():
            lines.append(f"  {k:<20} {v:>10.2f}")
    lines.append("")
    lines.append("wall time per phase (s):")
    for k, v in summary["seconds"].items():
        lines.append(f"  {k:<20} {v:>8.1f}")
    if summary.get("out"):
        lines.append("")
        lines.append(f"saved to {summary['out']}")
        if summary.get("reload_identical_logits") is not None:
            lines.append(f"reloaded: identical logits = {summary['reload_identical_logits']}")
    return "\n".join(lines)
