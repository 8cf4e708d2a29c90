"""Where the training step runs: one local process, or Hugging Face accelerate (DDP / FSDP).

Both runtimes offer the handful of operations heal() needs (prepare, autocast, backward,
no_sync, clip, step, reduce). heal() keeps its own data sharding, gradient accumulation and LR
schedule in both, so one process and N processes read the same global batch per optimizer step
and follow the same schedule.

Shared weights under wrapping:

- DDP: the model is replicated whole; a replacement layer reads its base block's weight through
  a module reference at forward time, which is the same tensor DDP broadcasts and (when it
  trains) all-reduces once. Sharing is untouched.
- FSDP2 (``heal(..., fsdp=True)`` under torchrun, or an accelerate FSDP2 config): the model is
  wrapped by :func:`.shard.shard`, one ``fully_shard`` unit per sharing group (a base block and
  every replacement block that reads it), every other block its own unit. Each process holds
  a shard of every unit and gathers a unit only while one of its blocks runs. Checkpoints are
  sharded (torch.distributed.checkpoint) and resume at another world size (see .sharded_state).
- accelerate on CPUs: accelerate (1.15) switches to FSDP only on an accelerator device (GPU,
  XPU, NPU, ...). With an FSDP config on a machine without one, ``accelerate launch`` starts the
  processes but each Accelerator runs alone (distributed_type NO, no process group): refused
  here with the remedy. With ``ACCELERATE_USE_CPU=true`` accelerate joins them over gloo
  (MULTI_CPU) and drops the FSDP plugin; when the launch config asks for FSDP2
  (``fsdp_version: 2``), heal() then shards by sharing group itself over that process group,
  with the config's settings (accelerate's FullyShardedDataParallelPlugin read from the
  launcher's environment), instead of the DDP accelerate would apply.
- FSDP1 (accelerate's default FSDP plugin): a SharedLoRALinear reads ``base.weight`` from the
  base *module* at forward time, and FSDP1 cannot group non-adjacent blocks into one unit, so
  only ``auto_wrap_policy="no_wrap"`` works (one unit, gathered whole: no memory saved);
  per-layer wrapping is refused on a model with replacement blocks. Use FSDP2. LoRA on kept
  blocks (``LoRALinear`` registers its base) has no such constraint.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from ..convert.replacement import replacement_blocks
from .shard import shard

MIXED_PRECISION = ("no", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class LocalRuntime:
    world_size, rank, is_main, is_fsdp, is_fsdp2 = 1, 0, True, False, False

    def __init__(self, device: torch.device, mixed_precision: str = "no"):
        self.device = device
        self.mixed_precision = mixed_precision
        self.scaler = torch.amp.GradScaler(device.type) if mixed_precision == "fp16" else None

    def prepare_model(self, model):
        """Wrap the model before its optimizer exists (FSDP2 replaces the parameters)."""
        return model

    def prepare(self, model, optimizer):
        return model, optimizer

    def unwrap(self, model):
        return model

    def autocast(self):
        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.mixed_precision])

    def no_sync(self, model):
        return contextlib.nullcontext()

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def clip(self, optimizer, params, max_norm: float | None) -> float:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if max_norm is None:
            norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
            return float(torch.stack(norms).norm()) if norms else 0.0
        return float(nn.utils.clip_grad_norm_(params, max_norm))

    def step(self, optimizer):
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def wait(self):
        pass

    def scaler_state(self):
        return None if self.scaler is None else self.scaler.state_dict()

    def load_scaler_state(self, state):
        if self.scaler is not None and state is not None:
            self.scaler.load_state_dict(state)


class AccelerateRuntime:
    def __init__(self, accelerator, mixed_precision: str = "no"):
        self.acc = accelerator
        self.mixed_precision = _check_accelerator_settings(accelerator, mixed_precision)
        self.device = accelerator.device
        self.world_size = accelerator.num_processes
        self.rank = accelerator.process_index
        self.is_main = accelerator.is_main_process
        self.is_fsdp = "FSDP" in str(accelerator.distributed_type)
        self.is_fsdp2 = self.is_fsdp and bool(getattr(accelerator, "is_fsdp2", False))

    def prepare_model(self, model):
        if not self.is_fsdp2:
            return model
        # accelerate leaves a model that is already an FSDPModule as it is (and maps the
        # optimizer's parameters by name); wrap by sharing group with the plugin's settings
        mesh = getattr(self.acc, "torch_device_mesh", None)
        if mesh is not None and self.acc.parallelism_config is not None:
            mesh = mesh[tuple(self.acc.parallelism_config.fsdp_dim_names)]
        return shard(model, mesh, **plugin_shard_kwargs(self.acc.state.fsdp_plugin))

    def prepare(self, model, optimizer):
        if self.is_fsdp and not self.is_fsdp2:
            check_fsdp_wrapping(model, self.acc)
        return self.acc.prepare(model, optimizer)

    def unwrap(self, model):
        return self.acc.unwrap_model(model)

    def autocast(self):
        return self.acc.autocast()

    def no_sync(self, model):
        return self.acc.no_sync(model)

    def backward(self, loss):
        self.acc.backward(loss)

    def clip(self, optimizer, params, max_norm: float | None) -> float:
        if max_norm is None:
            max_norm = float("inf")
        norm = self.acc.clip_grad_norm_(params, max_norm)
        return float(norm) if norm is not None else float("nan")

    def step(self, optimizer):
        optimizer.step()

    def reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        return self.acc.reduce(values.to(self.device), reduction="mean").cpu()

    def reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        return self.acc.reduce(values.to(self.device), reduction="sum").cpu()

    def wait(self):
        self.acc.wait_for_everyone()

    def scaler_state(self):
        scaler = getattr(self.acc, "scaler", None)
        return None if scaler is None else scaler.state_dict()

    def load_scaler_state(self, state):
        scaler = getattr(self.acc, "scaler", None)
        if scaler is not None and state is not None:
            scaler.load_state_dict(state)


class FSDP2Runtime(LocalRuntime):
    """FSDP2 over plain torch.distributed (torchrun): the model sharded by sharing group.

    Gradients are averaged over processes by FSDP2's reduce-scatter, so N processes reading
    1/N of the global batch each follow one process's run (the same rule as DDP)."""

    is_fsdp = is_fsdp2 = True

    def __init__(self, mesh=None, mixed_precision: str = "no", shard_kwargs: dict | None = None):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError(
                "heal(fsdp=...): torch.distributed is not initialised; start the script with "
                "torchrun (or call torch.distributed.init_process_group) first"
            )
        self.mesh = mesh
        self.shard_kwargs = shard_kwargs or {}
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        self.is_main = self.rank == 0
        device = torch.device("cpu")
        if mesh is not None and mesh.device_type != "cpu":
            device = torch.device(mesh.device_type, torch.accelerator.current_device_index())
        elif mesh is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        super().__init__(device, mixed_precision)

    def prepare_model(self, model):
        model.to(self.device)
        return shard(model, self.mesh, **self.shard_kwargs)

    def no_sync(self, model):
        @contextlib.contextmanager
        def skip_gradient_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return skip_gradient_sync()

    def clip(self, optimizer, params, max_norm: float | None) -> float:
        norm = nn.utils.clip_grad_norm_(params, float("inf") if max_norm is None else max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def _all_reduce(self, values: torch.Tensor, mean: bool) -> torch.Tensor:
        import torch.distributed as dist

        out = values.to(self.device).clone()
        dist.all_reduce(out)
        return (out / self.world_size if mean else out).cpu()

    def reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(values, mean=True)

    def reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(values, mean=False)

    def wait(self):
        import torch.distributed as dist

        dist.barrier()


def plugin_shard_kwargs(plugin) -> dict:
    """shard()'s settings from an accelerate FullyShardedDataParallelPlugin (FSDP2)."""
    return {
        "reshard_after_forward": plugin.reshard_after_forward,
        "mp_policy": plugin.mixed_precision_policy,
        "offload_policy": plugin.cpu_offload or None,
    }


def _check_accelerator_settings(accelerator, mixed_precision: str) -> str:
    """The accelerator's mixed precision, after the checks every accelerate route shares."""
    if accelerator.gradient_accumulation_steps != 1:
        raise ValueError(
            f"accelerator: gradient_accumulation_steps={accelerator.gradient_accumulation_steps}; heal() "
            "accumulates itself: create the Accelerator with 1 and pass grad_accum= to heal()"
        )
    acc_mp = str(accelerator.mixed_precision)
    if mixed_precision != "no" and mixed_precision != acc_mp:
        raise ValueError(
            f"mixed_precision={mixed_precision!r} but the accelerator uses {acc_mp!r}; set it on the Accelerator"
        )
    return acc_mp


def _accelerate_fsdp2_on_cpus(accelerator) -> bool:
    """True when an FSDP2 launch config runs on CPUs: accelerate joined the processes over gloo
    (MULTI_CPU) and dropped FSDP, so heal() shards by sharing group itself."""
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    fsdp_asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return fsdp_asked and kind == "MULTI_CPU" and os.environ.get("FSDP_VERSION") == "2"


def check_accelerate_launch(accelerator) -> None:
    """ValueError when the launch and the Accelerator disagree: FSDP asked for but not run (on CPUs
    accelerate silently drops it), or processes launched that accelerate did not join (each would
    train alone). The message says what to set."""
    if _accelerate_fsdp2_on_cpus(accelerator):
        return
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and kind != "FSDP":
        raise ValueError(
            f"accelerate was asked for FSDP but runs {kind} on {accelerator.num_processes} of {launched} "
            "launched processes: accelerate enables FSDP only on an accelerator device (GPU, XPU, NPU, ...). "
            "On CPUs set ACCELERATE_USE_CPU=true with an fsdp_version: 2 config (python/accelerate_fsdp2.yaml): "
            "accelerate then joins the processes over gloo and heal() shards with FSDP2 by sharing group; "
            "or start with torchrun and pass fsdp=True (flexigpt heal --fsdp)"
        )
    if launched > accelerator.num_processes:
        raise ValueError(
            f"{launched} processes were launched but the Accelerator runs {kind} with "
            f"{accelerator.num_processes}: each process would train alone. On CPUs set "
            "ACCELERATE_USE_CPU=true (gloo)"
        )


def accelerate_runtime(accelerator, mixed_precision: str = "no"):
    """heal()'s runtime for an accelerate.Accelerator: accelerate's own (DDP, FSDP2 by sharing
    group), or FSDP2 by sharing group over the gloo group accelerate started on CPUs when the
    launch config asks for FSDP2 (accelerate drops FSDP there). Refuses a launch whose
    processes accelerate did not join (check_accelerate_launch)."""
    check_accelerate_launch(accelerator)
    if _accelerate_fsdp2_on_cpus(accelerator):
        from accelerate.utils import FullyShardedDataParallelPlugin

        mp = _check_accelerator_settings(accelerator, mixed_precision)
        if mp not in ("no", "bf16"):
            raise ValueError(f"accelerate FSDP2 on CPUs: mixed_precision {mp!r} is not supported; use 'bf16' or 'no'")
        plugin = FullyShardedDataParallelPlugin()  # reads the launch config from the environment
        return FSDP2Runtime(None, mp, shard_kwargs=plugin_shard_kwargs(plugin))
    return AccelerateRuntime(accelerator, mixed_precision)


def check_fsdp_wrapping(model: nn.Module, accelerator) -> None:
    """Refuse FSDP1 auto-wrap policies that would split a replacement block from its base."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    policy = getattr(plugin, "auto_wrap_policy", None)
    if policy is not None and replacement_blocks(model):
        raise ValueError(
            "FSDP: this model has FlexiGPT replacement blocks that read their base block's weights at "
            "forward time; FSDP1's per-layer auto wrapping would hand them a sharded weight. Use FSDP2 "
            "(fsdp_version: 2 in the accelerate config: wrapped by sharing group), "
            "auto_wrap_policy='no_wrap' (one FSDP unit) or DDP."
        )


def make_runtime(model: nn.Module, accelerator=None, mixed_precision: str = "no", fsdp=None):
    """The runtime for heal(): accelerate's, FSDP2 over torch.distributed (fsdp=True or a
    DeviceMesh), or one local process."""
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
    if accelerator is not None and fsdp not in (None, False):
        raise ValueError(
            "pass either accelerator= or fsdp=, not both (an accelerate FSDP2 config already wraps by sharing group)"
        )
    if accelerator is not None:
        return accelerate_runtime(accelerator, mixed_precision)
    if fsdp not in (None, False):
        if mixed_precision == "fp16":
            raise ValueError("heal(fsdp=...): mixed_precision='fp16' is not supported; use 'bf16'")
        return FSDP2Runtime(None if fsdp is True else fsdp, mixed_precision)
    device = next(model.parameters()).device
    if mixed_precision == "fp16" and device.type == "cpu":
        raise ValueError("mixed_precision='fp16' needs a CUDA device; use 'bf16' on the CPU")
    return LocalRuntime(device, mixed_precision)
