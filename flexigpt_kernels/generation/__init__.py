"""Generation for converted models: plain and self-speculative decoding (docs/method.md section 9).

ids = generate(model, input_ids, max_new_tokens=64)                      # greedy, self-speculative
ids, stats = generate(model, input_ids, do_sample=True, temperature=0.8, return_stats=True)
"""

from .draft import draft_positions, make_cache, skip_blocks
from .sampling import greedy_accept, probabilities, speculative_accept, warp_logits
from .speculative import GenerationStats, generate

__all__ = [
    "GenerationStats",
    "draft_positions",
    "generate",
    "greedy_accept",
    "make_cache",
    "probabilities",
    "skip_blocks",
    "speculative_accept",
    "warp_logits",
]
