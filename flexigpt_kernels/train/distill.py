"""Distillation from the dense teacher during healing.

    kl  = T^2 * mean over tokens of KL(softmax(z_teacher / T) || softmax(z_student / T))
    mse = mean over replacement blocks b of mean((h_student_b - h_teacher_b)^2)

h_b is the hidden state a decoder block returns, hooked at the same position b in student and
teacher (a FlexiGPT model keeps every block at its position). LLM-Streamline fits its
lightweight network with this MSE; here it is added to the end-to-end loss:
loss = lm_weight * LM + sum of weights[term] * term.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..convert.families import decoder_layers
from ..convert.replacement import replacement_blocks

DISTILL_TERMS = ("kl", "mse")


def normalize_distill(distill: None | str | Iterable[str] | dict) -> dict[str, float]:
    if distill is None:
        return {}
    if isinstance(distill, str):
        distill = (distill,)
    weights = dict(distill) if isinstance(distill, dict) else {name: 1.0 for name in distill}
    for name in weights:
        if name not in DISTILL_TERMS:
            raise ValueError(f"distill: unknown term {name!r}; choose from {DISTILL_TERMS}")
    return {k: float(v) for k, v in weights.items()}


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    t = float(temperature)
    s = F.log_softmax(student_logits.float().flatten(0, -2) / t, dim=-1)
    q = F.log_softmax(teacher_logits.float().flatten(0, -2) / t, dim=-1)
    return F.kl_div(s, q, log_target=True, reduction="batchmean") * (t * t)


def _output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


class BlockOutputs:
    """Forward hooks recording the outputs of the decoder blocks at `positions`."""

    def __init__(self, model: nn.Module, positions: list[int], *, detach: bool):
        self.outputs: dict[int, torch.Tensor] = {}
        layers = decoder_layers(model)
        self.handles = [layers[i].register_forward_hook(self._hook(i, detach)) for i in positions]

    def _hook(self, i, detach):
        def hook(module, args, out):
            h = _output(out)
            self.outputs[i] = h.detach() if detach else h

        return hook

    def pop(self) -> dict[int, torch.Tensor]:
        out, self.outputs = self.outputs, {}
        return out

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


class Distiller:
    """Runs the teacher on the student's batch and computes the distillation terms."""

    def __init__(self, student: nn.Module, teacher: nn.Module, weights: dict[str, float], *, temperature: float = 1.0):
        self.teacher = teacher
        self.weights = weights
        self.temperature = temperature
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.student_hooks = self.teacher_hooks = None
        if "mse" in weights:
            positions = sorted(replacement_blocks(student))
            if not positions:
                raise ValueError("distill 'mse' compares replacement blocks' outputs; this model has none")
            if len(decoder_layers(teacher)) <= positions[-1]:
                raise ValueError("distill 'mse': the teacher has fewer blocks than the student's positions")
            self.student_hooks = BlockOutputs(student, positions, detach=False)
            self.teacher_hooks = BlockOutputs(teacher, positions, detach=True)

    @torch.no_grad()
    def teacher_logits(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        out = self.teacher(input_ids=input_ids, use_cache=False)
        return out.logits if "kl" in self.weights else None

    def terms(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None) -> dict[str, torch.Tensor]:
        terms = {}
        if "kl" in self.weights:
            terms["kl"] = kl_loss(student_logits, teacher_logits, self.temperature)
        if "mse" in self.weights:
            s, t = self.student_hooks.pop(), self.teacher_hooks.pop()
            terms["mse"] = torch.stack([F.mse_loss(s[i].float(), t[i].float()) for i in sorted(s)]).mean()
        return terms

    def close(self):
        for h in (self.student_hooks, self.teacher_hooks):
            if h is not None:
                h.remove()
