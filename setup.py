"""Build script for the optional compiled extensions of flexigpt_kernels.

Metadata lives in pyproject.toml; this file only decides which extensions to build.
The package works without any of them (Triton kernels or the PyTorch reference are used).

- ``flexigpt_kernels._C``: the ``flexigpt`` operator library (TORCH_LIBRARY: op schemas and
  CPU kernels) from every ``csrc/*.cpp`` (bindings) and ``csrc/cpu/*.cpp`` (kernels): a new
  source file there is picked up as it is. Built when those sources exist, torch is
  importable and a C++ compiler is found. Not a Python module: flexigpt_kernels/ops/library.py
  loads it with torch.ops.load_library.
- ``flexigpt_kernels._C_cuda``: the CUDA kernels of the same library (TORCH_LIBRARY_IMPL under
  the CUDA key) from ``csrc/cuda/*.cu`` (+ ``*.cpp``), loaded after ``_C``.
  Built when those sources exist, nvcc is found and torch is a CUDA build (no GPU needs to be
  visible: the architectures come from FLEXIGPT_CUDA_ARCHS).

Environment:
  FLEXIGPT_SKIP_CPU_BUILD=1    do not build the C++ extension
  FLEXIGPT_SKIP_CUDA_BUILD=1   do not build the CUDA extension
  FLEXIGPT_CUDA_ARCHS          CUDA architectures, e.g. "8.0;9.0" (the default), "9.0a", "8.6+PTX";
                               unset, TORCH_CUDA_ARCH_LIST is used when set
  FLEXIGPT_FORCE_CUDA_BUILD=1  the CUDA extension must be built: fail (instead of skipping it)
                               when it cannot be (no CUDA sources, no nvcc, a CPU-only torch)
  MAX_JOBS=N                   parallel compile jobs (ninja); defaults to the CPU count, at most 4

Install next to an existing torch with ``pip install --no-build-isolation -e .``.
"""

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _say(msg):
    print(f"flexigpt_kernels setup: {msg}", flush=True)


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def extensions():
    """Return (ext_modules, cmdclass), printing one line for each extension it skips."""
    cpu_sources = _rel(
        glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    )
    cuda_sources = _rel(
        glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))
    )
    if not cpu_sources and not cuda_sources:
        _say("no C++/CUDA sources in csrc/, building no extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        if _flag("FLEXIGPT_FORCE_CUDA_BUILD"):
            raise SystemExit(
                "flexigpt_kernels setup: FLEXIGPT_FORCE_CUDA_BUILD is set but torch is not "
                f"importable ({exc}); install a CUDA torch first and use --no-build-isolation"
            ) from None
        _say(
            f"skipping all extensions: torch is not importable ({exc}); "
            "install torch first and use --no-build-isolation"
        )
        return [], {}

    os.environ.setdefault("MAX_JOBS", str(min(4, os.cpu_count() or 1)))
    include_dirs = [os.path.join(ROOT, "csrc")]
    cxx_flags = ["-O3"]  # torch's build adds the C++ standard it needs
    ext_modules = []

    if not cpu_sources:
        _say("skipping CPU extension: no csrc/*.cpp sources")
    elif _flag("FLEXIGPT_SKIP_CPU_BUILD"):
        _say("skipping CPU extension: FLEXIGPT_SKIP_CPU_BUILD is set")
    elif shutil.which(os.environ.get("CXX", "c++")) is None:
        _say("skipping CPU extension: no C++ compiler found (set CXX or install g++)")
    else:
        ext_modules.append(
            cpp_extension.CppExtension(
                "flexigpt_kernels._C",
                cpu_sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags + ["-fopenmp"]},
                extra_link_args=["-fopenmp"],
            )
        )

    skip_cuda = None  # why the CUDA extension cannot or should not be built
    if not cuda_sources:
        skip_cuda = "no csrc/cuda/*.cu sources"
    elif _flag("FLEXIGPT_SKIP_CUDA_BUILD"):
        skip_cuda = "FLEXIGPT_SKIP_CUDA_BUILD is set"
    elif _nvcc(cpp_extension.CUDA_HOME) is None:
        skip_cuda = "nvcc not found (put it on PATH or set CUDA_HOME)"
    elif torch.version.cuda is None:
        skip_cuda = f"this torch ({torch.__version__}) is a CPU-only build"
    if skip_cuda is not None and _flag("FLEXIGPT_FORCE_CUDA_BUILD"):
        raise SystemExit(
            f"flexigpt_kernels setup: FLEXIGPT_FORCE_CUDA_BUILD is set but the CUDA extension "
            f"cannot be built: {skip_cuda}"
        )
    if skip_cuda is not None:
        _say(f"skipping CUDA extension: {skip_cuda}")
    else:
        archs = cuda_archs()
        _say(f"CUDA architectures: {';'.join(archs)} (FLEXIGPT_CUDA_ARCHS)")
        ext_modules.append(
            cpp_extension.CUDAExtension(
                "flexigpt_kernels._C_cuda",
                cuda_sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"] + gencode_flags(archs)},
            )
        )

    if not ext_modules:
        return [], {}
    _say("building " + ", ".join(e.name for e in ext_modules) + f" with MAX_JOBS={os.environ['MAX_JOBS']}")
    return ext_modules, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


def cuda_archs():
    """FLEXIGPT_CUDA_ARCHS (else TORCH_CUDA_ARCH_LIST, else "8.0;9.0") as a list like ["8.0", "9.0a"]."""
    spec = os.environ.get("FLEXIGPT_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
    archs = [a for a in spec.replace(",", ";").replace(" ", ";").split(";") if a]
    for a in archs:
        base = a[:-4] if a.endswith("+PTX") else a
        if not base.rstrip("af").replace(".", "", 1).isdigit():
            raise SystemExit(f"flexigpt_kernels setup: bad CUDA architecture {a!r} in FLEXIGPT_CUDA_ARCHS={spec!r}")
    return archs


def gencode_flags(archs):
    """nvcc -gencode flags: "9.0" -> sm_90 SASS, "9.0a" -> sm_90a, "8.6+PTX" -> sm_86 SASS + PTX.
    Passing them explicitly stops torch from adding its own architecture list."""
    flags = []
    for a in archs:
        ptx = a.endswith("+PTX")
        num = (a[:-4] if ptx else a).replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _nvcc(cuda_home):
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc")


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
