"""The model card (README.md) that :func:`flexigpt_kernels.save_pretrained` writes into a checkpoint.

A Hugging Face Hub model card: a YAML metadata block (``library_name``, ``base_model`` when the
source is a Hub id, ``tags``, ``pipeline_tag``) followed by what the checkpoint is: the source
model, the method (flexigpt / drop / extend), the pruned blocks and base map, the adapter rank,
the stored parameters against the source's, the perplexities measured when it was made, every
healing run, how to load it (this package, stock transformers with trust_remote_code, vLLM)
and the package version.

What the card reports beyond flexigpt.json's metadata comes from ``model.flexigpt_card`` (a
dict, stored in flexigpt.json under ``"card"`` and restored by from_pretrained):

- ``"source_parameters"``: stored parameters of the source model (else computed for
  "flexigpt" checkpoints: each replacement linear stood for a full weight);
- ``"perplexity"``: {model name: held-out perplexity} measured when the model was made, with
  ``"perplexity_setup"`` (a sentence saying on what);
- ``"healing"``: a list of healing runs (:func:`add_healing`, called by ``flexigpt heal``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

__all__ = [
    "CARD_NAME",
    "add_healing",
    "card_info",
    "pruned_source_parameters",
    "render_model_card",
    "set_card_info",
    "write_model_card",
]

CARD_NAME = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# what "default" (the embedded model of flexigpt_kernels.assets) is on the Hub
_DEFAULT_SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct"
_HEALING_KEYS = (
    "steps",
    "tokens_seen",
    "trainable",
    "lora_shared",
    "trainable_params",
    "lr",
    "seconds",
    "data",
    "teacher",
    "eval_perplexities",
)


def _finite(value):
    """`value` with every non-finite float replaced by None (flexigpt.json holds finite numbers only)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def card_info(model) -> dict[str, Any]:
    """``model.flexigpt_card`` (created empty when absent): what the card reports beyond flexigpt.json."""
    info = getattr(model, "flexigpt_card", None)
    if not isinstance(info, dict):
        info = {}
        model.flexigpt_card = info
    return info


def set_card_info(
    model,
    *,
    perplexity: dict[str, float] | None = None,
    perplexity_setup: str | None = None,
    source_parameters: int | None = None,
    source: str | None = None,
) -> None:
    """Record on `model` what its card should report (values left None are not changed)."""
    info = card_info(model)
    for key, value in (
        ("perplexity", perplexity),
        ("perplexity_setup", perplexity_setup),
        ("source_parameters", source_parameters),
        ("source", source),
    ):
        if value is not None:
            info[key] = _finite(value)


def add_healing(model, report: dict[str, Any]) -> None:
    """Append one healing run (a HealReport.to_dict()) to `model`'s card record."""
    losses = report.get("losses") or []
    run = {k: report[k] for k in _HEALING_KEYS if report.get(k) is not None}
    if losses:
        run.update(first_loss=losses[0], last_loss=losses[-1])
    card_info(model).setdefault("healing", []).append(_finite(run))


def _source(record: dict[str, Any], card: dict[str, Any]) -> str | None:
    source = record.get("source") or card.get("source")
    if not source:
        source = (record.get("base_model_config") or {}).get("_name_or_path") or None
    return _DEFAULT_SOURCE if source == "default" else source


def pruned_source_parameters(model) -> int:
    """Stored parameters of the dense model a FlexiGPT-pruned `model` came from: each
    replacement linear stood for a full [out, in] weight where it now stores A [r, in],
    B [out, r], and the output norms (gamma) are new."""
    from ..convert.prune import stored_parameters
    from ..nn import OutputNorm, SharedLoRALinear

    total = stored_parameters(model)
    for m in model.modules():
        if isinstance(m, SharedLoRALinear):
            total += m.out_features * m.in_features - m.rank * (m.out_features + m.in_features)
        elif isinstance(m, OutputNorm):
            total -= m.weight.numel()
    return total


def _fmt_map(base_map: dict) -> str:
    groups: dict[int, list[int]] = {}
    for k, v in sorted(base_map.items(), key=lambda kv: int(kv[0])):
        groups.setdefault(int(v), []).append(int(k))
    return ", ".join(f"{'/'.join(map(str, ks))} -> {b}" for b, ks in sorted(groups.items(), key=lambda g: g[1][0]))


def _metadata(record: dict[str, Any], source: str | None, custom_code: bool) -> str:
    method = record.get("method", "none")
    tags = ["flexigpt", "flexigpt-kernels", {"extend": "extended", "none": "converted"}.get(method, "pruned")]
    if custom_code:
        tags.append("custom_code")
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation"]
    if source and _HUB_ID.match(source) and not Path(source).exists():
        lines.append(f"base_model: {source}")
    lines.append("tags:")
    lines += [f"- {t}" for t in tags]
    lines.append("---")
    return "\n".join(lines)


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _healing_lines(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## Healing (`flexigpt heal`)",
        "",
        "| run | data | teacher | steps | tokens | trainable | trainable params | lr | loss | held-out perplexity |",
        "|---|---|---|---:|---:|---|---:|---:|---|---|",
    ]
    for n, run in enumerate(runs, 1):
        loss = f"{_num(run['first_loss'], '.4f')} -> {_num(run['last_loss'], '.4f')}" if "first_loss" in run else "-"
        ppl = ", ".join(f"step {s}: {_num(p, '.2f')}" for s, p in run.get("eval_perplexities") or []) or "-"
        trainable = str(run.get("trainable", "-")) + (
            " (LoRA shared with the replacement blocks)" if run.get("lora_shared") else ""
        )
        lines.append(
            f"| {n} | {run.get('data', '-')} | {run.get('teacher') or '-'} | {run.get('steps', '-')} | "
            f"{run.get('tokens_seen', 0):,} | {trainable} | {run.get('trainable_params', 0):,} | "
            f"{run.get('lr', '-')} | {loss} | {ppl} |"
        )
    return lines + [""]


def _load_lines(name: str, method: str, custom_code: bool, vllm: bool) -> list[str]:
    lines = [
        "## How to load",
        "",
        "```python",
        "# with flexigpt_kernels (pip install flexigpt-kernels): fused kernels, training, export",
        f'import flexigpt_kernels as fk; model = fk.from_pretrained("{name}")',
    ]
    if method in ("drop", "none"):
        lines += [
            "# stock transformers (a plain checkpoint: no custom code needed)",
            f'from transformers import AutoModelForCausalLM; model = AutoModelForCausalLM.from_pretrained("{name}")',
        ]
    elif custom_code:
        lines += [
            "# stock transformers, without flexigpt_kernels: the custom code in this folder",
            "from transformers import AutoModelForCausalLM",
            f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)',
        ]
    if method in ("drop", "none"):
        lines += ["# vLLM, as it is", f'from vllm import LLM; llm = LLM(model="{name}")']
    elif vllm:
        lines += [
            '# vLLM (pip install "flexigpt-kernels[vllm]": its plugin registers the architecture)',
            f'from vllm import LLM; llm = LLM(model="{name}")',
        ]
    lines += ["```", ""]
    if method not in ("drop", "none") and not vllm:
        lines += ["vLLM: the flexigpt_kernels plugin does not serve this family (Llama, Mistral and Qwen2 only).", ""]
    if method not in ("drop", "none"):
        lines += [
            "Stock transformers without `trust_remote_code` refuses the checkpoint (its "
            "`model_type` is FlexiGPT's own): it is never loaded as a plain model with random blocks.",
            "",
        ]
    return lines


def render_model_card(
    record: dict[str, Any],
    *,
    name: str = "DIR",
    stored_parameters: int | None = None,
    custom_code: bool = False,
    vllm: bool = False,
    version: str | None = None,
) -> str:
    """The README.md text for a checkpoint whose flexigpt.json is `record` (card extras under
    ``record["card"]``). name: how the load lines refer to the checkpoint."""
    card = record.get("card") or {}
    method = record.get("method", "none")
    source = _source(record, card)
    family = record.get("family", "?")
    title = {
        "flexigpt": "pruned with FlexiGPT (shared weights + low-rank adapters)",
        "drop": "with decoder blocks dropped (ShortGPT baseline)",
        "extend": "extended with FlexiGPT (repeated blocks + low-rank adapters)",
    }.get(method, "saved by flexigpt_kernels")
    lines = [_metadata(record, source, custom_code), "", f"# {source or 'A ' + family + ' model'}, {title}", ""]
    rows = [
        ("source model", source or "unknown"),
        ("family", f"{family} (`{record.get('hf_model_type', '?')}`)"),
        ("method", method),
    ]
    n = record.get("num_blocks")
    if method == "extend":
        rows += [
            ("decoder blocks", f"{n} -> {record.get('num_blocks_after')}"),
            (
                "extended layers / pattern / repeats",
                f"{record.get('layers')} / {record.get('pattern')} / {record.get('repeats')}",
            ),
        ]
    elif method in ("flexigpt", "drop"):
        pruned = record.get("pruned") or []
        rows += [
            ("decoder blocks", f"{n} ({len(pruned)} pruned)"),
            ("pruned blocks", ", ".join(map(str, pruned)) or "-"),
        ]
    if record.get("base_map"):
        rows.append(("base map (replacement block -> the block whose weights it shares)", _fmt_map(record["base_map"])))
    ranks = sorted({int(spec["rank"]) for spec in (record.get("shared") or {}).values()})
    if len(ranks) > 1:  # LocalFit(rank_allocation="spectrum"): each linear its own rank
        rows.append(("adapter rank", f"{ranks[0]}-{ranks[-1]}, per linear"))
    elif record.get("rank"):
        rows.append(("adapter rank", str(record["rank"])))
    if method in ("flexigpt", "extend"):
        rows.append(("output norms", f"{bool(record.get('output_norm'))} (eps {record.get('norm_eps')})"))
    src = card.get("source_parameters")
    if stored_parameters is not None:
        share = f" ({100 * stored_parameters / src:.1f}% of the source's {src:,})" if src else ""
        rows.append(("stored parameters", f"{stored_parameters:,}{share}"))
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    if card.get("perplexity"):
        lines += [
            "## Perplexity when it was made" + (" (before healing)" if card.get("healing") else ""),
            "",
            "| model | held-out perplexity |",
            "|---|---:|",
        ]
        lines += [f"| {k} | {_num(v, '.2f')} |" for k, v in card["perplexity"].items()]
        lines += ([""] + [card["perplexity_setup"]] if card.get("perplexity_setup") else []) + [""]
    if card.get("healing"):
        lines += _healing_lines(card["healing"])
    lines += _load_lines(name, method, custom_code, vllm)
    lines += [f"Written by flexigpt_kernels {version or '?'}; the sharing map is in `flexigpt.json`."]
    return "\n".join(lines) + "\n"


def write_model_card(directory: Path, record: dict[str, Any], model, *, name: str = "DIR") -> Path:
    """Write README.md into `directory` (holding config.json) for `model`, whose flexigpt.json
    is `record`; the load lines call the checkpoint `name`. Returns the card's path."""
    from .. import __version__
    from ..convert.prune import stored_parameters
    from .checkpoint import VLLM_FAMILIES, serving_architecture

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    card = dict(record.get("card") or {})
    if card.get("source_parameters") is None and record.get("method") == "flexigpt":
        card["source_parameters"] = pruned_source_parameters(model)
    arch = (config.get("architectures") or [""])[0]
    text = render_model_card(
        {**record, "card": card},
        name=name,
        stored_parameters=stored_parameters(model),
        custom_code="auto_map" in config,
        vllm=arch in {serving_architecture(hf) for hf in VLLM_FAMILIES},
        version=__version__,
    )
    path = directory / CARD_NAME
    path.write_text(text)
    return path
