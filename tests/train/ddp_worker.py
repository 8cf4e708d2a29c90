"""Run by test_distributed.py under torchrun with 2 processes: heal() with DDP
(gloo) on a tiny pruned model; process 0 writes the losses, eval perplexities and trained tensors."""

import sys

import torch

torch.set_num_threads(1)

from accelerate import Accelerator  # noqa: E402

from flexigpt_kernels.train import heal  # noqa: E402
from tests.train.helpers import SEQ, tiny_pruned, token_data  # noqa: E402

out = sys.argv[1]
accelerator = Accelerator(cpu=True)
model = tiny_pruned()
report = heal(
    model,
    token_data(64),
    steps=4,
    lr=1e-2,
    seq_len=SEQ,
    batch_size=1,
    grad_accum=2,
    eval_data=token_data(5, seed=2),
    eval_chunks=5,
    progress=False,
    accelerator=accelerator,
)
# the shared base weight is still one tensor inside the DDP-wrapped model
shared = [m for m in model.modules() if type(m).__name__ == "SharedLoRALinear"]
assert all(m.weight is m.base.weight for m in shared)
if accelerator.is_main_process:
    torch.save(
        {
            "losses": report.losses,
            "eval": report.eval_perplexities,
            "world_size": report.world_size,
            "tokens": report.tokens_seen,
            "params": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        },
        out,
    )
accelerator.wait_for_everyone()
