"""Compile-only check of the CUDA sources, for machines without a GPU (CI, laptops).

    python csrc/check_cuda_compile.py [--archs "8.0;9.0;9.0a"] [--kernel-only] [--resources]

1. csrc/cuda/*.cu with nvcc, once per architecture (FLEXIGPT_CUDA_ARCHS, default "8.0;9.0",
   plus 9.0a always): the kernels include no PyTorch header, so this needs nvcc alone.
2. csrc/cuda/*.cpp (the binding) with the host compiler, syntax only, against the installed
   torch's headers and the CUDA toolkit's: catches API mistakes even when torch is a CPU-only
   build (whose wheel lacks c10/cuda/impl/cuda_cmake_macros.h; the check defines
   C10_CUDA_NO_CMAKE_CONFIGURE_FILE instead). Linking needs a CUDA torch: `pip install -e .`
   builds flexigpt_kernels._C_cuda there.
With --resources the kernels compile with `-Xptxas -v` and one line per kernel and
architecture is printed: `resource KERNEL sm_XX REGISTERS SPILL_BYTES SHARED_BYTES` (spill bytes
= spill stores + loads; aot_check.py folds these rows into its table).
Exit status 0 when everything compiled; prints one line per compilation.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")


def _nvcc() -> str:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if not found:
        sys.exit("check_cuda_compile: nvcc not found (put it on PATH or set CUDA_HOME)")
    return found


def _cuda_include(nvcc: str) -> str:
    """The toolkit's include folder: CUDA_HOME's, else nvcc's own (asked with --dryrun, which
    also sees through wrapper scripts), else /usr/local/cuda's."""
    candidates = [os.environ.get("CUDA_HOME") or "", os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    proc = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True)
    for line in (proc.stdout + proc.stderr).splitlines():
        if "TOP=" in line:
            candidates.insert(1, line.split("TOP=", 1)[1].strip())
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return os.path.join(home, "include")
    sys.exit("check_cuda_compile: cannot find the CUDA toolkit's include/cuda_runtime.h (set CUDA_HOME)")


def _run(cmd: list[str], what: str) -> tuple[bool, str]:
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    ok = proc.returncode == 0
    print(f"{'ok  ' if ok else 'FAIL'} {what} ({time.time() - start:.1f} s)", flush=True)
    if not ok:
        print(" ".join(cmd), proc.stdout, proc.stderr, sep="\n", file=sys.stderr)
    return ok, proc.stdout + proc.stderr


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    return out[: len(names)] if len(out) >= len(names) else names


def _short(name: str) -> str:
    """`void flexigpt::cuda::(anonymous namespace)::matvec_kernel<__half, 4>(...)` -> matvec_kernel<__half,4>"""
    name = name.split("(")[0] if "<" not in name else name[: name.rfind(">") + 1]
    return name.split("::")[-1].replace(" ", "")


def resource_lines(ptxas_log: str) -> list[str]:
    """`resource KERNEL sm_XX REGS SPILL_BYTES SHARED` from nvcc -Xptxas -v output."""
    entries, current = [], None
    for line in ptxas_log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
        if m:
            current = {"name": m.group(1), "arch": m.group(2), "spill": 0}
            entries.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["spill"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["regs"] = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(sm.group(1)) if sm else 0
    names = _demangle([e["name"] for e in entries])
    return [
        f"resource {_short(n)} {e['arch']} {e.get('regs', -1)} {e['spill']} {e.get('smem', 0)}"
        for n, e in zip(names, entries)
    ]


def compile_kernels(nvcc: str, archs: list[str], outdir: str, resources: bool = False) -> bool:
    ok = True
    for src in sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu"))):
        for arch in archs:
            num = arch.replace(".", "").replace("+PTX", "")
            cmd = [
                nvcc,
                "-std=c++20",
                "-O3",
                "--use_fast_math",
                "-c",
                src,
                "-o",
                os.path.join(outdir, f"{os.path.basename(src)}.{num}.o"),
                f"-gencode=arch=compute_{num},code=sm_{num}",
                "-Werror=all-warnings",
            ]
            if resources:
                cmd.append("-Xptxas=-v")
            good, log = _run(cmd, f"nvcc {os.path.relpath(src, ROOT)} sm_{num}")
            ok &= good
            if resources and good:
                print("\n".join(resource_lines(log)))
    return ok


def compile_binding(nvcc: str) -> bool:
    try:
        from torch.utils.cpp_extension import include_paths
    except ImportError:
        print("skip binding check: torch is not importable")
        return True
    cxx = os.environ.get("CXX", "c++")
    incs = include_paths() + [sysconfig.get_paths()["include"], _cuda_include(nvcc), CUDA_DIR]
    ok = True
    for src in sorted(glob.glob(os.path.join(CUDA_DIR, "*.cpp"))):
        cmd = [
            cxx,
            "-std=c++20",
            "-fsyntax-only",
            "-Wall",
            "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
            "-DTORCH_API_INCLUDE_EXTENSION_H",
            "-DTORCH_EXTENSION_NAME=_C_cuda",
            src,
        ]
        cmd += [f"-I{p}" for p in incs]
        ok &= _run(cmd, f"{cxx} -fsyntax-only {os.path.relpath(src, ROOT)} (torch + CUDA headers)")[0]
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=os.environ.get("FLEXIGPT_CUDA_ARCHS", "8.0;9.0"))
    parser.add_argument("--kernel-only", action="store_true", help="skip the binding check")
    parser.add_argument("--resources", action="store_true", help="print the ptxas -v resource table")
    args = parser.parse_args()
    archs = [a for a in args.archs.replace(",", ";").split(";") if a]
    if "9.0a" not in archs:
        archs.append("9.0a")
    nvcc = _nvcc()
    with tempfile.TemporaryDirectory() as outdir:
        ok = compile_kernels(nvcc, archs, outdir, args.resources)
        if not args.kernel_only:
            ok &= compile_binding(nvcc)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
