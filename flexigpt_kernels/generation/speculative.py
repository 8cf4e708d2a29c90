"""generate(): plain and self-speculative decoding for converted (FlexiGPT) causal LMs.

Self-speculative decoding (docs/method.md section 9): the draft is the same model with its
replacement blocks skipped (see draft.py); it proposes k tokens one by one, and the full model
scores the pending token plus the k drafts in one forward. Greedy: the longest prefix of drafts
equal to the full model's argmax is kept, then the full model's own next token; the output is
token for token the full model's greedy output. Sampling: the speculative acceptance rule
(sampling.speculative_accept) keeps the output distributed as the full model's (warped)
distribution.

Caches and rollback. Invariant at the start of a round: the sequence has length L, its last
token (the "pending" one) has been chosen but not fed to any model, the full model's cache
holds positions [0, L-1) and the draft's cache holds [0, D) with D <= L-1. The draft feeds
positions [D, L) and then its own k-1 first proposals; the full model feeds the pending token
and the k drafts. With n drafts accepted, the full cache is cropped back to L+n positions and
the draft's to min(L+k-1, L+n): no entry computed from a rejected token survives.

Host synchronisation: one per round (reading the number of accepted tokens and the emitted
tokens back), none inside a draft or verify step: drafted tokens stay on the device.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from .draft import cache_argument, draft_positions, make_cache, skip_blocks
from .sampling import greedy_accept, probabilities, speculative_accept

__all__ = ["generate", "GenerationStats"]


@dataclass
class GenerationStats:
    """What a generate() call did.

    mode: "self_speculative" or "plain"; note: why self-speculative decoding fell back to
    plain decoding, if it did. drafted / accepted: drafted tokens and how many the full model
    kept; acceptance_rate = accepted / drafted (None without drafts). rounds: full-model
    decode forwards (verifications). tokens_per_s: new tokens over the whole call's wall time
    (prefill included); decode_tokens_per_s excludes the prefill."""

    mode: str
    note: str | None = None
    prompt_tokens: int = 0
    new_tokens: int = 0
    draft_tokens: int = 0
    skipped_blocks: list[int] = field(default_factory=list)
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    acceptance_rate: float | None = None
    tokens_per_round: float | None = None
    prefill_seconds: float = 0.0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        parts = [f"mode={self.mode}", f"new_tokens={self.new_tokens}", f"tokens/s={self.tokens_per_s:.2f}"]
        if self.mode == "self_speculative":
            rate = "n/a" if self.acceptance_rate is None else f"{self.acceptance_rate:.3f}"
            parts += [
                f"k={self.draft_tokens}",
                f"acceptance={rate} ({self.accepted}/{self.drafted})",
                f"tokens/round={self.tokens_per_round or 0:.2f}",
                f"skipped_blocks={self.skipped_blocks}",
            ]
        if self.note:
            parts.append(f"note: {self.note}")
        return " ".join(parts)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _eos_set(model: nn.Module, eos_token_id) -> frozenset[int]:
    if eos_token_id is None:
        config = getattr(model, "generation_config", None)
        eos_token_id = getattr(config, "eos_token_id", None)
        if eos_token_id is None:
            return frozenset()
    if isinstance(eos_token_id, Tensor):
        eos_token_id = eos_token_id.tolist()
    if isinstance(eos_token_id, int):
        eos_token_id = [eos_token_id]
    return frozenset(int(t) for t in eos_token_id)


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


class _Forward:
    """Calls the model with an explicit cache and explicit positions, keeping `keep` logits."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.cache_kw = cache_argument(model)
        self.has_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    def __call__(self, ids: Tensor, cache, start: int, keep: int = 0) -> Tensor:
        """ids [1, m] at positions [start, start + m) -> logits [m or keep, V] (fp32 not forced)."""
        positions = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0)
        kwargs = {self.cache_kw: cache, "use_cache": True, "position_ids": positions}
        if keep and self.has_logits_to_keep:
            kwargs["logits_to_keep"] = keep
        logits = self.model(input_ids=ids, **kwargs).logits[0]
        return logits[-keep:] if keep else logits


def _greedy_draft_token(logits: Tensor) -> Tensor:
    """The draft's greedy proposal from its last-position logits [V]: a 0-d long tensor.
    (A separate function so that tests can force wrong drafts.)"""
    return logits.argmax(dim=-1)


def _choose(logits: Tensor, do_sample: bool, temperature: float, top_p: float, generator) -> Tensor:
    """The full model's next token from logits [V] (plain decoding): 0-d long tensor."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = probabilities(logits, temperature, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(0)


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: Tensor,
    *,
    max_new_tokens: int = 32,
    self_speculative: bool = True,
    draft_tokens: int = 4,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    return_stats: bool = False,
    generator: torch.Generator | None = None,
    static_cache: bool = False,
):
    """Decode up to `max_new_tokens` tokens after `input_ids` [1, n] with `model`'s KV cache.

    Returns the ids [1, n + m] (prompt + new tokens, like Hugging Face's generate), or
    (ids, GenerationStats) with return_stats=True. Generation stops after an EOS token (kept
    in the output); eos_token_id=None uses model.generation_config.eos_token_id, an empty
    list disables stopping.

    self_speculative: draft `draft_tokens` tokens with the model minus its replacement blocks
    and verify them with the full model in one forward. Greedy (do_sample=False) output equals
    the full model's greedy output token for token; with do_sample=True the output follows the
    full model's distribution after `temperature` and `top_p` (speculative acceptance rule).
    A model without replacement blocks falls back to plain decoding (stats.note says so).
    generator: a torch.Generator on the model's device, for reproducible sampling.
    static_cache: preallocate both KV caches (transformers' StaticCache, prompt + max_new_tokens
    + draft_tokens + 1 positions) instead of growing them: every draft and verify step then
    has static shapes, as torch.compile with CUDA graphs needs. Not for sliding-window models.

    Batch size 1 only: input_ids with more than one row raise ValueError. Of the model's
    generation_config only eos_token_id is read: other logits processors (repetition penalty,
    min length, ...) are not applied. The model is used as it is (call model.eval() first).
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a LongTensor [1, seq_len], got {shape}")
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"generate() supports batch size 1 only, got input_ids of shape {tuple(input_ids.shape)}; "
            "loop over the prompts, or use Hugging Face's model.generate() for padded batches"
        )
    if input_ids.shape[1] < 1:
        raise ValueError("input_ids must hold at least one token")
    _check_int("max_new_tokens", max_new_tokens, 0)
    _check_int("draft_tokens", draft_tokens, 1)
    if do_sample:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    else:
        temperature, top_p = 1.0, 1.0  # greedy ignores them (as Hugging Face does)
    eos = _eos_set(model, eos_token_id)
    device = _model_device(model)
    input_ids = input_ids.to(device=device, dtype=torch.long)

    skipped = draft_positions(model) if self_speculative else []
    stats = GenerationStats(
        mode="self_speculative" if skipped else "plain", prompt_tokens=int(input_ids.shape[1]), skipped_blocks=skipped
    )
    if self_speculative and not skipped:
        stats.note = "the model has no replacement blocks (nothing to skip): plain decoding"
    if stats.mode == "self_speculative":
        stats.draft_tokens = draft_tokens

    max_cache_len = input_ids.shape[1] + max_new_tokens + draft_tokens + 1 if static_cache else None
    start = time.perf_counter()
    if max_new_tokens == 0:
        new: list[int] = []
    elif stats.mode == "plain":
        new = _plain(
            model, input_ids, max_new_tokens, do_sample, temperature, top_p, eos, generator, stats, max_cache_len
        )
    else:
        new = _speculative(
            model,
            input_ids,
            skipped,
            max_new_tokens,
            draft_tokens,
            do_sample,
            temperature,
            top_p,
            eos,
            generator,
            stats,
            max_cache_len,
        )
    stats.seconds = time.perf_counter() - start
    stats.new_tokens = len(new)
    if stats.seconds > 0:
        stats.tokens_per_s = len(new) / stats.seconds
    decode_s = stats.seconds - stats.prefill_seconds
    if decode_s > 0:
        stats.decode_tokens_per_s = len(new) / decode_s
    if stats.drafted:
        stats.acceptance_rate = stats.accepted / stats.drafted
    if stats.rounds:
        stats.tokens_per_round = len(new) / stats.rounds
    out = torch.cat([input_ids, torch.tensor([new], dtype=torch.long, device=device)], dim=1)
    return (out, stats) if return_stats else out


def _plain(
    model, input_ids, max_new_tokens, do_sample, temperature, top_p, eos, generator, stats, max_cache_len
) -> list[int]:
    forward = _Forward(model)
    cache = make_cache(model, max_cache_len=max_cache_len)
    t = time.perf_counter()
    logits = forward(input_ids, cache, 0, keep=1)[-1]
    token = _choose(logits, do_sample, temperature, top_p, generator)
    stats.prefill_seconds = time.perf_counter() - t
    length = input_ids.shape[1]
    new: list[int] = []
    while True:
        value = int(token)  # the step's one host read
        new.append(value)
        if value in eos or len(new) >= max_new_tokens:
            return new
        logits = forward(token.view(1, 1), cache, length, keep=1)[-1]
        length += 1
        stats.rounds += 1
        token = _choose(logits, do_sample, temperature, top_p, generator)


def _speculative(
    model, input_ids, skipped, max_new_tokens, k, do_sample, temperature, top_p, eos, generator, stats, max_cache_len
) -> list[int]:
    forward = _Forward(model)
    full_cache = make_cache(model, max_cache_len=max_cache_len)
    draft_cache = make_cache(model, skipped, max_cache_len=max_cache_len)
    seq = input_ids  # [1, L] on the device; seq[:, -1] is the pending token
    length = seq.shape[1]
    t = time.perf_counter()
    if length > 1:  # prefill both caches with everything but the pending token
        forward(seq[:, :-1], full_cache, 0, keep=1)
        with skip_blocks(model, skipped):
            forward(seq[:, :-1], draft_cache, 0, keep=1)
    stats.prefill_seconds = time.perf_counter() - t
    full_len = draft_len = length - 1
    new: list[int] = []
    while len(new) < max_new_tokens:
        k_round = min(k, max_new_tokens - len(new) - 1)  # never draft past the budget
        drafts, draft_probs = [], []
        if k_round > 0:
            with skip_blocks(model, skipped):
                feed = seq[:, draft_len:]
                for _ in range(k_round):
                    logits = forward(feed, draft_cache, draft_len, keep=1)[-1]
                    draft_len += feed.shape[1]
                    if do_sample:
                        q = probabilities(logits, temperature, top_p)
                        token = torch.multinomial(q, 1, generator=generator).squeeze(0)
                        draft_probs.append(q)
                    else:
                        token = _greedy_draft_token(logits)
                    drafts.append(token)
                    feed = token.view(1, 1)
        drafted = torch.stack(drafts) if drafts else seq.new_empty((0,))
        verify_in = torch.cat([seq[:, -1], drafted]).unsqueeze(0)  # [1, k_round + 1]
        logits = forward(verify_in, full_cache, full_len)  # [k_round + 1, V]
        full_len += k_round + 1
        stats.rounds += 1
        if do_sample:
            target = probabilities(logits, temperature, top_p)
            if k_round > 0:
                n_acc, extra = speculative_accept(drafted, torch.stack(draft_probs), target, generator)
            else:
                n_acc = torch.zeros((), dtype=torch.long, device=seq.device)
                extra = torch.multinomial(target[0], 1, generator=generator).squeeze(0)
        else:
            n_acc, extra = greedy_accept(drafted, logits)
        host = torch.cat([n_acc.view(1), drafted, extra.view(1)]).tolist()  # the round's one host read
        n = host[0]
        emitted = host[1 : 1 + n] + [host[-1]]
        stats.drafted += k_round
        stats.accepted += n
        # roll back: the full cache keeps [0, L + n), the draft's at most as much
        full_cache.crop(-(k_round - n))
        full_len -= k_round - n
        keep_draft = min(draft_len, length + n)
        draft_cache.crop(-(draft_len - keep_draft))
        draft_len = keep_draft
        seq = torch.cat([seq, drafted[:n].unsqueeze(0), extra.view(1, 1)], dim=1)
        length += n + 1
        for i, tok in enumerate(emitted):
            if tok in eos:
                return new + emitted[: i + 1]
        new += emitted
    return new
