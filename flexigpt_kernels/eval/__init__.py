"""Evaluation: held-out perplexity and lm-evaluation-harness tasks on an in-memory model."""

from .lm_eval_tasks import PAPER_TASKS, TaskResults, evaluate_tasks
from .perplexity import perplexity

__all__ = ["PAPER_TASKS", "TaskResults", "evaluate_tasks", "perplexity"]
