"""Measuring the models of `bench model` (bench/model.py): the PEFT-style unfused view of a
FlexiGPT model, peak-memory and stored-bytes accounting, and the interleaved prefill / decode runner.

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
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import statistics
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn import SharedLoRALinear
from ..ops import unfused_peft_style
from .env import synchronize

VARIANTS = ("dense", "drop", "flexigpt", "flexigpt-unfused")


def _log(msg: str) -> None:
    print(msg, flush=True)


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
