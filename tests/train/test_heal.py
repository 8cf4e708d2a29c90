"""heal(): lowers held-out loss, trains only the chosen set, through the fused op, with
gradient accumulation, token budgets, the warmup + cosine schedule and distillation."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from flexigpt_kernels.nn import OutputNorm, SharedLoRALinear
from flexigpt_kernels.presets import PAPER
from flexigpt_kernels.train import LoRALinear, heal, merge_lora, select_trainable
from flexigpt_kernels.train.schedule import WarmupCosine, warmup_steps

from .helpers import SEQ, tiny_llama, tiny_pruned, token_data

KW = dict(seq_len=SEQ, batch_size=4, progress=False)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_heal_lowers_heldout_perplexity_and_trains_only_adapters():
    model = tiny_pruned()
    before = snapshot(model)
    report = heal(
        model,
        token_data(64),
        steps=8,
        lr=1e-2,
        eval_data=token_data(16, seed=1),
        eval_chunks=8,
        eval_every=4,
        **PAPER.heal_kwargs(),
        **KW,
    )  # the paper's trainable set
    assert [s for s, _ in report.eval_perplexities] == [0, 4, 8]
    assert report.ppl_final < 0.9 * report.ppl_init
    assert report.losses[-1] < report.losses[0]
    assert report.tokens_seen == 8 * 4 * SEQ and report.steps == 8
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.endswith(("lora_a", "lora_b", "output_norm.weight")) for n in changed)
    assert all(".layers.1." in n or ".layers.2." in n for n in changed)  # the replacement blocks only
    # 2 blocks x 7 linears x rank 4 x (in + out) + 2 gammas per block
    expected = sum(m.lora_a.numel() + m.lora_b.numel() for m in model.modules() if isinstance(m, SharedLoRALinear))
    expected += sum(m.weight.numel() for m in model.modules() if isinstance(m, OutputNorm))
    assert report.trainable_params == expected


def test_trainable_sets():
    model = tiny_pruned()
    adapters = {n for n, _ in select_trainable(model, "adapters")}
    blocks = {n for n, _ in select_trainable(model, "replacement_blocks")}
    assert adapters < blocks and any("input_layernorm" in n for n in blocks - adapters)
    every = select_trainable(model, "all")
    assert len(every) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="no FlexiGPT replacement blocks"):
        select_trainable(tiny_llama(), "adapters")
    with pytest.raises(ValueError, match="unknown set"):
        select_trainable(model, "everything")
    hybrid = {n for n, _ in select_trainable(model, ("adapters", "lora_kept"), lora_rank=2)}
    assert adapters < hybrid and any(".lora.lora_a" in n for n in hybrid)


def test_lora_on_kept_blocks_starts_exact_trains_through_the_op_and_merges():
    model = tiny_pruned(method="drop")
    ids = token_data(2)
    ref = model(input_ids=ids).logits
    named = select_trainable(model, "lora_kept", lora_rank=3)
    loras = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(loras) == 2 * 7 and all(isinstance(m.lora, SharedLoRALinear) for m in loras)
    assert {n.rsplit(".", 1)[-1] for n, _ in named} == {"lora_a", "lora_b"}
    assert torch.equal(model(input_ids=ids).logits, ref)  # B = 0: an exact no-op
    heal(model, token_data(32), steps=3, lr=1e-2, trainable="lora_kept", lora_rank=3, **KW)
    assert any(m.lora.lora_b.abs().sum() > 0 for m in loras)
    trained = model(input_ids=ids).logits
    assert merge_lora(model) == 14
    assert not any(isinstance(m, (LoRALinear, SharedLoRALinear)) for m in model.modules())
    torch.testing.assert_close(model(input_ids=ids).logits, trained, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rank", [3, 40])  # 40: adapter 4 + LoRA rank > min(in, out) of k/v: the full-rank path
def test_hybrid_merge_folds_lora_into_shared_bases_and_compensates_replacements(tmp_path, rank):
    from flexigpt_kernels.io import from_pretrained, save_pretrained

    model = tiny_pruned()
    ids = token_data(2)
    kw = dict(trainable=("adapters", "lora_kept"), lora_rank=rank, lora_shared=False)  # each replacement compensates
    heal(model, token_data(32), steps=3, lr=1e-2, **kw, **KW)
    trained = model(input_ids=ids).logits
    shared = [m for m in model.modules() if isinstance(m, SharedLoRALinear) and m.rank == 4]
    lora_rank = {id(m.base): m.lora.rank for m in model.modules() if isinstance(m, LoRALinear)}
    expected = [min(4 + lora_rank[id(m.base)], m.in_features, m.out_features) for m in shared]
    with pytest.raises(ValueError, match="shared by a replacement block"):
        merge_lora(copy.deepcopy(model), compensate_shared=False)
    assert merge_lora(model) == 2 * 7
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert [m.rank for m in shared] == expected  # every replacement linear's base had LoRA
    assert any(r < 4 + rank for r in expected) == (rank == 40)
    torch.testing.assert_close(model(input_ids=ids).logits, trained, rtol=1e-4, atol=1e-4)
    save_pretrained(model, tmp_path / "ckpt")
    torch.testing.assert_close(from_pretrained(tmp_path / "ckpt")(input_ids=ids).logits, trained, rtol=1e-4, atol=1e-4)


def test_gradients_flow_through_the_fused_op():
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = {"fwd": 0, "bwd": 0}

    class CountOps(TorchDispatchMode):  # sees every op call, whichever backend (C++ or Python) runs it
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.name()
            if name == "flexigpt::shared_lora_linear_fwd":
                calls["fwd"] += 1
            elif name == "flexigpt::shared_lora_linear_bwd":
                calls["bwd"] += 1
            return func(*args, **(kwargs or {}))

    with CountOps():
        heal(tiny_pruned(), token_data(8), steps=1, lr=1e-2, **PAPER.heal_kwargs(), **KW)
    assert calls["bwd"] == 2 * 7  # every replacement linear's backward ran in the op
    assert calls["fwd"] >= 2 * 7


def test_grad_accum_matches_a_bigger_batch():
    a, b = tiny_pruned(), tiny_pruned()
    data = token_data(64)
    ra = heal(a, data, steps=4, lr=1e-2, seq_len=SEQ, batch_size=4, progress=False)
    rb = heal(b, data, steps=4, lr=1e-2, seq_len=SEQ, batch_size=2, grad_accum=2, progress=False)
    assert ra.tokens_seen == rb.tokens_seen
    torch.testing.assert_close(torch.tensor(ra.losses), torch.tensor(rb.losses), rtol=1e-5, atol=1e-5)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


def test_token_budget_schedule_and_data_cycling():
    model = tiny_pruned()
    with pytest.warns(UserWarning, match="cycle"):
        report = heal(model, token_data(6), tokens=10 * 4 * SEQ - 1, lr=1e-2, warmup=0.2, **KW)
    assert report.steps == 10 and report.tokens_seen == 10 * 4 * SEQ
    lrs = report.lrs
    assert lrs[0] == pytest.approx(0.5e-2) and lrs[1] == pytest.approx(1e-2)  # 2 warmup steps
    assert lrs[2] == pytest.approx(1e-2)  # the cosine starts at the peak
    assert all(x > y for x, y in zip(lrs[2:], lrs[3:])) and lrs[-1] > 0
    s = WarmupCosine(10, warmup_steps(0.2, 10), min_lr_ratio=0.1)
    assert s(2) == 1.0 and s(10) == pytest.approx(0.1) and s(6) == pytest.approx(0.55)
    with pytest.raises(ValueError, match="exactly one"):
        heal(model, token_data(6), steps=2, tokens=100, **KW)


def test_distillation_terms_and_gamma_lr():
    teacher = tiny_llama()
    model = tiny_pruned()
    report = heal(
        model,
        token_data(16),
        steps=2,
        lr=1e-2,
        gamma_lr=0.05,
        teacher=teacher,
        distill={"kl": 1.0, "mse": 0.5},
        kl_temperature=2.0,
        **KW,
    )
    terms = report.loss_terms
    assert set(terms) == {"lm", "kl", "mse"} and all(v > 0 for t in terms.values() for v in t)
    for i in range(2):
        assert report.losses[i] == pytest.approx(terms["lm"][i] + terms["kl"][i] + 0.5 * terms["mse"][i], rel=1e-5)
    assert not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="needs a teacher"):
        heal(model, token_data(16), steps=1, distill=("mse",), **KW)


def test_kl_of_identical_logits_is_zero():
    from flexigpt_kernels.train.distill import kl_loss

    z = torch.randn(2, 5, 11)
    assert kl_loss(z, z, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_loss(z, torch.randn(2, 5, 11)).item() > 0


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_bf16_autocast_runs_on_cpu(backend):
    from flexigpt_kernels import use_backend

    model = tiny_pruned()
    with use_backend(backend):
        report = heal(model, token_data(16), steps=2, lr=1e-2, mixed_precision="bf16", **KW)
    assert all(math.isfinite(x) for x in report.losses)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fsdp_per_layer_wrapping_is_refused_for_replacement_blocks():
    from types import SimpleNamespace

    from flexigpt_kernels.train.runtime import check_fsdp_wrapping

    def accel(policy):
        return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(auto_wrap_policy=policy)))

    check_fsdp_wrapping(tiny_pruned(), accel(None))  # one FSDP unit: fine
    check_fsdp_wrapping(tiny_pruned("drop"), accel(lambda *a: True))  # nothing shared across blocks
    with pytest.raises(ValueError, match="no_wrap"):
        check_fsdp_wrapping(tiny_pruned(), accel(lambda *a: True))
