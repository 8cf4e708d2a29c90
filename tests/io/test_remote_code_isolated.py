"""Checkpoints loaded where flexigpt_kernels cannot be imported: stock transformers with
trust_remote_code (every family of the table, pruned and extended) and lm-evaluation-harness's
own command line, against fk.from_pretrained and `flexigpt eval` in this process.

The environment without the package: a fresh venv (``python -m venv --without-pip``, under a
second) whose only site-packages entry is a ``.pth`` line naming this venv's site-packages. A
path line in a ``.pth`` file adds the folder to sys.path but does not run the ``.pth`` files
inside it, so the editable install's finder (``__editable__.flexigpt_kernels-*.pth``) is never
installed; PYTHONPATH is removed and the child runs in a temporary folder, so neither the
checkout nor the current directory is on its path. The child asserts that
``importlib.util.find_spec("flexigpt_kernels") is None`` before it does anything. torch,
transformers and lm-eval are the very same installed files, so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from flexigpt_kernels.io import from_pretrained

from .test_remote_code import FAMILY_TYPES, ids, save_family

CHILD = r"""
import importlib.util, json, sys
assert importlib.util.find_spec("flexigpt_kernels") is None, "flexigpt_kernels is importable in the child"
import torch, transformers
from safetensors.torch import save_file

torch.set_num_threads(1)
spec = json.load(open(sys.argv[1]))
ids = torch.tensor(spec["ids"])
tensors, summary = {}, {}
for name, path in spec["checkpoints"].items():
    try:
        transformers.AutoModelForCausalLM.from_pretrained(path)
        refused = None
    except ValueError as e:
        refused = str(e)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    with torch.no_grad():
        tensors[name + ".logits"] = model(ids).logits.contiguous()
        tensors[name + ".tokens"] = model.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=8,
                                                   do_sample=False, pad_token_id=256).contiguous()
    summary[name] = {"class": type(model).__name__, "model_type": model.config.model_type, "refused": refused,
                     "fused": sys.modules[type(model).__module__].fused_shared_lora_linear is not None}
save_file(tensors, spec["tensors"])
json.dump(summary, open(spec["summary"], "w"))
"""

TASK_YAML = """\
task: tiny_mc_remote
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def clean_python(tmp_path_factory) -> Path:
    """A python that sees this venv's third-party packages but cannot import flexigpt_kernels."""
    root = tmp_path_factory.mktemp("no_flexigpt")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    (Path(purelib) / "parent_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def child_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        HF_MODULES_CACHE=str(tmp / "hf_modules"),
        HF_DATASETS_CACHE=str(tmp / "datasets"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family_ckpts")
    out = {t: save_family(t, root / f"{t}_pruned") for t in FAMILY_TYPES}
    out["llama_extended"] = save_family("llama", root / "llama_extended", method="extend")
    return out


@pytest.mark.slow
def test_stock_transformers_without_the_package(clean_python, checkpoints, tmp_path):
    x = ids(batch=2, length=7)
    spec = {
        "checkpoints": {k: str(v) for k, v in checkpoints.items()},
        "ids": x.tolist(),
        "tensors": str(tmp_path / "out.safetensors"),
        "summary": str(tmp_path / "summary.json"),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "child.py").write_text(CHILD)
    run = subprocess.run(
        [str(clean_python), str(tmp_path / "child.py"), str(tmp_path / "spec.json")],
        cwd=tmp_path,
        env=child_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    from safetensors.torch import load_file

    got, summary = load_file(spec["tensors"]), json.loads(Path(spec["summary"]).read_text())
    for name, path in checkpoints.items():
        config = json.loads((path / "config.json").read_text())
        info = summary[name]
        assert info["class"] == config["architectures"][0] and info["model_type"] == config["model_type"]
        assert not info["fused"]  # the plain-PyTorch path ran
        assert info["refused"] is not None and "trust_remote_code=True" in info["refused"]
        ours = from_pretrained(path)
        with torch.no_grad():
            want = ours(x).logits
            tokens = ours.generate(
                x[:1], attention_mask=torch.ones_like(x[:1]), max_new_tokens=8, do_sample=False, pad_token_id=256
            )
        torch.testing.assert_close(got[name + ".logits"], want, rtol=1e-5, atol=1e-5, msg=name)
        assert torch.equal(got[name + ".tokens"], tokens), name


@pytest.mark.slow
def test_lm_eval_cli_without_the_package_scores_as_flexigpt_eval(clean_python, checkpoints, tmp_path, capsys):
    rows = [
        {"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(2 * i + 1), "no"], "answer": i % 3}
        for i in range(12)
    ]
    data = tmp_path / "tiny_mc_remote.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = tmp_path / "tiny_mc_remote.yaml"
    task.write_text(TASK_YAML.format(data=data))
    path = checkpoints["llama"]
    run = subprocess.run(
        [
            str(clean_python),
            "-m",
            "lm_eval",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={path},trust_remote_code=True,dtype=float32",
            "--tasks",
            str(task),
            "--batch_size",
            "4",
            "--output_path",
            str(tmp_path / "lm_eval_out"),
        ],
        cwd=tmp_path,
        env=child_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    results = sorted((tmp_path / "lm_eval_out").rglob("results_*.json"))
    assert results, run.stdout[-2000:]
    theirs = json.loads(results[-1].read_text())["results"]["tiny_mc_remote"]

    from flexigpt_kernels.cli import main

    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                str(path),
                "--data",
                "none",
                "--tasks",
                str(task),
                "--baseline",
                "none",
                "--task-batch-size",
                "4",
                "--json",
            ]
        )
        == 0
    )
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["model"]["tasks"]["tiny_mc_remote"]
    assert theirs["acc,none"] == ours["acc"] and theirs["acc_norm,none"] == ours["acc_norm"]
    assert ours["num_samples"] == 12
