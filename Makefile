# Two commands for a fresh machine (both self-installing): `make demo` and `make test`.
PY := .venv/bin/python

.PHONY: setup setup-browser demo test test-slow test-all bench clean

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

clean:
	rm -rf .comfyui .venv .pytest_cache bench_out out
