# Two entry points for a newcomer: `make demo` and `make test`. Both create .venv on first use.
# `make test` is the full suite CI runs; `make test-fast` skips the multi-process/long tests (@pytest.mark.slow).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-lowest bench bench-peers gpu-check completions clean

# Reinstall when the dependency list changes; editable install, so code edits need nothing. The exact verified
# versions come from medvl/constraints.txt (pyproject.toml declares only ranges, for users' own GPU boxes).
$(STAMP): pyproject.toml medvl/constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c medvl/constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/medvl demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# The declared lower bounds: a second venv with every dependency at the lowest version pyproject.toml allows
# (medvl/constraints-lowest.txt; torch stays at the verified build), then the whole suite there.
test-lowest:
	test -x .venv-lowest/bin/python || $(PY) -m venv .venv-lowest
	.venv-lowest/bin/python -m pip install --quiet -c medvl/constraints-lowest.txt -e '.[dev]'
	HF_HUB_OFFLINE=1 .venv-lowest/bin/python -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m tests.bench.run_all

# medvl's training loop beside ms-swift's and LLaMA-Factory's, each in its own venv (install commands in
# tests/bench/vs_peers.py): make bench-peers SWIFT=VENV/bin/swift LLAMAFACTORY=VENV/bin/llamafactory-cli
# (or MEDVL_BENCH_SWIFT / MEDVL_BENCH_LLAMAFACTORY in the environment); says "skipped" when neither is given.
bench-peers: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m tests.bench.vs_peers $(if $(SWIFT),--swift $(SWIFT)) \
		$(if $(LLAMAFACTORY),--llamafactory $(LLAMAFACTORY))

# On a CUDA machine: bf16 full/LoRA/QLoRA steps of a 2-layer Qwen2.5-VL at the 7B's widths, packed vs padded,
# flash-attention, DeepSpeed ZeRO-2/3 on 2 GPUs, generation; PASS/FAIL/SKIP per case (tests/bench/gpu_check.py).
# bitsandbytes is optional (the QLoRA case SKIPs without it); 8 minutes at most.
gpu-check: $(STAMP)
	$(BIN)/python -m pip install --quiet bitsandbytes==0.50.2 || echo "bitsandbytes did not install: QLoRA will SKIP"
	HF_HUB_OFFLINE=1 timeout 480 $(BIN)/python -m tests.bench.gpu_check

completions: $(STAMP)
	$(BIN)/python -m medvl.commands.completion_gen completions

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
