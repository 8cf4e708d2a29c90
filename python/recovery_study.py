"""Recovery study (docs/method.md 5): how much of a pruned block can be won back at initialisation, and
what that buys after a short healing, on the embedded default (SmolLM2-135M, ratio 0.3).

One dense pass records the blocks to be pruned; the same pruned blocks and bases serve every
variant. Variants at initialisation (each a copy of the same converted model):

  drop            ShortGPT: the blocks removed
  flex_g0.01      FlexiGPT as in the paper: SVD-initialised adapters, gamma = 1e-2
  flex_lsq        + closed-form per-channel gamma (convert/gamma_init.py)
  flex_act_lsq    + activation-aware adapters (closed form) and closed-form gamma
  flex_svd_fit    SVD adapters + closed-form gamma + block-local gradient fit (--fit-steps)
  flex_act_fit    activation-aware adapters + closed-form gamma + block-local gradient fit

Then, with --heal-steps > 0, healing of the chosen variants (--heal) against ShortGPT + LoRA on
the kept blocks at the closest parameter count, same steps, tokens and learning rate(s).

Held-out perplexity: the embedded news text, --eval-chunks x 256 tokens (no training step or
fit saw it). Tokens: the block-local fit sees the calibration tokens (--calib-samples x 256),
which count toward the row's tokens. Results: a Markdown table (and JSON) under --out.

    python python/recovery_study.py --eval-chunks 16 --fit-steps 60 --heal-steps 20
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

from flexigpt_kernels.assets import default_texts, load_default_model
from flexigpt_kernels.convert.adapter_init import activation_aware_adapters
from flexigpt_kernels.convert.calibration import token_batches
from flexigpt_kernels.convert.dense_records import record_dense_blocks
from flexigpt_kernels.convert.importance import block_influence
from flexigpt_kernels.convert.local_fit import LocalFit, fit_replacement_blocks
from flexigpt_kernels.convert.prune import prune
from flexigpt_kernels.convert.selection import select_blocks
from flexigpt_kernels.eval.perplexity import perplexity
from flexigpt_kernels.train.compare import matching_lora_rank
from flexigpt_kernels.train.data import load_blocks
from flexigpt_kernels.train.heal import heal
from flexigpt_kernels.train.params import count_parameters, select_trainable

INIT_VARIANTS = {
    "flex_g0.01": None,
    "flex_lsq": dict(adapter_init="svd", gamma="lsq", steps=0),
    "flex_act_lsq": dict(adapter_init="activation", gamma="lsq", steps=0),
    "flex_svd_fit": dict(adapter_init="svd", gamma="lsq"),
    "flex_act_fit": dict(adapter_init="activation", gamma="lsq"),
}
OPTIONS = {
    "drop": "ShortGPT: blocks removed",
    "flex_g0.01": "paper init: SVD adapters, gamma 1e-2",
    "flex_lsq": "SVD adapters, closed-form gamma",
    "flex_act_lsq": "activation-aware adapters, closed-form gamma",
    "flex_svd_fit": "SVD adapters, closed-form gamma, block-local fit {steps} steps x {bs} seq",
    "flex_act_fit": "activation-aware adapters, closed-form gamma, block-local fit {steps} steps x {bs} seq",
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument(
        "--fit-samples", type=int, default=None, help="record / fit on the first N calibration sequences (default: all)"
    )
    p.add_argument("--eval-chunks", type=int, default=16)
    p.add_argument("--variants", default=",".join(["drop", *INIT_VARIANTS]))
    p.add_argument("--fit-steps", type=int, default=60)
    p.add_argument("--fit-batch", type=int, default=2)
    p.add_argument("--fit-lr", type=float, default=1e-3)
    p.add_argument("--fit-gamma-lr", type=float, default=None)
    p.add_argument("--heal", default="", help="variants to heal (comma-separated; shortgpt_lora is the baseline)")
    p.add_argument("--heal-steps", type=int, default=0)
    p.add_argument("--heal-batch", type=int, default=4)
    p.add_argument("--heal-lr", default="4e-3", help="comma-separated learning rates")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/recovery_study_cpu")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    t_all = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    model, tok = load_default_model()
    model.eval()
    train_texts, heldout_texts = default_texts("calibration"), default_texts("heldout")
    S = args.seq_len
    heldout = load_blocks(heldout_texts, tok, seq_len=S, num_blocks=args.eval_chunks, seed=None, what="heldout")
    calib = token_batches(train_texts, tok, seq_len=S, num_samples=args.calib_samples)

    def ppl(m):
        return perplexity(m, None, heldout, seq_len=S, num_chunks=None, progress=False)

    rows, meta = [], {}

    def save():
        meta["total_seconds"] = time.perf_counter() - t_all
        Path(str(out) + ".json").write_text(json.dumps({"rows": rows, "meta": meta}, indent=1, default=str))
        Path(str(out) + ".md").write_text(table(rows, meta))

    cache = Path(str(out) + ".cache.json")  # dense ppl and Block Influence of an earlier run
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    key = f"{args.eval_chunks}/{args.calib_samples}/{S}"
    t = time.perf_counter()
    dense_ppl = cached.get(key, {}).get("dense_ppl") or ppl(model)
    eval_s = time.perf_counter() - t
    log(f"dense ppl {dense_ppl:.2f} ({eval_s:.0f} s)")
    rows.append(
        dict(
            method="dense",
            options="no pruning",
            trainable=0,
            tokens=0,
            ppl_init=dense_ppl,
            ppl_after=None,
            wall_s=0.0,
            block_err=None,
        )
    )

    t = time.perf_counter()
    scores = cached.get(key, {}).get("scores")
    scores = torch.tensor(scores) if scores else block_influence(model, calib, progress=args.progress)
    cache.write_text(json.dumps({key: {"dense_ppl": dense_ppl, "scores": [float(x) for x in scores]}}))
    pruned = select_blocks(scores, ratio=args.ratio)
    bi_s = time.perf_counter() - t
    t = time.perf_counter()
    wanted = [v for v in args.variants.split(",") if v]
    need_act = any((INIT_VARIANTS.get(v) or {}).get("adapter_init") == "activation" for v in wanted)
    fit_calib = calib if args.fit_samples is None else calib[: args.fit_samples]
    records = record_dense_blocks(model, fit_calib, pruned, covariances=need_act, progress=args.progress)
    rec_s = time.perf_counter() - t
    flex0, rep = prune(copy.deepcopy(model), None, blocks=pruned, rank=args.rank, progress=False)
    t = time.perf_counter()
    factors, fstats = (
        activation_aware_adapters(model, records, rep.base_map, rank=args.rank) if need_act else (None, {})
    )
    act_s = time.perf_counter() - t
    records.cov = {}
    log(f"pruned {pruned} bases {rep.base_map}; BI {bi_s:.0f} s, record {rec_s:.0f} s, act. adapters {act_s:.0f} s")
    meta.update(
        model="SmolLM2-135M-Instruct (embedded, fp32)",
        ratio=args.ratio,
        rank=args.rank,
        pruned=pruned,
        base_map={str(k): v for k, v in rep.base_map.items()},
        calib_tokens=records.tokens,
        eval_chunks=int(heldout.shape[0]),
        seq_len=S,
        threads=args.threads,
        dense_ppl=dense_ppl,
        eval_seconds=eval_s,
        record_seconds=rec_s,
        bi_seconds=bi_s,
        act_adapter_seconds=act_s,
        torch=torch.__version__,
        machine=platform.machine(),
        adapter_weighted_err={
            k: {
                "svd": sum(s["svd"] for s in v.values()) / len(v),
                "activation": sum(s["activation"] for s in v.values()) / len(v),
            }
            for k, v in fstats.items()
        },
        fit_steps=args.fit_steps,
        fit_batch=args.fit_batch,
        fit_lr=args.fit_lr,
    )
    target = count_parameters(select_trainable(copy.deepcopy(flex0), "adapters"))
    models = {}
    for name in wanted:
        t = time.perf_counter()
        err = None
        tokens = 0
        if name == "drop":
            m, _ = prune(copy.deepcopy(model), None, blocks=pruned, method="drop", progress=False)
            trainable = 0
            prep_s = 0.0
        else:
            m = copy.deepcopy(flex0)
            cfg = INIT_VARIANTS[name]
            trainable = target
            if cfg is not None:
                cfg = dict(cfg)
                if "steps" not in cfg:
                    cfg.update(
                        steps=args.fit_steps, batch_size=args.fit_batch, lr=args.fit_lr, gamma_lr=args.fit_gamma_lr
                    )
                fr = fit_replacement_blocks(
                    m, records, LocalFit(**cfg), adapter_factors=factors, adapter_stats=fstats, progress=args.progress
                )
                err = {stage: fr.mean_error(stage, "val") for stage in fr.errors}
                tokens = records.tokens
                meta.setdefault("fit_reports", {})[name] = fr.to_dict()
                log(f"{name}: mean val block rel. err " + ", ".join(f"{k} {v:.3f}" for k, v in err.items()))
            prep_s = time.perf_counter() - t
            if cfg is not None:  # the shared recording (and closed-form adapters) belong to this row
                prep_s += rec_s + (act_s if cfg.get("adapter_init") == "activation" else 0.0)
        p0 = ppl(m)
        log(f"{name}: ppl at init {p0:.2f} (prep {prep_s:.0f} s)")
        rows.append(
            dict(
                method=name,
                options=OPTIONS[name].format(steps=args.fit_steps, bs=args.fit_batch),
                trainable=trainable,
                tokens=tokens,
                ppl_init=p0,
                ppl_after=None,
                wall_s=prep_s,
                block_err=err,
            )
        )
        models[name] = (m, rows[-1])
        if name not in args.heal.split(","):
            del models[name]
        save()

    if args.heal_steps > 0:
        bs = args.heal_batch
        train = load_blocks(train_texts, tok, seq_len=S, num_blocks=args.heal_steps * bs, seed=0, what="train")
        heal_tokens = args.heal_steps * bs * S
        lrs = [float(x) for x in args.heal_lr.split(",") if x]
        for name in [v for v in args.heal.split(",") if v]:
            if name == "shortgpt_lora":
                drop, _ = prune(copy.deepcopy(model), None, blocks=pruned, method="drop", progress=False)
                lora_rank, lora_params = matching_lora_rank(drop, target)
                base, base_row = (
                    drop,
                    dict(
                        method="shortgpt_lora",
                        options=f"drop + LoRA rank {lora_rank} on kept blocks",
                        trainable=lora_params,
                        tokens=0,
                        ppl_init=None,
                        wall_s=0.0,
                        block_err=None,
                    ),
                )
                trainable, lrank = "lora_kept", lora_rank
            else:
                base, base_row = models[name]
                trainable, lrank = "adapters", None
            for lr in lrs:
                m = copy.deepcopy(base)
                hr = heal(
                    m,
                    train,
                    steps=args.heal_steps,
                    lr=lr,
                    seq_len=S,
                    batch_size=bs,
                    trainable=trainable,
                    lora_rank=lrank,
                    seed=0,
                    progress=args.progress,
                )
                p1 = ppl(m)
                p0 = base_row["ppl_init"] if base_row["ppl_init"] is not None else None
                if p0 is None:
                    p0 = ppl(base)
                    base_row["ppl_init"] = p0
                row = dict(
                    base_row,
                    method=f"{base_row['method']} + heal",
                    ppl_init=p0,
                    ppl_after=p1,
                    trainable=hr.trainable_params,
                    tokens=base_row["tokens"] + hr.tokens_seen,
                    wall_s=base_row["wall_s"] + hr.seconds,
                    lr=lr,
                    options=base_row["options"] + f"; heal {args.heal_steps} x {bs} x {S}, lr {lr:g}",
                )
                rows.append(row)
                log(
                    f"{row['method']} lr {lr:g}: {p0:.2f} -> {p1:.2f} ({hr.seconds:.0f} s), "
                    f"loss {hr.losses[0]:.3f} -> {hr.losses[-1]:.3f}"
                )
                del m
                save()
        meta.update(heal_steps=args.heal_steps, heal_batch=bs, heal_tokens=heal_tokens, heal_lrs=lrs)
    save()
    print(table(rows, meta))
    return 0


def table(rows, meta) -> str:
    lines = [
        "# Recovery study (CPU): block-local initialisation of FlexiGPT replacement blocks",
        "",
        f"{meta.get('model')}, ratio {meta.get('ratio')} (pruned {meta.get('pruned')}, bases {meta.get('base_map')}), "
        f"adapter rank {meta.get('rank')}; calibration / fit records {meta.get('calib_tokens')} tokens "
        f"(embedded Wikipedia sample); held-out perplexity on {meta.get('eval_chunks')} x {meta.get('seq_len')} "
        f"tokens of the embedded news text; torch {meta.get('torch')}, {meta.get('threads')} thread(s) on a "
        f"shared, loaded CPU (wall times are indicative only).",
        "",
        "| method | options | trainable params | tokens | block rel. err (val) | ppl at init | ppl after | wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        err = r.get("block_err")
        err_s = "" if not err else " -> ".join(f"{v:.3f}" for v in err.values())
        after = "" if r.get("ppl_after") is None else f"{r['ppl_after']:.2f}"
        init = "" if r.get("ppl_init") is None else f"{r['ppl_init']:.2f}"
        lines.append(
            f"| {r['method']} | {r['options']} | {r['trainable']:,} | {r['tokens']:,} | {err_s} | {init} | "
            f"{after} | {r['wall_s']:.0f} |"
        )
    lines += [
        "",
        "block rel. err: mean over the replacement blocks of sum||block(x) - y||^2 / sum||y - x||^2 on "
        "held-out recorded calibration sequences (1.0 = as bad as dropping the block), per stage "
        "(init -> closed-form gamma -> gradient fit).",
        "",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
