"""Run by test_fsdp2_gathers.py under torchrun with 2 processes: a tiny Llama pruned and wrapped
by shard(), adapters trainable; counts FSDP2's all-gathers per unit over one training step of 2
micro-batches (gradient sync on the last only, as heal() does) and over one forward without
gradients.

    fsdp2_gather_worker.py OUT MODEL   MODEL: interleaved or frozen_prefix (the *_model builders
                                       of tests/train/helpers.py); process 0 writes units, groups,
                                       counts and block sizes to OUT
"""

import sys

import torch

torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402

from flexigpt_kernels.train.params import select_trainable  # noqa: E402
from flexigpt_kernels.train.shard import count_all_gathers, fsdp_units, shard, sharing_groups  # noqa: E402
from tests.train import helpers  # noqa: E402

GRAD_ACCUM = 2

dist.init_process_group("gloo")
model = {"interleaved": helpers.interleaved_groups_model, "frozen_prefix": helpers.frozen_prefix_model}[sys.argv[2]]()
select_trainable(model, "adapters")
groups = sharing_groups(model)
block_bytes = {
    str(i): sum(p.numel() * p.element_size() for p in layer.parameters()) for i, layer in enumerate(model.model.layers)
}
shard(model)
units = fsdp_units(model)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
batch = helpers.token_data(2 * GRAD_ACCUM).view(GRAD_ACCUM, 2, -1)
with count_all_gathers(model) as step:
    for k in range(GRAD_ACCUM):
        model.set_requires_gradient_sync(k == GRAD_ACCUM - 1)
        model(input_ids=batch[k], labels=batch[k], use_cache=False).loss.backward()
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
            "block_bytes": block_bytes,
            "grad_accum": GRAD_ACCUM,
        },
        sys.argv[1],
    )
dist.destroy_process_group()
