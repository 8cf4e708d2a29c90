"""The engine-side layer timers of python/profile_vllm.py (integrations/vllm/profile.py) on a
small stand-in model with vLLM's layout: model.layers.N.{self_attn.qkv_proj, mlp.act_fn, ...}.
They need no vLLM: plain forward hooks on the modules. The timers read a fake clock that only
the stand-in modules advance, so the assertions hold on a loaded machine too."""

from __future__ import annotations

import types

import torch
from torch import nn

from flexigpt_kernels.integrations.vllm import profile
from flexigpt_kernels.integrations.vllm.profile import install_timers, read_timers, remove_timers

CLOCK = {"ns": 0}


class Slow(nn.Module):
    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def forward(self, x=None, hidden_states=None):
        CLOCK["ns"] += int(self.seconds * 1e9) + 1  # every call takes a little, this one `seconds` more
        return x if hidden_states is None else hidden_states


class Layer(nn.Module):
    def __init__(self, seconds: float):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.qkv_proj = Slow(seconds)
        self.self_attn.qkv_proj._base = Slow(0.0)  # a replacement linear's insides: not timed
        self.mlp = nn.Module()
        self.mlp.act_fn = Slow(0.0)

    def forward(self, positions, hidden_states):
        return self.mlp.act_fn(self.self_attn.qkv_proj(hidden_states=hidden_states))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([Layer(0.0), Layer(0.003)])

    def forward(self, positions, hidden):
        for layer in self.model.layers:
            hidden = layer(positions, hidden)
        return hidden


def test_timers_time_each_layer_and_its_modules_by_token_rows(monkeypatch):
    monkeypatch.setattr(profile, "time", types.SimpleNamespace(perf_counter_ns=lambda: CLOCK["ns"]))
    model = Model()
    timed = install_timers(model)
    assert timed == 10  # 2 x (the layer, self_attn, self_attn.qkv_proj, mlp, mlp.act_fn): no _base
    for rows in (8, 8, 3):
        model(torch.arange(rows), torch.zeros(rows, 4))
    samples = read_timers(model)
    assert "model.layers.1.self_attn.qkv_proj._base" not in samples
    slow, fast = samples["model.layers.1.self_attn.qkv_proj"], samples["model.layers.0.self_attn.qkv_proj"]
    assert sorted(slow) == [3, 8] and len(slow[8]) == 2 and len(slow[3]) == 1  # keyword hidden_states counted
    assert min(slow[8]) >= 3e6 > max(fast[8])  # ns: the slow one, told apart
    assert min(samples["model.layers.1"][8]) >= min(slow[8])  # the layer includes its modules
    remove_timers(model)
    model(torch.arange(8), torch.zeros(8, 4))
    assert read_timers(model) == {}  # hooks gone
