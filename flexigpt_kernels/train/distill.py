"""Distillation from the dense teacher during healing.

    kl     = T^2 * mean over tokens of KL(softmax(z_teacher / T) || softmax(z_student / T))
    mse    = mean over replacement blocks b of mean((h_student_b - h_teacher_b)^2)
    hidden = mean over every student block s and token t of
             ||h_student_s[t] - h_teacher_pos(s)[t]||^2 / ||h_teacher_pos(s)[t]||^2

h_b is the hidden state a decoder block returns, hooked at the same position b in student and
teacher (a FlexiGPT model keeps every block at its position). LLM-Streamline fits its
lightweight network with this MSE; here it is added to the end-to-end loss:
loss = lm_weight * LM + sum of weights[term] * term.

"hidden" matches every block, kept or replaced, with a per-token relative error (scale-free, so
the few huge-norm tokens of a residual stream do not dominate it). pos(s) is the teacher block
whose output student block s stands for: s itself when student and teacher have the same depth
(FlexiGPT), else the `positions` given (a dropped model: kept block s at its original index, so
ShortGPT + LoRA gets the same signal at the blocks it keeps).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..convert.families import decoder_layers
from ..convert.replacement import replacement_blocks

DISTILL_TERMS = ("kl", "mse", "hidden")


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


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean over tokens of ||student - teacher||^2 / ||teacher||^2, both [..., hidden]."""
    if student.shape != teacher.shape:
        raise ValueError(f"hidden_loss: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
    s, t = student.float(), teacher.float()
    return ((s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(eps)).mean()


def hidden_positions(student: nn.Module, teacher: nn.Module, positions=None) -> dict[int, int]:
    """{student block: teacher block} for the "hidden" term: `positions` (a mapping, or a
    sequence giving each student block's teacher block) when given, else the identity when
    both models have the same number of blocks. ValueError otherwise or when out of range."""
    n_s, n_t = len(decoder_layers(student)), len(decoder_layers(teacher))
    if positions is None:
        if n_s != n_t:
            raise ValueError(
                f"distill 'hidden': the student has {n_s} blocks and the teacher {n_t}; pass "
                "distill_positions (each student block's teacher block, e.g. the kept blocks' original indices)"
            )
        return {i: i for i in range(n_s)}
    pos = dict(positions) if isinstance(positions, dict) else dict(enumerate(positions))
    if len(pos) != n_s and not isinstance(positions, dict):
        raise ValueError(f"distill_positions: {len(pos)} entries for a student of {n_s} blocks")
    for s, t in pos.items():
        if not (0 <= int(s) < n_s and 0 <= int(t) < n_t):
            raise ValueError(f"distill_positions: {s} -> {t} is out of range (student {n_s} blocks, teacher {n_t})")
    return {int(s): int(t) for s, t in pos.items()}


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

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        weights: dict[str, float],
        *,
        temperature: float = 1.0,
        positions=None,
    ):
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
        self.hidden_map = self.hidden_student = self.hidden_teacher = None
        if "hidden" in weights:
            self.hidden_map = hidden_positions(student, teacher, positions)
            self.hidden_student = BlockOutputs(student, sorted(self.hidden_map), detach=False)
            self.hidden_teacher = BlockOutputs(teacher, sorted(set(self.hidden_map.values())), detach=True)

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
        if "hidden" in self.weights:
            s, t = self.hidden_student.pop(), self.hidden_teacher.pop()
            terms["hidden"] = torch.stack([hidden_loss(s[i], t[j]) for i, j in sorted(self.hidden_map.items())]).mean()
        return terms

    def close(self):
        for h in (self.student_hooks, self.teacher_hooks, self.hidden_student, self.hidden_teacher):
            if h is not None:
                h.remove()
