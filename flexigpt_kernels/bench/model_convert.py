"""Building and converting the models of `bench model` (bench/model.py): random-weight Llama
shapes, the dense model source, the benchmark's configuration, and the FlexiGPT-converted copy."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..nn import SharedLoRALinear
from .model_measure import VARIANTS, _log

RANDOM_PRESETS = {
    # Llama-2-7B's shape (no hub needed: random weights are fine for timing)
    "llama2-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    # SmolLM2-135M's shape (the embedded model's; FLOP counts and timing without loading it)
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
    ),
    # the smoke tests' model: seconds on the CPU
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
    ),
}


def build_random_model(preset: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A LlamaForCausalLM of a RANDOM_PRESETS shape with random weights, built on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**RANDOM_PRESETS[preset], tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


def default_blocks(n_layers: int, ratio: float) -> list[int]:
    """ratio x L consecutive blocks ending one before the last (where Block Influence puts them on
    Llama models): for random weights, where calibration would mean nothing."""
    k = min(max(1, round(ratio * n_layers)), n_layers - 2)
    return list(range(n_layers - 1 - k, n_layers - 1))


def nearest_bases(blocks: list[int], n_layers: int) -> dict[int, int]:
    """Each pruned block shares the closest kept block before it (else after it)."""
    kept = [j for j in range(n_layers) if j not in set(blocks)]
    return {i: max((j for j in kept if j < i), default=min(j for j in kept if j > i)) for i in blocks}


@dataclass
class ModelBenchConfig:
    """What `bench model` measures (the command line's options, see commands/bench.py).

    model: a dense model source for io.load_model (None: the embedded default); random: instead
    a RANDOM_PRESETS name with random weights. blocks: explicit pruned blocks (else chosen by
    Block Influence, or default_blocks on random weights); bases: "distance" or "nearest" (None:
    "nearest" when quick, else "distance"). batches / new_tokens / rounds: None takes the
    defaults of Settings (quick: 1 batch, 32 tokens, 2 rounds)."""

    model: str | None = None
    random: str | None = None
    quick: bool = False
    ratio: float = 0.3
    blocks: list[int] | None = None
    rank: int | float | None = None
    bases: str | None = None
    calib_samples: int = 8
    seq_len: int = 512
    batches: tuple[int, ...] | None = None
    new_tokens: int | None = None
    rounds: int | None = None
    variants: list[str] | None = None

    def __post_init__(self):
        if self.random is not None and self.random not in RANDOM_PRESETS:
            raise ValueError(f"random: unknown preset {self.random!r}; choose from {', '.join(RANDOM_PRESETS)}")
        if self.bases not in (None, "distance", "nearest"):
            raise ValueError(f"bases: expected 'distance' or 'nearest', got {self.bases!r}")
        unknown = sorted(set(self.variants or ()) - set(VARIANTS))
        if unknown:
            raise ValueError(f"variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
        if not 0 < self.ratio < 1:
            raise ValueError(f"ratio: expected a fraction in (0, 1), got {self.ratio}")


def load_source(model: str | None, random: str | None, device: torch.device, dtype: torch.dtype):
    """(dense model on device, tokenizer or None, description) of a model source (io.load_model:
    None = the embedded default) or of a RANDOM_PRESETS name. A FlexiGPT checkpoint is refused
    (ValueError): the benchmark converts a copy of the dense model itself."""
    if random:
        return build_random_model(random, device, dtype), None, f"random {random}"
    from ..io.load import load_model

    loaded = load_model(model, dtype=dtype, device=device, allow_converted=False)
    name = "SmolLM2-135M-Instruct (embedded default)" if loaded.kind == "default" else loaded.source
    return loaded.model, loaded.tokenizer, name


def _randomize_adapters(model: nn.Module, seed: int = 0) -> None:
    """B = 0 after an SVD-free conversion; give the adapters random values (timing is the same,
    but no layer silently computes a zero delta)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SharedLoRALinear):
                m.lora_b.copy_((torch.randn(m.lora_b.shape, generator=g) * 1e-2).to(m.lora_b))


@dataclass
class Conversion:
    pruned: list[int]
    rank: int
    base_map: dict[int, int]
    bases: str  # how the bases were chosen
    seconds: float


def convert_copy(model: nn.Module, cfg: ModelBenchConfig, tok, log=_log) -> tuple[nn.Module, Conversion]:
    """A FlexiGPT-converted deep copy of `model`.

    Blocks: --blocks, else (random weights) default_blocks, else Block Influence on
    --calib-samples chunks of the embedded calibration text. Bases: "distance" runs prune() (the
    low-rank distance, docs/method.md 3); "nearest" shares the closest kept block (what --quick and
    the GPU suite use: the choice changes no shape, so no timing, and the distance costs minutes
    on a busy CPU). Adapters: SVD of the difference, except on random weights (random values)."""
    from ..convert.families import num_layers
    from ..convert.prune import prune
    from ..convert.replacement import convert_blocks, resolve_rank

    t0 = time.perf_counter()
    flex = copy.deepcopy(model)
    n_layers = num_layers(flex)
    blocks = list(cfg.blocks) if cfg.blocks else (default_blocks(n_layers, cfg.ratio) if cfg.random else None)
    if blocks is None:
        from ..convert.calibration import token_batches
        from ..convert.importance import block_influence
        from ..convert.selection import select_blocks
        from ..io.load import resolve_data

        if tok is None:
            raise ValueError("blocks: choosing blocks by Block Influence needs a tokenizer; give the blocks")
        tokens = token_batches(resolve_data("default"), tok, seq_len=256, num_samples=cfg.calib_samples)
        blocks = select_blocks(block_influence(flex, tokens, progress=False), ratio=cfg.ratio)
    svd_init = not cfg.random
    bases = cfg.bases or ("nearest" if cfg.quick else "distance")
    if bases == "distance":
        flex, report = prune(flex, None, blocks=blocks, rank=cfg.rank, svd_init=svd_init, progress=False)
        conv = Conversion(report.pruned, report.rank, dict(report.base_map), "low-rank distance (prune)", 0.0)
    else:
        hidden = flex.config.get_text_config(decoder=True).hidden_size
        rank = resolve_rank(cfg.rank, hidden)
        base_map = nearest_bases(sorted(blocks), n_layers)
        convert_blocks(flex, base_map, rank=rank, svd_init=svd_init)
        conv = Conversion(sorted(blocks), rank, base_map, "nearest kept block", 0.0)
    if cfg.random:
        _randomize_adapters(flex)
    conv.seconds = time.perf_counter() - t0
    log(
        f"converted blocks {conv.pruned} (rank {conv.rank}, bases by {conv.bases}: {conv.base_map}) "
        f"in {conv.seconds:.1f} s"
    )
    return flex.eval(), conv
