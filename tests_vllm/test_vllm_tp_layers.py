"""FlexiGPTSharedLinear on vLLM's own parallel layers at tensor_parallel_size=2, without an engine:
two processes set up vLLM's parallel state (init_distributed_environment +
ensure_model_parallel_initialized, gloo on the CPU), build QKVParallelLinear (2 kv heads: split;
1 kv head: replicated), MergedColumnParallelLinear and RowParallelLinear bases, load every
weight through the layers' own loaders (the adapters through checkpoint_tensors' cuts), pack
them as vLLM's CPU backend does, and run the replacement linears (row-parallel ones through
vLLM's all-reduce). The parent checks each rank's adapter shards against
tensor_parallel.shard and each rank's outputs against the unsharded reference op."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from flexigpt_kernels.integrations.vllm.tensor_parallel import shard
from flexigpt_kernels.ops.reference import shared_lora_linear_reference

WORLD = 2
HIDDEN, HEADS, HEAD_DIM, INTER, M = 64, 4, 16, 96, 5
EPS = 1e-5
RANKS = {"q": 3, "k": 2, "v": 4, "gate": 5, "up": 1, "o": 6, "down": 7}


def full_tensors(kv_heads: int) -> dict[str, torch.Tensor]:
    """Every unsharded tensor of one replacement block (and its base block), seeded."""
    g = torch.Generator().manual_seed(kv_heads)
    rnd = lambda *shape: torch.randn(*shape, generator=g) / 4  # noqa: E731
    out_sizes = {"q": HEADS * HEAD_DIM, "k": kv_heads * HEAD_DIM, "v": kv_heads * HEAD_DIM, "gate": INTER, "up": INTER}
    in_sizes = {p: HIDDEN for p in ("q", "k", "v", "gate", "up")} | {"o": HEADS * HEAD_DIM, "down": INTER}
    out_sizes.update(o=HIDDEN, down=HIDDEN)
    t = {"x": rnd(M, HIDDEN), "x_o": rnd(M, HEADS * HEAD_DIM), "x_down": rnd(M, INTER)}
    for p, n in out_sizes.items():
        t[f"{p}.weight"] = rnd(n, in_sizes[p])
        t[f"{p}.lora_a"] = rnd(RANKS[p], in_sizes[p])
        t[f"{p}.lora_b"] = rnd(n, RANKS[p])
    for p in ("q", "k", "v"):
        t[f"{p}.base_bias"] = rnd(out_sizes[p])
        t[f"{p}.bias"] = rnd(out_sizes[p])  # the replacement's own bias (Qwen2)
    t["down.base_bias"] = rnd(HIDDEN)  # a row-parallel bias: added once after the reduce
    for p in ("o", "down"):
        t[f"{p}.output_norm.weight"] = 1 + rnd(HIDDEN)
    return t


SCALES = {p: 0.5 + 0.1 * i for i, p in enumerate(RANKS)}


def _build_and_run(t: dict[str, torch.Tensor], kv_heads: int, base_gemm: str) -> dict[str, torch.Tensor]:
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear

    from flexigpt_kernels.integrations.vllm.layers import AdapterSpec, FlexiGPTSharedLinear
    from flexigpt_kernels.integrations.vllm.model import _cut_checked

    kw = dict(params_dtype=torch.float32)
    bases = {
        "qkv": QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, kv_heads, bias=True, **kw),
        "gate_up": MergedColumnParallelLinear(HIDDEN, [INTER, INTER], bias=False, **kw),
        "o": RowParallelLinear(HEADS * HEAD_DIM, HIDDEN, bias=False, **kw),
        "down": RowParallelLinear(INTER, HIDDEN, bias=True, **kw),
    }
    parts = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up"), "o": ("o",), "down": ("down",)}
    shard_ids = {"q": "q", "k": "k", "v": "v", "gate": 0, "up": 1}
    linears = {}
    for stack, base in bases.items():  # built before loading, as the model does
        own = stack == "qkv"
        specs = [AdapterSpec(p, RANKS[p], SCALES[p], own) for p in parts[stack]]
        norm_eps = EPS if stack in ("o", "down") else None
        linears[stack] = FlexiGPTSharedLinear(base, specs, norm_eps=norm_eps, base_gemm=base_gemm)
    out = {}
    for stack, base in bases.items():  # the base block's weights, as vLLM's model loads them
        for p in parts[stack]:
            w = base.weight
            w.weight_loader(w, t[f"{p}.weight"], *([shard_ids[p]] if p in shard_ids else []))
            if base.bias is not None:
                b = base.bias
                b.weight_loader(b, t[f"{p}.base_bias"], *([shard_ids[p]] if p in shard_ids else []))
        for name, (param, cut) in linears[stack].checkpoint_tensors("").items():  # the adapters
            param.data.copy_(_cut_checked(name, t[name], param, cut))
            out[f"{stack}/{name}"] = param.detach().clone()
        if base_gemm == "op":
            base._cpu_skip_gemm_dispatch = True
        base.quant_method.process_weights_after_loading(base)  # vLLM's CPU packing
    for stack, linear in linears.items():
        base = bases[stack]
        x = {"o": "x_o", "down": "x_down"}.get(stack, "x")
        x = t[x] if not linear.row_parallel else shard(t[x], 1, base.tp_rank, base.tp_size)
        out[f"{stack}/y"] = linear(x)[0].detach().clone()
        out[f"{stack}/reduce"] = torch.tensor(linear.reduce)
    qkv = linears["qkv"]  # every part has its own bias: the stacked bias is their one buffer
    stacked = qkv._stacked_bias()
    out["qkv/stacked_bias"] = stacked.detach().clone()
    out["qkv/stacked_bias_is_the_parts"] = torch.tensor(
        all(a.bias.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr() for a in qkv.adapters.values())
        and stacked.data_ptr() == qkv._stacked_bias().data_ptr()
    )
    return out


def _worker(rank: int, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    os.environ["VLLM_DIST_IDENT"] = f"flexigpt-test-{port}"  # the CPU shared-memory group's name
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment

    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(WORLD, rank, f"tcp://127.0.0.1:{port}", rank, "gloo")
        ensure_model_parallel_initialized(WORLD, 1)
        results = {(kv, gemm): _build_and_run(full_tensors(kv), kv, gemm) for kv in (1, 2) for gemm in ("engine", "op")}
    torch.save(results, os.path.join(tmp, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp_layers")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(port, str(tmp)), nprocs=WORLD, start_method="spawn", join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


CASES = [(kv, gemm) for kv in (1, 2) for gemm in ("engine", "op")]


def replicas(p: str, kv_heads: int) -> int:
    return max(1, WORLD // kv_heads) if p in ("k", "v") else 1


@pytest.mark.parametrize("kv_heads, base_gemm", CASES)
def test_adapters_are_cut_like_the_spec(per_rank, kv_heads, base_gemm):
    """vLLM's loaders cut B / own biases of column parts by the base's rows (k, v replicated
    with 1 kv head) and A of row parts by columns; the rest is whole on every rank."""
    t = full_tensors(kv_heads)
    for rank, got in enumerate(per_rank):
        got = got[(kv_heads, base_gemm)]
        for p, stack in [("q", "qkv"), ("k", "qkv"), ("v", "qkv"), ("gate", "gate_up"), ("up", "gate_up")]:
            for key in ("lora_b", "bias") if stack == "qkv" else ("lora_b",):
                want = shard(t[f"{p}.{key}"], 0, rank, WORLD, replicas(p, kv_heads))
                torch.testing.assert_close(got[f"{stack}/{p}.{key}"], want, rtol=0, atol=0)
            torch.testing.assert_close(got[f"{stack}/{p}.lora_a"], t[f"{p}.lora_a"], rtol=0, atol=0)
        for p in ("o", "down"):
            torch.testing.assert_close(got[f"{p}/{p}.lora_a"], shard(t[f"{p}.lora_a"], 1, rank, WORLD), rtol=0, atol=0)
            for key in ("lora_b", "output_norm.weight"):
                torch.testing.assert_close(got[f"{p}/{p}.{key}"], t[f"{p}.{key}"], rtol=0, atol=0)


@pytest.mark.parametrize("kv_heads, base_gemm", CASES)
def test_own_biases_are_one_stacked_buffer_read_without_a_copy(per_rank, kv_heads, base_gemm):
    """Qwen2-style own q/k/v biases live in one [N] buffer: the call's stacked bias is that
    buffer (no concatenation per call), and it holds each rank's loaded shards in order."""
    t = full_tensors(kv_heads)
    for rank, got in enumerate(per_rank):
        got = got[(kv_heads, base_gemm)]
        assert bool(got["qkv/stacked_bias_is_the_parts"])
        want = torch.cat([shard(t[f"{p}.bias"], 0, rank, WORLD, replicas(p, kv_heads)) for p in ("q", "k", "v")])
        torch.testing.assert_close(got["qkv/stacked_bias"], want, rtol=0, atol=0)


@pytest.mark.parametrize("kv_heads, base_gemm", CASES)
def test_column_outputs_are_the_full_ops_columns(per_rank, kv_heads, base_gemm):
    t = full_tensors(kv_heads)
    for rank, got in enumerate(per_rank):
        got = got[(kv_heads, base_gemm)]
        for stack, ps in (("qkv", ("q", "k", "v")), ("gate_up", ("gate", "up"))):
            assert not bool(got[f"{stack}/reduce"])
            bias = "bias" if stack == "qkv" else None
            want = torch.cat(
                [
                    shard(
                        shared_lora_linear_reference(
                            t["x"],
                            t[f"{p}.weight"],
                            t[f"{p}.lora_a"],
                            t[f"{p}.lora_b"],
                            SCALES[p],
                            t[f"{p}.{bias}"] if bias else None,
                        ),
                        1,
                        rank,
                        WORLD,
                        replicas(p, kv_heads),
                    )
                    for p in ps
                ],
                dim=1,
            )
            torch.testing.assert_close(got[f"{stack}/y"], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv_heads, base_gemm", CASES)
def test_row_outputs_after_the_all_reduce_are_the_full_op_on_every_rank(per_rank, kv_heads, base_gemm):
    t = full_tensors(kv_heads)
    for p, x, bias in (("o", "x_o", None), ("down", "x_down", "down.base_bias")):
        want = shared_lora_linear_reference(
            t[x],
            t[f"{p}.weight"],
            t[f"{p}.lora_a"],
            t[f"{p}.lora_b"],
            SCALES[p],
            t[bias] if bias else None,
            norm_weight=t[f"{p}.output_norm.weight"],
            eps=EPS,
        )
        for got in per_rank:
            got = got[(kv_heads, base_gemm)]
            assert bool(got[f"{p}/reduce"])
            torch.testing.assert_close(got[f"{p}/y"], want, rtol=1e-4, atol=1e-4)
