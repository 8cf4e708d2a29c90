"""`flexigpt prune`: prune a Hugging Face causal LM the FlexiGPT way (or drop blocks) and save it.
With no --model and no --calib it runs on the embedded default (SmolLM2-135M + gensim text).
The arguments and the job are in ._pruning (shared with `flexigpt demo`)."""

from __future__ import annotations

from ._pruning import add_arguments, load_inputs, run

__all__ = ["add_arguments", "load_inputs", "run"]
