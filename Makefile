# Everything a fresh machine (Python 3.11 + pip) needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned: an unpinned torch resolves to a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test bench bench-train parity finetune-demo clean data-demo data-quality

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.base: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.base
	$(BIN)/phi3 fetch
	$(BIN)/phi3 chat

# The chat page's browser test drives Debian's chromium through Playwright (no browser download).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
$(CHROMIUM):
	-DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null 2>&1 || \
	  (DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get update -qq && \
	   DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null) || \
	  echo "make: could not install chromium; tests/test_web.py will be skipped"

# tests/test_kernels_arm.py cross-compiles the kernels for aarch64 and runs them under qemu.
QEMU_AARCH64 := /usr/bin/qemu-aarch64
$(QEMU_AARCH64):
	-DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq g++-aarch64-linux-gnu qemu-user >/dev/null 2>&1 || \
	  (DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get update -qq && \
	   DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq g++-aarch64-linux-gnu qemu-user >/dev/null) || \
	  echo "make: could not install g++-aarch64-linux-gnu and qemu-user; tests/test_kernels_arm.py's ARM tests will be skipped"

test: $(VENV)/.test $(CHROMIUM) $(QEMU_AARCH64)
	$(BIN)/phi3 fetch
	$(BIN)/python -m pytest -q --durations=25

$(VENV)/.bench: $(VENV)/.test
	$(BIN)/python -m pip install -q -e ".[test,bench]"
	touch $@

# llama.cpp built for AVX2 only (no AVX-512), to compare phi3's avx2 kernels with what llama.cpp
# runs on an AVX2 laptop; a venv of its own, since llama-cpp-python compiles for one instruction set.
LLAMA_AVX2 := .venv-llama-avx2
$(LLAMA_AVX2)/.done:
	$(PYTHON) -m venv $(LLAMA_AVX2)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF -DLLAMA_CURL=OFF" \
	  $(LLAMA_AVX2)/bin/pip install -q llama-cpp-python==0.3.36 numpy
	touch $@

bench: $(VENV)/.bench
	$(BIN)/phi3 fetch
	$(BIN)/python benchmarks/bench_decode.py --write BENCHMARKS.md
	$(BIN)/python benchmarks/bench_llama_cpp.py --write BENCHMARKS.md
	if grep -qw avx2 /proc/cpuinfo; then $(MAKE) $(LLAMA_AVX2)/.done && \
	  $(BIN)/python benchmarks/bench_llama_cpp.py --phi3-kernels avx2 --llama-python $(LLAMA_AVX2)/bin/python \
	    --files q4_0,q4_k_m --only-speed --skip-medium --write BENCHMARKS.md; fi
	$(BIN)/python benchmarks/bench_serve.py --write BENCHMARKS.md
	$(BIN)/python benchmarks/lm_eval_parity.py --tasks arc --mc-limit 200 --out parity-results/speed --write-speed BENCHMARKS.md

# phi3 eval against lm-evaluation-harness: 200 multiple-choice items, 100 per generation task
# (GSM-8K, three BBH subtasks); about an hour on 2 cores, most of it lm-eval's generation.
parity: $(VENV)/.test
	$(BIN)/phi3 fetch
	$(BIN)/python benchmarks/lm_eval_parity.py --write EVALUATION.md

# SFT then DPO of the real SmolLM2-135M-Instruct with `phi3 train` (a new identity, refusals), then the
# base and the fine-tuned model side by side: answers, GSM-8K and the ARC-layout set.
# recipes/finetune-demo/README.md; the measured run is recipes/finetune-demo/RESULT.md (rewritten; its
# hand-written part below the marker line is kept). ~35 min on 2 busy cores; on a machine loaded far
# beyond its cores: make finetune-demo FINETUNE_ARGS="--threads 1".
FINETUNE_ARGS ?=
finetune-demo: $(VENV)/.base
	$(BIN)/python benchmarks/finetune_demo.py --summary recipes/finetune-demo/RESULT.md $(FINETUNE_ARGS)

clean:
	rm -rf $(VENV) $(LLAMA_AVX2) build *.egg-info

# Training throughput: phi3 train against HF Trainer, litgpt and nanoGPT on one token stream -> TRAINING.md
# (~4-7 min on an idle machine). litgpt needs its own venv and nanoGPT its source (each skipped with
# one line when missing; benchmarks/train_throughput.py --help says how to set them up).
bench-train: $(VENV)/.test
	$(BIN)/python benchmarks/train_throughput.py --quick --write TRAINING.md

# The data recipe end to end on real offline text: Debian documentation packages (apt-get download)
# packed as WARC, SmolLM2 as judge and generator, `phi3 data run` to phase-1/phase-2 token shards,
# written up in DATA.md with the measured numbers (benchmarks/data_demo.py; about 20-40 min on 2 cores).
data-demo: $(VENV)/.test
	$(BIN)/phi3 fetch
	$(BIN)/python benchmarks/data_demo.py --write DATA.md

# EXPERIMENTS.md: tiny models trained on the raw crawl and on phase 1 then 2, same tokens (after
# make data-demo; ~6 runs x 3 CPU-minutes).
data-quality: $(VENV)/.test
	$(BIN)/python benchmarks/data_quality_experiment.py --data-out $(HOME)/.cache/phi3/data-demo/run --judged-by "make data-demo's SmolLM2 judge"
