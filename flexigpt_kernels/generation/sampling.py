"""Token choice for decoding: logit warping (temperature, top-p), greedy picks, and the
speculative-sampling acceptance rule.

Everything here works on device tensors and never reads a value back to the host, so that a
decode step issues no host synchronisation; the caller reads the round's outcome once.

The acceptance rule (Leviathan et al. 2023; Chen et al. 2023): with p the target's and q the
draft's (warped) next-token distributions at each drafted position and d_i ~ q_i the drafted
tokens, accept d_i with probability min(1, p_i(d_i) / q_i(d_i)), stop at the first rejection,
and emit one more token: from norm(max(0, p_i - q_i)) at a rejected position, or from p_k (the
"bonus" token) when all k drafts were accepted. Every emitted token is then distributed
exactly as sampling from p token by token.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["warp_logits", "probabilities", "greedy_accept", "speculative_accept"]


def warp_logits(logits: Tensor, temperature: float = 1.0, top_p: float = 1.0) -> Tensor:
    """Temperature, then nucleus (top-p) filtering, as Hugging Face's TemperatureLogitsWarper
    and TopPLogitsWarper do: logits [..., V] -> fp32 logits [..., V] with -inf outside the
    smallest set of tokens whose probability mass reaches top_p (at least one token kept)."""
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    if top_p < 1.0:
        sorted_scores, sorted_idx = torch.sort(scores, dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1.0 - top_p)
        remove_sorted[..., -1:] = False  # keep at least the most likely token
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


def probabilities(logits: Tensor, temperature: float = 1.0, top_p: float = 1.0) -> Tensor:
    """The sampling distribution (fp32) over the last dim after warping."""
    return warp_logits(logits, temperature, top_p).softmax(dim=-1)


def greedy_accept(drafts: Tensor, target_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Greedy verification. drafts [k] (long), target_logits [k + 1, V].

    Returns (n_accepted, next_token), both 0-d long tensors on the logits' device: the number
    of leading drafts equal to the target's argmax, and the target's argmax right after them
    (the correction at the first mismatch, or the bonus token when all k match)."""
    target = target_logits.argmax(dim=-1)
    k = drafts.shape[0]
    n_acc = (drafts == target[:k]).long().cumprod(dim=0).sum()
    return n_acc, target.gather(0, n_acc.view(1)).squeeze(0)


def speculative_accept(
    drafts: Tensor,
    draft_probs: Tensor,
    target_probs: Tensor,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The speculative-sampling rule. drafts [k] (long), drafted from draft_probs [k, V];
    target_probs [k + 1, V]. Returns (n_accepted, next_token) as 0-d long tensors.

    One uniform per draft decides acceptance (accept iff u * q(d) < p(d), i.e. with probability
    min(1, p(d)/q(d))); one categorical sample per row of [residuals of rows 0..k-1, p_k] is
    drawn and the one at the first rejection (or the bonus row k) is kept. A residual row with
    no mass (p_i == q_i, where rejection has probability 0) falls back to p_i."""
    k = drafts.shape[0]
    p = target_probs.float()
    q = draft_probs.float()
    idx = drafts.view(k, 1)
    p_d = p[:k].gather(1, idx).squeeze(1)
    q_d = q.gather(1, idx).squeeze(1)
    u = torch.rand(k, device=p.device, generator=generator)
    accepted = u * q_d < p_d
    n_acc = accepted.long().cumprod(dim=0).sum()
    residual = (p[:k] - q).clamp_min(0.0)
    mass = residual.sum(dim=-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp_min(torch.finfo(torch.float32).tiny), p[:k])
    rows = torch.cat([residual, p[k : k + 1]], dim=0)
    samples = torch.multinomial(rows, 1, generator=generator).squeeze(1)
    return n_acc, samples.gather(0, n_acc.view(1)).squeeze(0)
