"""Run by test_accelerate_fsdp2.py under `accelerate launch --config_file
python/accelerate_fsdp2.yaml` with 2 CPU processes: heal(accelerator=Accelerator()) on a tiny
pruned model. Process 0 writes what accelerate set up, the FSDP2 units heal() made, the losses,
eval perplexities and trained tensors, and the all-gathers per unit of one more micro-step to OUT.

    accelerate_worker.py OUT
"""

import sys

import torch

torch.set_num_threads(1)

from accelerate import Accelerator  # noqa: E402
from accelerate.utils import FullyShardedDataParallelPlugin  # noqa: E402

from flexigpt_kernels.train import heal  # noqa: E402
from flexigpt_kernels.train.shard import count_all_gathers, fsdp_units, full_state_dict, sharing_groups  # noqa: E402
from tests.train.helpers import tiny_pruned, token_data  # noqa: E402
from tests.train.test_fsdp2 import KWARGS  # noqa: E402

accelerator = Accelerator()
model = tiny_pruned(blocks=(1, 3))
groups = sharing_groups(model)
# the one-process run's settings (test_fsdp2.KWARGS), half the batch on each of 2 processes
report = heal(model, token_data(64), accelerator=accelerator, **{**KWARGS, "batch_size": KWARGS["batch_size"] // 2})
units = fsdp_units(model)  # collective
full = full_state_dict(model)  # collective
# one more micro-step from rest, counting FSDP2's all-gathers per unit: the config's
# reshard_after_forward decides whether the backward gathers a unit again
model.reshard()  # the root stays gathered after heal()'s last (no-gradient) evaluation
ids = token_data(2)
with count_all_gathers(model) as gathers:
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
trainable = {n for n, p in model.named_parameters() if p.requires_grad}
plugin = FullyShardedDataParallelPlugin()  # the launch config, as accelerate reads it
if accelerator.is_main_process:
    torch.save(
        {
            "distributed_type": str(accelerator.distributed_type),
            "backend": torch.distributed.get_backend(),
            "fsdp_version": plugin.fsdp_version,
            "reshard_after_forward": plugin.reshard_after_forward,
            "groups": groups,
            "units": units,
            "gathers": gathers.calls,
            "losses": report.losses,
            "eval": report.eval_perplexities,
            "world_size": report.world_size,
            "tokens": report.tokens_seen,
            "params": {n: t for n, t in full.items() if n in trainable},
        },
        sys.argv[1],
    )
accelerator.wait_for_everyone()
