"""Run by test_fsdp2_gathers.py under torchrun with 2 processes: a 6-block tiny Llama pruned so
that its two sharing groups interleave ({0, 3} and {1, 5}: far-apart members, another group's
block in between), wrapped by shard(); counts FSDP2's all-gathers per unit over one training
step of 2 micro-batches (gradient sync on the last only, as heal() does) and over one forward
without gradients.

    fsdp2_gather_worker.py OUT      process 0 writes units, groups, counts and unit sizes to OUT
"""

import sys

import torch

torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402

from flexigpt_kernels.train.params import select_trainable  # noqa: E402
from flexigpt_kernels.train.shard import count_all_gathers, fsdp_units, shard, sharing_groups  # noqa: E402
from tests.train.helpers import interleaved_groups_model, token_data  # noqa: E402

GRAD_ACCUM = 2

dist.init_process_group("gloo")
model = interleaved_groups_model()
select_trainable(model, "adapters")
groups = sharing_groups(model)
layers = model.model.layers
unit_bytes = {
    str(i): sum(p.numel() * p.element_size() for p in layer.parameters()) for i, layer in enumerate(layers)
}
shard(model)
units = fsdp_units(model)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
batch = token_data(2 * GRAD_ACCUM).view(GRAD_ACCUM, 2, -1)
with count_all_gathers(model) as step:
    for k in range(GRAD_ACCUM):
        model.set_requires_gradient_sync(k == GRAD_ACCUM - 1)
        ids = batch[k]
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
with count_all_gathers(model) as evaluation, torch.no_grad():
    model(input_ids=batch[0], use_cache=False)
if dist.get_rank() == 0:
    torch.save(
        {
            "groups": groups,
            "units": units,
            "step_calls": step.calls,
            "step_bytes": step.bytes,
            "eval_calls": evaluation.calls,
            "block_bytes": unit_bytes,
            "grad_accum": GRAD_ACCUM,
        },
        sys.argv[1],
    )
dist.destroy_process_group()
