"""Evaluation: held-out perplexity."""

from .perplexity import perplexity

__all__ = ["perplexity"]
