"""End-to-end benchmark: the dense model, the drop baseline (ShortGPT: the same blocks removed),
the FlexiGPT-pruned model on our ops, and the same pruned weights composed PEFT-style from plain
torch ops (each SharedLoRALinear swapped for F.linear + LoRA + a separate F.layer_norm).

All models are resident at once and measured interleaved (every prefill round and every decode
step runs each model once, in rotating order), so load from other processes or clock drift hits
them alike. Inputs are random token ids (the speed does not depend on the text).
- prefill latency: one forward over batch x seq_len tokens with the KV cache built and only the
  last position's logits computed (logits_to_keep=1, as generate() does); min and median over
  rounds after a warm-up call;
- decode: greedy, `new_tokens` one-token steps with the KV cache after a batch-1 prompt of
  seq_len tokens; tokens/s = steps / their total time; ms/token min and median over steps;
- memory: the weights (each shared or tied tensor once), the KV cache after decoding, and the
  largest transient peak of one call (activations, workspaces): on CUDA
  torch.cuda.max_memory_allocated minus what was allocated before the call; on the CPU peak RSS
  (VmHWM reset through /proc/self/clear_refs, else a 2 ms sampler) minus RSS before the call,
  after malloc_trim - approximate (allocator caching); tracemalloc cannot see torch's memory.
Times are reported as ratios to the dense model: prefill from the minima, decode from the
median ms/token.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..nn import SharedLoRALinear
from ..ops import unfused_peft_style
from .env import device_slug, run_metadata, synchronize
from .results import append_csv, fmt_ratio, markdown_table, text_table

VARIANTS = ("dense", "drop", "flexigpt", "flexigpt-unfused")


def _log(msg: str) -> None:
    print(msg, flush=True)


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


# ----------------------------------------------------------------------------- PEFT-style form


class UnfusedSharedLoRALinear(nn.Module):
    """The same computation as a SharedLoRALinear (the same tensors), written the way a user
    without this package would: F.linear, shrink, expand, add, separate F.layer_norm."""

    def __init__(self, shared: SharedLoRALinear):
        super().__init__()
        self.shared = shared

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        s, dt = self.shared, x.dtype
        norm, bias = s.output_norm, s.effective_bias()
        return unfused_peft_style(
            x,
            s.weight.to(dt),
            s.lora_a.to(dt),
            s.lora_b.to(dt),
            s.scale,
            bias.to(dt) if bias is not None else None,
            norm_weight=norm.weight.to(dt) if norm is not None else None,
            eps=norm.eps if norm is not None else 1e-5,
            residual=residual,
        )


@contextlib.contextmanager
def unfused_view(model: nn.Module):
    """Inside the block, every SharedLoRALinear of `model` is computed PEFT-style (swapped back
    on exit). Yields the number of swapped layers."""
    swaps = []
    for name, module in list(model.named_modules()):
        if isinstance(module, SharedLoRALinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, UnfusedSharedLoRALinear(module))
            swaps.append((parent, child, module))
    try:
        yield len(swaps)
    finally:
        for parent, child, module in swaps:
            setattr(parent, child, module)


# ----------------------------------------------------------------------------- memory


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak extra memory (bytes) of the code inside the block: see the module doc."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = math.nan
        self.method = ""

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda max_memory_allocated"
            return self
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self._base = (_status_kib("VmRSS") or 0) * 1024
        self._sampler = None
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.method = "VmHWM (clear_refs)"
        except OSError:
            self.method = "RSS sampled every 2 ms"
            self._stop, self._max = threading.Event(), self._base
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self._max = max(self._max, (_status_kib("VmRSS") or 0) * 1024)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self.peak_bytes = self._max - self._base
        else:
            self.peak_bytes = (_status_kib("VmHWM") or 0) * 1024 - self._base
        return False


def stored_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers, each storage counted once (shared and tied weights)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


# ----------------------------------------------------------------------------- measurement


@dataclass
class Settings:
    seq_len: int = 512
    batches: tuple[int, ...] = (1, 8)
    new_tokens: int = 128
    rounds: int = 3


@dataclass
class Measurement:
    variant: str
    layers: int
    replaced: int
    params: int
    weights_bytes: int
    prefill_times: dict[int, list[float]] = field(default_factory=dict)  # batch -> seconds per round
    steps: list[float] = field(default_factory=list)  # seconds per decode step
    tokens: list[int] = field(default_factory=list)
    peak_bytes: float = 0.0  # the largest transient peak of one call (activations, workspace)
    kv_cache_bytes: int = 0  # the decode cache at its end
    memory_method: str = ""

    def prefill(self, batch: int) -> tuple[float, float]:
        t = self.prefill_times[batch]
        return min(t), statistics.median(t)


def _cache_kwarg(model: nn.Module) -> str:
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(out):
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


def cache_bytes(cache) -> int:
    """Bytes held by a KV cache's tensors."""
    seen, total = set(), 0

    def visit(obj, depth=0):
        nonlocal total
        if depth > 4:
            return
        if isinstance(obj, torch.Tensor):
            if id(obj) not in seen:
                seen.add(id(obj))
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                visit(o, depth + 1)
        elif hasattr(obj, "__dict__") and depth < 4:
            for o in vars(obj).values():
                visit(o, depth + 1)

    visit(cache)
    return total


class Variant:
    """One model to measure and how to call it (the unfused variant is the FlexiGPT model with
    its SharedLoRALinear layers swapped out around each call)."""

    def __init__(self, name: str, model: nn.Module, unfused: bool = False):
        from ..convert.families import num_layers
        from ..convert.prune import stored_parameters

        self.name, self.model, self.unfused = name, model, unfused
        self.cache_kw = _cache_kwarg(model)
        self.result = Measurement(
            name,
            num_layers(model),
            sum(1 for m in model.modules() if hasattr(m, "flexigpt_base")),
            stored_parameters(model),
            stored_bytes(model),
        )

    def __call__(self, device: torch.device, **kwargs):
        """One forward, timed (synchronized), its transient peak memory recorded: (output, seconds)."""
        with unfused_view(self.model) if self.unfused else contextlib.nullcontext():
            with PeakMemory(device) as mem:
                synchronize(device)
                t0 = time.perf_counter()
                out = self.model(**kwargs)
                synchronize(device)
                seconds = time.perf_counter() - t0
        self.result.peak_bytes = max(self.result.peak_bytes, mem.peak_bytes)
        self.result.memory_method = mem.method
        return out, seconds


def measure_all(variants: list[Variant], ids: torch.Tensor, st: Settings, device: torch.device, log=_log) -> None:
    """Prefill and decode every variant, interleaved: each round (prefill) and each decode step
    runs every variant once, in rotating order, so that load from other processes or clock
    drift hits all of them alike."""

    def rotated(i):
        k = i % len(variants)
        return variants[k:] + variants[:k]

    with torch.inference_mode():
        for bi, b in enumerate(st.batches):
            x = ids[:b, : st.seq_len]
            if bi == 0 or device.type == "cuda":  # warm-up (on the CPU the first batch warms the rest)
                for v in variants:
                    v(device, input_ids=x, use_cache=True, logits_to_keep=1)
            for i in range(st.rounds):
                for v in rotated(i):
                    _, t = v(device, input_ids=x, use_cache=True, logits_to_keep=1)
                    v.result.prefill_times.setdefault(b, []).append(t)
            log(
                f"prefill {b}x{st.seq_len} ms (min / median): "
                + ", ".join(
                    f"{v.name} {v.result.prefill(b)[0] * 1e3:.1f} / {v.result.prefill(b)[1] * 1e3:.1f}"
                    for v in variants
                )
            )
        state = {}
        for v in variants:
            if device.type == "cuda":  # warm up the one-row decode path
                out, _ = v(device, input_ids=ids[:1, :16], use_cache=True, logits_to_keep=1)
                cache, tok = _out_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
                for _ in range(3):
                    out, _ = v(device, input_ids=tok, use_cache=True, **{v.cache_kw: cache})
                    tok = out.logits[:, -1].argmax(-1, keepdim=True)
                del out, cache
            out, _ = v(device, input_ids=ids[:1, : st.seq_len], use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            state[v.name] = (_out_cache(out), tok)
            v.result.tokens = [int(tok)]
        for i in range(st.new_tokens):
            for v in rotated(i):
                cache, tok = state[v.name]
                out, t = v(device, input_ids=tok, use_cache=True, **{v.cache_kw: cache})
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                state[v.name] = (cache, tok)
                v.result.steps.append(t)
                v.result.tokens.append(int(tok))
        for v in variants:
            v.result.kv_cache_bytes = cache_bytes(state[v.name][0])
        del state
    log(
        f"decode {st.new_tokens} steps, ms/token (min / median): "
        + ", ".join(
            f"{v.name} {min(v.result.steps) * 1e3:.2f} / {statistics.median(v.result.steps) * 1e3:.2f}"
            for v in variants
        )
    )


# ----------------------------------------------------------------------------- models


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


def run_model_bench(
    cfg: ModelBenchConfig, *, device: torch.device, dtype: torch.dtype | None, out: Path, log=_log
) -> int:
    from ..convert.families import num_layers
    from ..convert.prune import prune
    from ..ops import backends

    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    quick = cfg.quick
    st = Settings(
        seq_len=cfg.seq_len,
        batches=tuple(cfg.batches or ((1,) if quick else (1, 8))),
        new_tokens=cfg.new_tokens or (32 if quick else 128),
        rounds=cfg.rounds or (2 if quick else (5 if device.type == "cuda" else 3)),
    )
    wanted = list(cfg.variants or VARIANTS)
    t_start = time.perf_counter()
    dense, tok, source = load_source(cfg.model, cfg.random, device, dtype)
    vocab = dense.config.get_text_config(decoder=True).vocab_size
    ids = torch.randint(0, vocab, (max(st.batches), st.seq_len), generator=torch.Generator().manual_seed(1234))
    ids = ids.to(device)
    ours = backends.resolve(device, dtype)
    log(
        f"bench model: {source}, {num_layers(dense)} layers, {dtype}, on {device} (our op's backend: {ours}); "
        f"prefill {','.join(map(str, st.batches))}x{st.seq_len}, {st.new_tokens} new tokens, {st.rounds} rounds"
    )
    flex, conv = convert_copy(dense, cfg, tok, log)
    variants = []
    if "dense" in wanted:
        variants.append(Variant("dense", dense))
    if "drop" in wanted:
        drop, _ = prune(copy.deepcopy(dense), None, blocks=conv.pruned, method="drop", progress=False)
        variants.append(Variant("drop", drop.eval()))
    if "dense" not in wanted:
        del dense
    if "flexigpt" in wanted:
        variants.append(Variant("flexigpt", flex))
    if "flexigpt-unfused" in wanted:
        variants.append(Variant("flexigpt-unfused", flex, unfused=True))
    measure_all(variants, ids, st, device, log)
    results = {v.name: v.result for v in variants}
    rows = _rows(results, st, device, dtype, source, conv, ours)
    slug = device_slug(device)
    csv_path = append_csv(out / f"model_{slug}.csv", rows)
    md_path = out / f"model_{slug}.md"
    md_path.write_text(_markdown(rows, st))
    log("")
    log(format_table(rows, st))
    log(f"\n{time.perf_counter() - t_start:.0f} s in all; appended to {csv_path}; table in {md_path}")
    return 0


# ----------------------------------------------------------------------------- tables


def _rows(results: dict[str, Measurement], st: Settings, device, dtype, source, conv: Conversion, ours) -> list[dict]:
    meta = run_metadata(device)
    meta.update(
        dtype=str(dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        model=source,
        pruned_blocks=" ".join(map(str, conv.pruned)),
        rank=conv.rank,
        bases=conv.bases,
        our_backend=ours,
        seq_len=st.seq_len,
        new_tokens=st.new_tokens,
        rounds=st.rounds,
    )
    dense = results.get("dense")
    ref_tokens = results["flexigpt"].tokens if "flexigpt" in results else None
    rows = []
    for v in [v for v in VARIANTS if v in results]:
        r = results[v]
        row = {
            **meta,
            "variant": v,
            "layers": r.layers,
            "replaced_blocks": r.replaced,
            "params_M": r.params / 1e6,
            "weights_MiB": r.weights_bytes / 2**20,
        }
        for b in st.batches:
            mn, med = r.prefill(b)
            key = f"prefill_{b}x{st.seq_len}"
            row[key + "_min_ms"] = mn * 1e3
            row[key + "_median_ms"] = med * 1e3
            row[key + "_x_dense"] = mn / dense.prefill(b)[0] if dense else math.nan
        step_med = statistics.median(r.steps)
        row["decode_tok_s"] = len(r.steps) / sum(r.steps)
        row["decode_ms_per_token_min"] = min(r.steps) * 1e3
        row["decode_ms_per_token_median"] = step_med * 1e3
        row["decode_x_dense"] = step_med / statistics.median(dense.steps) if dense else math.nan
        row["kv_cache_MiB"] = r.kv_cache_bytes / 2**20
        row["peak_activation_MiB"] = r.peak_bytes / 2**20
        row["memory_method"] = r.memory_method
        if ref_tokens is not None and v == "flexigpt-unfused":
            row["same_tokens_as_flexigpt"] = f"{sum(a == b for a, b in zip(r.tokens, ref_tokens))}/{len(ref_tokens)}"
        rows.append(row)
    return rows


def _table(rows: list[dict], st: Settings):
    headers = ["model", "layers (replaced)", "params M", "weights MiB"]
    for b in st.batches:
        headers += [f"prefill {b}x{st.seq_len} ms min / med", "x dense"]
    headers += ["decode tok/s", "ms/token min / med", "x dense", "KV cache MiB", "peak activations MiB"]
    body = []
    for r in rows:
        line = [
            r["variant"],
            f"{r['layers']} ({r['replaced_blocks']})",
            f"{r['params_M']:.1f}",
            f"{r['weights_MiB']:.0f}",
        ]
        for b in st.batches:
            key = f"prefill_{b}x{st.seq_len}"
            line += [f"{r[key + '_min_ms']:.1f} / {r[key + '_median_ms']:.1f}", fmt_ratio(r[key + "_x_dense"])]
        line += [
            f"{r['decode_tok_s']:.1f}",
            f"{r['decode_ms_per_token_min']:.2f} / {r['decode_ms_per_token_median']:.2f}",
            fmt_ratio(r["decode_x_dense"]),
            f"{r['kv_cache_MiB']:.1f}",
            f"{r['peak_activation_MiB']:.0f}",
        ]
        body.append(line)
    return headers, body


def format_table(rows: list[dict], st: Settings) -> str:
    headers, body = _table(rows, st)
    text = text_table(headers, body)
    same = [r["same_tokens_as_flexigpt"] for r in rows if "same_tokens_as_flexigpt" in r]
    if same:
        text += f"\ngreedy tokens of flexigpt-unfused equal to flexigpt's: {same[0]}"
    return text


def _markdown(rows: list[dict], st: Settings) -> str:
    first = rows[0]
    headers, body = _table(rows, st)
    same = [r["same_tokens_as_flexigpt"] for r in rows if "same_tokens_as_flexigpt" in r]
    return (
        f"# End-to-end benchmark: {first['model']} on {first['device_name']}, {first['dtype']}\n\n"
        f"run {first['run_id']} ({first['date']}), torch {first['torch']}, triton {first['triton']}, commit "
        f"{first['commit']}, OMP_WAIT_POLICY={first['omp_wait_policy']}; our op's backend: "
        f"{first['our_backend']}; pruned blocks {first['pruned_blocks']}, rank {first['rank']}, bases by "
        f"{first['bases']}.\n\n"
        f"Prefill: batch x {st.seq_len} random tokens, KV cache built, last-position logits only; {st.rounds} "
        f"rounds after a warm-up, all models interleaved per round; ratio to dense from the minima. Decode: "
        f"greedy, {st.new_tokens} one-token steps after a {st.seq_len}-token prompt, models interleaved per "
        f"step; tok/s = steps / their total time; ratio to dense from the median ms/token. Memory: weights "
        f"(each shared tensor once), the KV cache after decoding, and the largest transient peak of one "
        f"call ({first['memory_method']}).\n\n"
        + markdown_table(headers, body)
        + "\n"
        + (f"\nGreedy tokens of flexigpt-unfused equal to flexigpt's: {same[0]}.\n" if same else "")
    )
