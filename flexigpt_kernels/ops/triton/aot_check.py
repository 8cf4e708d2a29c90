"""Ahead-of-time GPU compile check of every Triton kernel specialisation the launchers produce,
for sm_80 and sm_90a, on a machine without a GPU (`make gpu-compile`, run by CI).

    python -m flexigpt_kernels.ops.triton.aot_check [--full] [--jobs N] [--out DIR] [--no-cuda]

1. aot_specs.collect: the launchers run on a matrix of shapes/dtypes/flags with a recording
   stand-in for the launch; triton's binder turns each recorded launch into its signature,
   constexprs and divisibility attributes.
2. Each distinct specialisation is compiled with triton.compile(ASTSource(...), target=
   GPUTarget("cuda", 80 | 90, 32)) (90 compiles for sm_90a) in a process pool. triton's cache
   (TRITON_CACHE_DIR, default build/triton-aot-cache here) makes a rerun with unchanged kernels
   take seconds.
3. Resources from the cubin (cuobjdump --dump-resource-usage, bundled with triton): registers
   and the stack frame; where there is a frame, the spill bytes (stores + loads) come from
   triton's ptxas -v on the kernel's PTX. Shared memory from the compiled metadata, and the
   occupancy bound (resident warps per SM over 64, limited by registers, shared memory and
   threads).
4. The CUDA decode kernel's `-Xptxas -v` table (csrc/check_cuda_compile.py, when this runs
   from a source checkout with nvcc).
Fails (exit 1) on any compile error, shared memory over the architecture's opt-in limit, or
register spills in the default regimes (16-bit, ranks <= 256). Writes
benchmarks/results/gpu_compile.csv (one row per kernel, regime and target).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
ARCHS = (80, 90)
# per SM: 64K registers, 2048 threads, 32 blocks; shared memory per SM (bytes) and per block
REGS_PER_SM, THREADS_PER_SM, BLOCKS_PER_SM = 65536, 2048, 32
SMEM_PER_SM = {80: 167936, 90: 233472}


@dataclass
class Row:
    kernel: str
    regime: str
    target: str
    shared: int = -1
    registers: int = -1
    spills: int = -1
    num_warps: int = 0
    occupancy: float = 0.0
    default_regime: bool = False
    error: str = ""

    def problems(self) -> list[str]:
        from .configs import SMEM_LIMIT

        out = []
        if self.error:
            out.append(f"compile error: {self.error}")
            return out
        arch = 90 if self.target.startswith("sm_90") else 80
        if self.shared > SMEM_LIMIT[arch]:
            out.append(f"shared memory {self.shared} > {SMEM_LIMIT[arch]} bytes")
        if self.default_regime and self.spills > 0:
            out.append(f"{self.spills} bytes of register spills")
        return out


def occupancy(arch: int, regs: int, shared: int, warps: int) -> float:
    """Resident warps per SM / 64 (an upper bound: registers, shared memory, threads, blocks)."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    blocks = min(BLOCKS_PER_SM, THREADS_PER_SM // (32 * warps), REGS_PER_SM // (regs_per_warp * warps))
    if shared > 0:
        blocks = min(blocks, SMEM_PER_SM[arch] // (shared + 1024))  # 1 KB reserved per block
    return blocks * warps / 64


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resources(cubin: bytes) -> tuple[int, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if not match:
        raise RuntimeError(f"cuobjdump printed no resource usage: {text[:200]}")
    return int(match.group(1)), int(match.group(2))


def _spill_bytes(ptx: str, arch: int) -> int:
    """Spill stores + loads reported by `ptxas -v` for the kernel's PTX (run only when the cubin
    has a stack frame: a frame can also hold other locals)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            [
                get_ptxas(arch).path,
                "-v",
                "--regAllocOptLevel=2",
                f"--gpu-name={sm_arch_from_capability(arch)}",
                src,
                "-o",
                os.path.join(d, "k.o"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    found = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stdout + proc.stderr)
    return sum(int(a) + int(b) for a, b in found)


def _compile(job: tuple) -> tuple:
    """Worker: compile one specialisation; returns (shared, regs, stack, num_warps, error)."""
    module, name, arch, signature, constexprs, attrs, options = job
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .aot_specs import jit_of

    fn = jit_of(getattr(importlib.import_module(module), name))
    try:
        kernel = triton.compile(
            ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=options
        )
        regs, stack = _resources(kernel.asm["cubin"])
        spills = _spill_bytes(kernel.asm["ptx"], arch) if stack else 0
        return kernel.metadata.shared, regs, spills, kernel.metadata.num_warps, ""
    except Exception as exc:  # reported per row; the run fails at the end
        return -1, -1, -1, 0, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def compile_all(cases, jobs: int) -> list[Row]:
    from triton.backends.compiler import GPUTarget

    from .aot_specs import collect, specialise

    work, rows = [], []
    for arch in ARCHS:
        target = GPUTarget("cuda", arch, 32)
        for spec in collect(cases, target):
            signature, constexprs, attrs, options = specialise(spec.kernel, spec.args, spec.kwargs, target)
            work.append((spec.kernel.fn.__module__, spec.name, arch, signature, constexprs, attrs, options.__dict__))
            rows.append(
                Row(spec.name, spec.label, "sm_90a" if arch == 90 else "sm_80", default_regime=spec.case.default_regime)
            )
    print(f"{len(work)} specialisations to compile ({len(work) // len(ARCHS)} per target), {jobs} jobs", flush=True)
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for i, (row, (shared, regs, stack, warps, error), (_, _, arch, *_rest)) in enumerate(
            zip(rows, pool.map(_compile, work), work)
        ):
            row.shared, row.registers, row.spills, row.num_warps, row.error = shared, regs, stack, warps, error
            if not error:
                row.occupancy = occupancy(arch, regs, shared, warps)
            if (i + 1) % 25 == 0:
                print(f"  {i + 1}/{len(work)} compiled", flush=True)
    return rows


def cuda_rows() -> list[Row]:
    """The CUDA decode kernel's ptxas resources, from csrc/check_cuda_compile.py (source checkout)."""
    script = ROOT / "csrc" / "check_cuda_compile.py"
    if not script.exists():
        print("(no csrc/check_cuda_compile.py here: CUDA decode kernel table skipped)")
        return []
    import shutil

    if not (shutil.which("nvcc") or os.environ.get("CUDA_HOME")):
        print("(nvcc not found: CUDA decode kernel table skipped)")
        return []
    proc = subprocess.run(
        [sys.executable, str(script), "--kernel-only", "--resources", "--archs", "8.0"], capture_output=True, text=True
    )  # sm_80 and sm_90a (the script adds 9.0a)
    rows = []
    for line in proc.stdout.splitlines():
        if line.startswith("resource "):  # resource KERNEL TARGET REGS SPILL_BYTES SHARED
            _, kernel, target, regs, spills, shared = line.split()
            arch = int(re.sub(r"\D", "", target)[:2])
            rows.append(
                Row(
                    kernel,
                    "cuda decode fp16/bf16",
                    target,
                    int(shared),
                    int(regs),
                    int(spills),
                    4,
                    occupancy(arch, int(regs), int(shared), 4),
                    default_regime=True,
                )
            )
    if proc.returncode != 0:
        rows.append(Row("csrc/cuda", "cuda decode", "nvcc", error=(proc.stderr or proc.stdout).strip()[-300:]))
    return rows


COLUMNS = ("kernel", "regime", "target", "shared", "registers", "spills", "occupancy", "num_warps", "status")


def write(rows: list[Row], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_compile.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow(
                [
                    r.kernel,
                    r.regime,
                    r.target,
                    r.shared,
                    r.registers,
                    r.spills,
                    f"{r.occupancy:.2f}",
                    r.num_warps,
                    "; ".join(r.problems()) or "ok",
                ]
            )
    return path


def print_table(rows: list[Row]) -> None:
    print(f"{'kernel':34} {'regime':38} {'target':7} {'shared':>7} {'regs':>5} {'spill':>5} {'occ':>5}  status")
    for r in rows:
        print(
            f"{r.kernel:34} {r.regime:38} {r.target:7} {r.shared:7d} {r.registers:5d} {r.spills:5d} "
            f"{r.occupancy:5.2f}  {'; '.join(r.problems()) or 'ok'}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="every dtype at every rank (slower)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA decode kernel's table")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_CACHE_DIR", str(ROOT / "build" / "triton-aot-cache"))
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        print("aot_check: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)", file=sys.stderr)
        return 2
    from .aot_specs import default_cases

    start = time.time()
    rows = compile_all(default_cases(args.full), args.jobs)
    if not args.no_cuda:
        rows += cuda_rows()
    print_table(rows)
    path = write(rows, args.out)
    bad = [r for r in rows if r.problems()]
    worst = {t: max((r.shared for r in rows if r.target == t), default=0) for t in ("sm_80", "sm_90a")}
    print(
        f"\n{len(rows)} kernel/target rows, {len(bad)} failing; largest shared memory {worst}; "
        f"{time.time() - start:.0f} s with {args.jobs} jobs; CSV: {path}"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
