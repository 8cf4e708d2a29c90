"""Run by test_fsdp2.py under torchrun with 2 processes: heal(fsdp=True) (FSDP2 over gloo, one
unit per sharing group) on a tiny pruned model.

    fsdp2_worker.py OUT full        4 steps; process 0 writes losses, eval, trained tensors and
                                    a save_pretrained of the gathered model (OUT.ckpt/)
    fsdp2_worker.py OUT kill CKDIR  checkpoint every 2 steps; every process dies (os._exit)
                                    right after the step-2 checkpoint is complete
    fsdp2_worker.py OUT resume CKDIR  resume from CKDIR's latest checkpoint to step 4
"""

import importlib
import os
import sys

import torch

torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402

from flexigpt_kernels.io import save_pretrained  # noqa: E402
from flexigpt_kernels.train import heal  # noqa: E402
from flexigpt_kernels.train.shard import full_state_dict, load_into_unsharded, parameter_memory_trace, sharing_groups  # noqa: E402
from tests.train.helpers import SEQ, tiny_pruned, token_data  # noqa: E402

out, mode = sys.argv[1], sys.argv[2]
ckdir = sys.argv[3] if len(sys.argv) > 3 else None
dist.init_process_group("gloo")
rank = dist.get_rank()
model = tiny_pruned(blocks=(1, 3))
groups = sharing_groups(model)
kwargs = dict(
    steps=4,
    lr=1e-2,
    seq_len=SEQ,
    batch_size=1,
    grad_accum=2,
    eval_data=token_data(5, seed=2),
    eval_chunks=5,
    progress=False,
    fsdp=True,
    trainable="adapters",
)
if mode == "kill":
    heal_module = importlib.import_module("flexigpt_kernels.train.heal")  # the package exports heal() by this name
    real_save = heal_module.save_checkpoint

    def save_then_die(runtime, checkpoint_dir, step, state, write_shards=None):
        path = real_save(runtime, checkpoint_dir, step, state, write_shards=write_shards)
        if step == 2:
            os._exit(0)  # as if killed: no cleanup, no further step
        return path

    heal_module.save_checkpoint = save_then_die
    heal(model, token_data(64), checkpoint_dir=ckdir, checkpoint_every=2, **kwargs)
    raise SystemExit("unreachable: the run should have died after the step-2 checkpoint")
report = heal(model, token_data(64), checkpoint_dir=ckdir, resume=mode == "resume", **kwargs)
with parameter_memory_trace(model) as trace, torch.no_grad():
    model(input_ids=token_data(1), use_cache=False)
full = full_state_dict(model)  # collective
trainable = {n for n, p in model.named_parameters() if p.requires_grad}
params = {n: t for n, t in full.items() if n in trainable}
if mode == "full":
    plain = load_into_unsharded(model, tiny_pruned(blocks=(1, 3)))  # collective too
    if rank == 0:
        save_pretrained(model, out + ".ckpt", state_dict=full)
        save_pretrained(plain, out + ".plain")
dist.barrier()
if rank == 0:
    torch.save(
        {
            "losses": report.losses,
            "eval": report.eval_perplexities,
            "world_size": report.world_size,
            "tokens": report.tokens_seen,
            "params": params,
            "groups": groups,
            "peak": trace.peak,
            "resumed_from": report.resumed_from,
        },
        out,
    )
dist.destroy_process_group()
