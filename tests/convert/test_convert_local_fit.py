"""Block-local initialisation of replacement blocks (convert/local_fit.py, convert/gamma_init.py,
convert/adapter_init.py, convert/dense_records.py): recording the dense blocks, the closed-form
gamma, activation-aware adapters, the gradient fit and prune(local_fit=...), on tiny random
Llama models."""

import copy

import pytest
import torch

from flexigpt_kernels.convert.adapter_init import activation_aware_adapters, apply_adapters
from flexigpt_kernels.convert.dense_records import (
    DenseRecords,
    block_errors,
    contribution_name,
    record_dense_blocks,
    run_block,
    sublayer_output_norms,
)
from flexigpt_kernels.convert.families import decoder_layers, family_of
from flexigpt_kernels.convert.gamma_init import lsq_gamma, lsq_scale
from flexigpt_kernels.convert.importance import first_tensor
from flexigpt_kernels.convert.local_fit import LocalFit, fit_replacement_blocks
from flexigpt_kernels.convert.prune import prune
from flexigpt_kernels.nn import OutputNorm

from .conftest import tiny_model

BLOCKS = [1, 2]
RANK = 8


def _tokens(n=8, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (n, seq), generator=g)


def _setup(blocks=BLOCKS, covariances=False, layers=4):
    dense = tiny_model("llama", layers=layers)
    tokens = _tokens()
    records = record_dense_blocks(dense, tokens, blocks, batch_size=4, covariances=covariances, progress=False)
    model, rep = prune(copy.deepcopy(dense), None, blocks=blocks, rank=RANK, progress=False)
    return dense, model, records, rep


def test_records_reproduce_dense_blocks_when_called_directly():
    dense = tiny_model("llama", layers=4)
    tokens = _tokens()
    rec = record_dense_blocks(dense, tokens, [2, 1], batch_size=4, progress=False)
    assert rec.blocks == [1, 2] and rec.tokens == 8 * 16
    assert rec.inputs[1].shape == (8, 16, 64) and rec.outputs[2].shape == (8, 16, 64)
    assert rec.attn[1].shape == (8, 16, 64)
    # output of block 1 is the input of block 2
    torch.testing.assert_close(rec.outputs[1], rec.inputs[2])
    layers = decoder_layers(dense)
    with torch.no_grad():
        for b in rec.blocks:
            for rows in (slice(0, 4), slice(2, 3), slice(0, 8)):  # recorded batch size, smaller, larger
                out = run_block(layers[b], rec, b, rec.inputs[b][rows])
                torch.testing.assert_close(out, rec.outputs[b][rows], rtol=1e-5, atol=1e-5)
    # a dense block has zero error against its own records
    assert all(e == 0 or e < 1e-10 for e in block_errors_dense(dense, rec).values())


def block_errors_dense(dense, rec):
    layers = decoder_layers(dense)
    errs = {}
    with torch.no_grad():
        for b in rec.blocks:
            out = run_block(layers[b], rec, b, rec.inputs[b])
            errs[b] = ((out - rec.outputs[b]).pow(2).sum() / (rec.outputs[b] - rec.inputs[b]).pow(2).sum()).item()
    return errs


def test_record_refuses_converted_blocks_and_bad_input():
    _, model, _, _ = _setup()
    with pytest.raises(ValueError, match="already a replacement"):
        record_dense_blocks(model, _tokens(), [1], progress=False)
    with pytest.raises(ValueError, match="LongTensor"):
        record_dense_blocks(model, _tokens().float(), [0], progress=False)


def test_lsq_scale_is_a_per_channel_least_squares_solve():
    g = torch.Generator().manual_seed(0)
    n, t = torch.randn(200, 5, generator=g), torch.randn(200, 5, generator=g)
    ref = torch.linalg.lstsq(n.T.unsqueeze(-1).double(), t.T.unsqueeze(-1).double()).solution.flatten()
    torch.testing.assert_close(lsq_scale(n, t), ref.float())


def test_lsq_gamma_recovers_a_known_gamma():
    """Constructed case: the "dense" records are produced by the replacement blocks themselves
    with known random gammas; the closed form must give those gammas back exactly."""
    dense, model, rec, _ = _setup()
    family = family_of(model)
    layers = decoder_layers(model)
    g = torch.Generator().manual_seed(1)
    truth = {}
    outputs, attns = {}, {}
    with torch.no_grad():
        for b in BLOCKS:
            na, nm = sublayer_output_norms(layers[b], family)
            truth[b] = (torch.rand(64, generator=g) + 0.5, torch.randn(64, generator=g))
            na.weight.copy_(truth[b][0])
            nm.weight.copy_(truth[b][1])
            cap = {}
            h = (
                layers[b]
                .get_submodule(contribution_name(family, "attn"))
                .register_forward_hook(lambda m, a, o: cap.__setitem__("attn", first_tensor(o)))  # noqa: B023
            )
            outputs[b] = run_block(layers[b], rec, b, rec.inputs[b])
            attns[b] = cap["attn"].clone()
            h.remove()
            na.weight.fill_(1e-2)
            nm.weight.fill_(1e-2)
    made = DenseRecords(
        blocks=rec.blocks, inputs=rec.inputs, outputs=outputs, attn=attns, kwargs=rec.kwargs, batch_size=rec.batch_size
    )
    lsq_gamma(model, made, progress=False)
    for b in BLOCKS:
        na, nm = sublayer_output_norms(layers[b], family)
        torch.testing.assert_close(na.weight.detach(), truth[b][0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(nm.weight.detach(), truth[b][1], rtol=1e-4, atol=1e-4)
    assert max(block_errors(model, made).values()) < 1e-8


def test_lsq_gamma_equals_lstsq_on_dense_records_and_lowers_the_error():
    dense, model, rec, _ = _setup()
    family = family_of(model)
    layers = decoder_layers(model)
    before = block_errors(model, rec)
    lsq_gamma(model, rec, progress=False)
    after = block_errors(model, rec)
    for b in BLOCKS:
        assert after[b] < before[b]
        na, _ = sublayer_output_norms(layers[b], family)
        got = na.weight.detach().clone()
        # independent solve: n with gamma 1, recorded attention contribution as target
        with torch.no_grad():
            na.weight.fill_(1.0)
            cap = {}
            h = (
                layers[b]
                .get_submodule(contribution_name(family, "attn"))
                .register_forward_hook(lambda m, a, o: cap.__setitem__("n", first_tensor(o)))  # noqa: B023
            )
            run_block(layers[b], rec, b, rec.inputs[b])
            h.remove()
            na.weight.copy_(got)
        n = cap["n"].reshape(-1, 64).double()
        t = rec.attn[b].reshape(-1, 64).double()
        ref = torch.linalg.lstsq(n.T.unsqueeze(-1), t.T.unsqueeze(-1)).solution.flatten()
        torch.testing.assert_close(got, ref.float(), rtol=1e-4, atol=1e-5)


def test_activation_aware_adapters_identity_covariance_is_the_svd_init():
    dense, model, rec, rep = _setup(covariances=True)
    family = family_of(dense)
    # identity covariance (no damping): the weighted problem is the plain Frobenius one
    for b in rec.cov:
        rec.cov[b] = {
            name: torch.eye(dense.model.layers[b].get_submodule(name).in_features, dtype=torch.float64) * rec.tokens
            for name in family.linears
        }
    factors, stats = activation_aware_adapters(dense, rec, rep.base_map, rank=RANK, damping=0.0)
    layers = decoder_layers(model)
    for b, per in factors.items():
        for name, (a, bm) in per.items():
            lin = layers[b].get_submodule(name)
            torch.testing.assert_close(bm @ a, lin.lora_b.detach() @ lin.lora_a.detach(), rtol=1e-4, atol=1e-5)
            assert stats[b][name]["activation"] == pytest.approx(stats[b][name]["svd"], rel=1e-6, abs=1e-9)


def test_activation_aware_adapters_beat_svd_in_the_weighted_norm_and_lower_the_block_error():
    dense, model, rec, rep = _setup(covariances=True)
    factors, stats = activation_aware_adapters(dense, rec, rep.base_map, rank=RANK)
    for per in stats.values():
        for s in per.values():
            assert s["activation"] <= s["svd"] + 1e-9
    model_act = copy.deepcopy(model)
    apply_adapters(model_act, factors)
    for m in (model, model_act):  # compare at the same closed-form gamma
        lsq_gamma(m, rec, progress=False)
    e_svd, e_act = block_errors(model, rec), block_errors(model_act, rec)
    assert sum(e_act.values()) < sum(e_svd.values())
    with pytest.raises(ValueError, match="already converted"):
        activation_aware_adapters(model, rec, rep.base_map, rank=RANK)


def test_fit_lowers_block_output_mse():
    dense, model, rec, _ = _setup()
    report = fit_replacement_blocks(
        model,
        rec,
        LocalFit(adapter_init="svd", gamma="lsq", steps=40, lr=3e-3, batch_size=2, val_fraction=0.25),
        progress=False,
    )
    assert report.train_rows == 6 and report.val_rows == 2
    for b in BLOCKS:
        e = report.errors
        assert e["gamma"][b]["train"] < e["init"][b]["train"]
        assert e["fit"][b]["train"] < e["gamma"][b]["train"]
        assert report.losses[b][-1] < report.losses[b][0]
    assert report.fit_tokens == rec.tokens
    # the report's "fit" errors are the model's current errors
    now = block_errors(model, rec, rows=slice(0, 6))
    for b in BLOCKS:
        assert now[b] == pytest.approx(report.errors["fit"][b]["train"], rel=1e-5)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("trainable", ["adapters", "gamma", "replacement_blocks"])
def test_fit_touches_only_the_intended_parameters(trainable):
    dense, model, rec, _ = _setup()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = _snapshot(model)
    fit_replacement_blocks(
        model, rec, adapter_init="svd", gamma=None, steps=5, lr=1e-2, batch_size=2, trainable=trainable, progress=False
    )
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed
    for n in changed:
        layer = int(n.split(".")[2])
        assert layer in BLOCKS, n
        is_gamma = n.endswith("output_norm.weight")
        is_adapter = n.endswith(("lora_a", "lora_b")) or (n.endswith(".bias") and "proj" in n)
        if trainable == "gamma":
            assert is_gamma, n
        elif trainable == "adapters":
            assert is_gamma or is_adapter, n
        else:
            assert is_gamma or is_adapter or n.endswith("layernorm.weight"), n
    if trainable == "replacement_blocks":
        assert any(n.endswith("layernorm.weight") for n in changed)
    # shared base weights never move, requires_grad flags are restored
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_fit_needs_factors_for_activation_init_and_matching_records():
    dense, model, rec, _ = _setup()
    with pytest.raises(ValueError, match="adapter_factors"):
        fit_replacement_blocks(model, rec, LocalFit(adapter_init="activation"), progress=False)
    rec1 = record_dense_blocks(dense, _tokens(), [1], progress=False)
    with pytest.raises(ValueError, match="have no records"):
        fit_replacement_blocks(model, rec1, LocalFit(adapter_init="svd"), progress=False)
    with pytest.raises(ValueError):
        LocalFit(gamma="rms")


def test_prune_with_local_fit():
    dense = tiny_model("llama", layers=4)
    tokens = _tokens()
    model, rep = prune(
        copy.deepcopy(dense), tokens, blocks=BLOCKS, rank=RANK, progress=False, local_fit=dict(steps=3, batch_size=2)
    )
    assert rep.local_fit is not None and set(rep.local_fit["errors"]) == {"init", "gamma", "fit"}
    assert model.flexigpt_meta["local_fit"]["adapter_init"] == "activation"
    assert "local_fit" in rep.seconds and "local_fit_record" in rep.seconds
    # differs from the plain init, and the gammas are no longer the constant init
    plain, _ = prune(copy.deepcopy(dense), tokens, blocks=BLOCKS, rank=RANK, progress=False)
    g = [m.weight for m in model.modules() if isinstance(m, OutputNorm)]
    assert g and all(not torch.allclose(w, torch.full_like(w, 1e-2)) for w in g)
    with torch.no_grad():
        ids = tokens[:2]
        assert not torch.allclose(model(ids).logits, plain(ids).logits)
    with pytest.raises(ValueError, match="calibration"):
        prune(copy.deepcopy(dense), None, blocks=BLOCKS, local_fit=True, progress=False)
    with pytest.raises(ValueError, match="flexigpt"):
        prune(copy.deepcopy(dense), tokens, blocks=BLOCKS, method="drop", local_fit=True, progress=False)


def test_local_fit_on_a_family_with_post_norms():
    """Gemma 2's sandwich norms: the output norm sits after the post norm; the closed-form gamma
    and a short fit still lower the block error."""
    dense = tiny_model("gemma2", layers=4)
    tokens = _tokens()
    model, rep = prune(
        copy.deepcopy(dense),
        tokens,
        blocks=BLOCKS,
        rank=RANK,
        progress=False,
        local_fit=dict(steps=10, batch_size=2, lr=3e-3),
    )
    e = rep.local_fit["errors"]
    for b in map(str, BLOCKS):
        assert e["gamma"][b]["train"] < e["init"][b]["train"]
        assert e["fit"][b]["train"] <= e["gamma"][b]["train"]


def test_recorded_covariances_are_the_inputs_gram_matrices():
    dense = tiny_model("llama", layers=4)
    tokens = _tokens()
    rec = record_dense_blocks(dense, tokens, [1, 2], batch_size=4, covariances=True, progress=False)
    layer = decoder_layers(dense)[1]
    grams = {}

    def grab(name):
        def hook(m, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x

        return hook

    hs = [layer.get_submodule(n).register_forward_pre_hook(grab(n)) for n in family_of(dense).linears]
    with torch.no_grad():
        for s in (0, 4):
            dense(input_ids=tokens[s : s + 4], attention_mask=torch.ones_like(tokens[s : s + 4]), use_cache=False)
    for h in hs:
        h.remove()
    for name, g in grams.items():
        torch.testing.assert_close(rec.cov[1][name], g, rtol=1e-4, atol=1e-4)  # fp32 products
    assert rec.cov[1]["self_attn.q_proj"] is rec.cov[1]["self_attn.v_proj"]  # one shared input
    assert rec.cov[1]["mlp.down_proj"].shape == (128, 128)


def test_block_local_modules_import_without_a_cycle():
    """The recording is its own module: gamma_init and adapter_init read it, local_fit reads all
    three, and none of them imports local_fit back (also not inside a function)."""
    import ast
    import importlib

    import flexigpt_kernels.convert as convert

    root = convert.__path__[0]
    imports = {}
    for mod in ("dense_records", "adapter_init", "gamma_init", "local_fit"):
        tree = ast.parse(open(f"{root}/{mod}.py").read())
        imports[mod] = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}
        assert importlib.import_module(f"flexigpt_kernels.convert.{mod}")
    for mod in ("dense_records", "adapter_init", "gamma_init"):
        assert "local_fit" not in imports[mod], mod
    assert not {"gamma_init", "adapter_init"} & imports["dense_records"]
    assert {"dense_records", "adapter_init", "gamma_init"} <= imports["local_fit"]
    # the moved names stay importable from local_fit
    from flexigpt_kernels.convert import local_fit

    assert local_fit.record_dense_blocks is record_dense_blocks
    assert local_fit.activation_aware_adapters is activation_aware_adapters
