# Two commands for a fresh machine (both self-installing): `make demo` and `make test`.
PY := .venv/bin/python

.PHONY: setup setup-browser demo test test-slow test-all bench gpu-carry gpu-check clean

# Idempotent: builds .venv/ and .comfyui/ on the first run, checks them in seconds afterwards.
setup:
	bash scripts/setup_env.sh

# Idempotent: Debian's chromium + chromium-driver and a pinned selenium in .venv, for the
# real-browser test of the shipped workflows (tests/e2e/test_browser.py, marked slow).
setup-browser: setup
	bash scripts/setup_browser.sh

# Main job: the embedded ComfyUI runs the shipped SiTo workflow with and without pruning.
# CHECKPOINT=/path/to/model.safetensors uses a real SD1.5 checkpoint.
demo: setup
	$(PY) scripts/demo.py $(if $(CHECKPOINT),--checkpoint "$(CHECKPOINT)") $(if $(STEPS),--steps $(STEPS))

test: setup
	$(PY) -m pytest -m "not slow" -q

test-slow: setup setup-browser
	$(PY) -m pytest -m "slow" -q

test-all: test test-slow

bench: setup
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

# The GPU check's carry folder .gpu_carry/ (ComfyUI tree + torchsde/trampoline/psutil wheels for
# CPython 3.12), for a GPU machine whose python has torch but none of ComfyUI's other requirements.
gpu-carry: setup
	bash scripts/gpu_carry.sh

# On a CUDA GPU: every method at SD1.5 512/1024 px and SDXL 1024 px, fp16, SDPA (docs/gpu.md); stops
# with exit status 3 where there is no GPU. GPU_CHECK_ARGS=--cpu-dry-run tests the bootstrap on the CPU.
gpu-check:
	PYTHON="$${PYTHON:-$$( [ -x $(PY) ] && echo $(PY) || echo python3 )}" bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf .comfyui .venv .pytest_cache bench_out out
