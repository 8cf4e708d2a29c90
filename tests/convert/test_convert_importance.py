import pytest
import torch
import torch.nn.functional as F

from flexigpt_kernels.convert import block_influence, decoder_layers, select_blocks

from .conftest import TINY_CONFIGS, tiny_model


def _tokens(n=6, seq=12, seed=0):
    return torch.randint(3, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_identity_block_scores_zero_and_is_ranked_lowest():
    model = tiny_model("llama", layers=6)
    layer = decoder_layers(model)[2]
    with torch.no_grad():  # both sub-layers now add exactly zero: the block is the identity
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    bi = block_influence(model, _tokens(), batch_size=4, progress=False)
    assert bi.shape == (6,) and bi.dtype == torch.float32
    assert abs(bi[2].item()) < 1e-6
    assert (bi[torch.arange(6) != 2] > 1e-3).all()
    assert int(bi.argmin()) == 2 and select_blocks(bi, ratio=0.1) == [2]
    assert _no_hooks(model)


def test_matches_output_hidden_states_for_inner_blocks():
    model = tiny_model("llama", layers=5)
    tokens = _tokens(n=5, seq=10)
    bi = block_influence(model, tokens, batch_size=2, progress=False)
    with torch.no_grad():
        hs = model(tokens, output_hidden_states=True).hidden_states  # hs[i] enters block i
    # the last entry is taken after the final norm, so only blocks 0..L-2 can be checked this way
    manual = torch.stack([1 - F.cosine_similarity(hs[i], hs[i + 1], dim=-1).mean() for i in range(4)])
    torch.testing.assert_close(bi[:4], manual, rtol=1e-5, atol=1e-6)


def test_batch_size_does_not_change_the_scores():
    model = tiny_model("llama", layers=3)
    tokens = _tokens(n=5, seq=8)
    a = block_influence(model, tokens, batch_size=1, progress=False)
    b = block_influence(model, tokens, batch_size=8, progress=False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_hooks_removed_and_mode_restored_after_an_error():
    model = tiny_model("llama", layers=3).train()
    with pytest.raises(IndexError):
        block_influence(model, torch.full((2, 4), 10_000), progress=False)  # id outside the vocabulary
    assert _no_hooks(model) and model.training
    block_influence(model, _tokens(n=2, seq=4), progress=False)
    assert model.training


def test_bf16_model_runs_in_its_dtype():
    model = tiny_model("llama", layers=3).to(torch.bfloat16)
    bi = block_influence(model, _tokens(n=2, seq=8), progress=False)
    ref = block_influence(tiny_model("llama", layers=3), _tokens(n=2, seq=8), progress=False)
    assert bi.dtype == torch.float32
    torch.testing.assert_close(bi, ref, rtol=0.1, atol=0.02)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_every_family(model_type):
    model = tiny_model(model_type, layers=3)
    bi = block_influence(model, _tokens(n=2, seq=8), progress=False)
    assert bi.shape == (3,) and torch.isfinite(bi).all() and (bi > -1e-6).all() and (bi <= 2).all()
    assert _no_hooks(model)


def test_bad_batches():
    model = tiny_model("llama", layers=2)
    with pytest.raises(ValueError, match="batches"):
        block_influence(model, _tokens().float(), progress=False)
    with pytest.raises(ValueError, match="batches"):
        block_influence(model, [[1, 2]], progress=False)
    with pytest.raises(ValueError, match="batches: empty"):
        block_influence(model, torch.zeros(0, 4, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        block_influence(model, _tokens(), batch_size=0, progress=False)
