"""Where a benchmark runs and what it runs with: device name, versions, commit, output folder."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
from functools import cache
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parents[2]


def resolve_device(device: str | None) -> torch.device:
    """'cpu', 'cuda', 'cuda:1' or None (CUDA when available, else the CPU)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda, but no CUDA device is available here (torch.cuda.is_available() is False)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: {device!r}; only cpu and cuda are supported")
    return dev


@cache
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    """Human-readable name: the GPU's name, or the CPU model with the thread count used."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """File-name form of the device: 'nvidia-h200', 'cpu-amd-epyc'."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu {cpu_name()}"
    name = re.sub(r"\((r|tm)\)", "", name, flags=re.IGNORECASE)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug[:60] or device.type


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # triton is optional on CPU-only installs
        return "none"


@cache
def git_commit() -> str:
    """Short commit of the source tree (with '+dirty' when it has changes), FLEXIGPT_GIT_COMMIT
    if set, else 'unknown' (an installed package, or a copy without .git)."""
    if os.environ.get("FLEXIGPT_GIT_COMMIT"):
        return os.environ["FLEXIGPT_GIT_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=10", "HEAD"],
            cwd=_REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=_REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def run_metadata(device: torch.device) -> dict[str, str]:
    """The tags every result row carries."""
    now = _dt.datetime.now(_dt.timezone.utc)
    return {
        "run_id": now.strftime("%Y%m%dT%H%M%SZ"),
        "date": now.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "commit": git_commit(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
    }


def oversubscription_hint(device: torch.device) -> str | None:
    """A hint when the CPU is busier than it has cores and OpenMP threads spin at barriers: there
    a 2-thread op can wait a scheduler slice per parallel region (100x slower on a tiny model)."""
    if device.type != "cpu" or os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        return None
    try:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
    except OSError:
        return None
    if load <= cores:
        return None
    return (
        f"note: load average {load:.1f} on {cores} cores; with spinning OpenMP threads timings can be "
        "off by orders of magnitude. Rerun with OMP_WAIT_POLICY=PASSIVE in the environment "
        "(recorded in the results), or on a quiet machine."
    )


def default_results_dir() -> Path:
    """benchmarks/results of the source tree when running from one, else ./benchmarks/results."""
    if (_REPO / "benchmarks").is_dir() and (_REPO / "flexigpt_kernels").is_dir():
        return _REPO / "benchmarks" / "results"
    return Path.cwd() / "benchmarks" / "results"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
