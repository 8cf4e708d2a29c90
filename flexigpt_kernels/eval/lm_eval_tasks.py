"""Zero-shot (or few-shot) tasks through lm-evaluation-harness, on an in-memory model.

    evaluate_tasks(model, tokenizer, ["arc_easy", "path/to/my_task.yaml"]) -> TaskResults

The model is wrapped with lm-eval's ``HFLM(pretrained=model, tokenizer=tokenizer)`` (no reload,
no copy: replacement blocks and fused ops run as they are) and evaluated with
``lm_eval.simple_evaluate``. Tested with lm-eval 0.4.13 (``pip install lm-eval==0.4.13``, the
"eval" extra); it is imported only when this function runs.

Task specs, each one of:

- a path to a task YAML file (``.yaml`` / ``.yml``). A task file is read with lm-eval's own
  YAML loader (``include:`` and ``!function`` work, relative to the file), and a *relative*
  ``dataset_kwargs.data_files`` entry that names a file next to the YAML is made absolute, so a
  task folder can be moved. The usual offline local task::

      task: my_task
      dataset_path: json
      dataset_kwargs:
        data_files: {test: my_task.jsonl}
      test_split: test
      output_type: multiple_choice
      doc_to_text: "Question: {{question}}\\nAnswer:"
      doc_to_choice: choices
      doc_to_target: answer
      metric_list: [{metric: acc}, {metric: acc_norm}]

  A group YAML is passed to lm-eval as a path, with its folder added to the task search path.
- a registered lm-eval task, group or tag name (``arc_easy``, ``arc_challenge``, ``piqa``,
  ``winogrande``, ``hellaswag``: the paper's five). These download their data from the Hugging
  Face hub; with no network they fail (a ValueError says so) - use local task files.

Global random state (``random``, numpy, torch) is saved and restored around the run: lm-eval
seeds all three, and an evaluation in the middle of training must not change what follows.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["PAPER_TASKS", "TaskResults", "evaluate_tasks", "resolve_task_spec"]

#: the zero-shot tasks of the FlexiGPT paper (docs/method.md section 10); they need the hub
PAPER_TASKS = ("arc_easy", "arc_challenge", "piqa", "winogrande", "hellaswag")

_YAML_SUFFIXES = (".yaml", ".yml")


@dataclass
class TaskResults:
    """metrics: {task: {metric: value}} with lm-eval's ``",none"`` filter suffix removed (other
    filters stay as ``"metric,filter"``), plus ``"num_samples"``; raw: lm-eval's full output
    (``results``, ``configs``, ``versions``, ``n-shot``, ...; samples not logged)."""

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics}


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ImportError(
            "zero-shot tasks need lm-evaluation-harness: pip install 'lm-eval==0.4.13' (or the package's 'eval' extra)"
        ) from None


def _absolute_data_files(data_files, base: Path):
    def fix(p):
        if isinstance(p, str) and not os.path.isabs(p) and "://" not in p and (base / p).exists():
            return str((base / p).resolve())
        return p

    if isinstance(data_files, dict):
        return {k: ([fix(x) for x in v] if isinstance(v, (list, tuple)) else fix(v)) for k, v in data_files.items()}
    if isinstance(data_files, (list, tuple)):
        return [fix(x) for x in data_files]
    return fix(data_files)


def resolve_task_spec(spec: str) -> tuple[str | dict[str, Any], Path | None]:
    """(what to hand lm-eval, a folder to add to its task search path or None) for one spec.

    A task YAML file becomes its loaded config dict (data_files resolved against the file's
    folder); a group YAML stays a path (its folder is searched for its tasks); anything else is
    taken as a registered task name.
    """
    path = Path(spec).expanduser()
    if path.suffix.lower() in _YAML_SUFFIXES or path.is_file():
        if not path.is_file():
            raise ValueError(f"tasks: no such task file: {spec!r}")
        from lm_eval.tasks._yaml_loader import load_yaml

        cfg = load_yaml(path, resolve_func=True)
        if "task" in cfg and "group" not in cfg and isinstance(cfg["task"], str):
            cfg = dict(cfg)
            kwargs = cfg.get("dataset_kwargs")
            if isinstance(kwargs, dict) and "data_files" in kwargs:
                cfg["dataset_kwargs"] = {
                    **kwargs,
                    "data_files": _absolute_data_files(kwargs["data_files"], path.parent),
                }
            return cfg, None
        return str(path.resolve()), path.resolve().parent
    return spec, None


def _clean_metrics(results: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in results.items():
        if key in ("alias", "name", "sample_len", " ") or not isinstance(value, (int, float)):
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt in ("", "none") else key] = float(value)
    return out


@contextlib.contextmanager
def _preserve_rng() -> Iterator[None]:
    import numpy as np

    py, npy, cpu = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def evaluate_tasks(
    model,
    tokenizer,
    tasks: str | Sequence[str],
    *,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    include_path: str | os.PathLike | Iterable[str | os.PathLike] | None = None,
    max_length: int | None = None,
    bootstrap_iters: int = 0,
) -> TaskResults:
    """Run lm-eval `tasks` on the in-memory causal LM `model` (see the module doc for specs).

    batch_size: requests per forward pass. num_fewshot: None = each task's default (0 for the
    paper's tasks). limit: at most this many examples per task (a float < 1 = a fraction; for
    smoke tests only). include_path: extra folders of task YAMLs whose names `tasks` may use.
    max_length: context length (default: lm-eval reads it from the model config).
    bootstrap_iters: lm-eval's bootstrap for standard errors (0 = skip; stderr then absent).

    The tokenizer is copied (lm-eval may set its pad token). The model is put in eval mode for
    the run and its train/eval mode restored afterwards. Returns :class:`TaskResults`.
    """
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if isinstance(tasks, (str, os.PathLike)):
        tasks = [tasks]
    tasks = [os.fspath(t) for t in tasks]
    if not tasks:
        raise ValueError("tasks: give at least one task name or task YAML file")
    if tokenizer is None:
        raise ValueError("tokenizer: lm-eval needs the model's tokenizer")
    specs, folders = [], []
    for t in tasks:
        spec, folder = resolve_task_spec(t)
        specs.append(spec)
        if folder is not None:
            folders.append(folder)
    if include_path is not None:
        extra = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
        folders = [Path(p) for p in extra] + folders
    needs_registry = any(isinstance(s, str) and not os.path.isfile(s) for s in specs)
    manager = TaskManager(include_path=[str(f) for f in folders] or None, include_defaults=needs_registry)
    if needs_registry:
        unknown = [s for s in specs if isinstance(s, str) and not os.path.isfile(s) and s not in manager.all_tasks]
        if unknown:
            raise ValueError(
                f"tasks: {unknown} are neither task YAML files nor lm-eval task names (e.g. {', '.join(PAPER_TASKS)})"
            )

    hflm_kwargs: dict[str, Any] = {"batch_size": batch_size}
    if max_length is not None:
        hflm_kwargs["max_length"] = max_length
    was_training = model.training
    model.eval()
    try:
        with _preserve_rng():
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), **hflm_kwargs)
            try:
                raw = simple_evaluate(
                    model=lm,
                    tasks=specs,
                    task_manager=manager,
                    num_fewshot=num_fewshot,
                    limit=limit,
                    log_samples=False,
                    bootstrap_iters=bootstrap_iters,
                )
            except (ConnectionError, OSError) as e:
                if needs_registry:
                    raise ValueError(
                        f"tasks: lm-eval could not load a registered task's data ({type(e).__name__}: {e}); "
                        "the standard tasks download from the Hugging Face hub - with no network, "
                        "evaluate local task YAML files (dataset_path: json, dataset_kwargs.data_files)"
                    ) from e
                raise
    finally:
        model.train(was_training)
    if raw is None:  # lm-eval returns None on non-zero ranks
        return TaskResults()
    metrics = {name: _clean_metrics(res) for name, res in raw.get("results", {}).items()}
    for name, n in (raw.get("n-samples") or {}).items():
        if name in metrics and isinstance(n, dict) and "effective" in n:
            metrics[name]["num_samples"] = float(n["effective"])
    return TaskResults(metrics=metrics, raw={k: v for k, v in raw.items() if k != "samples"})
