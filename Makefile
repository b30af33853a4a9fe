# Two commands for a fresh machine (both self-installing): `make demo` and `make test`.
PY := .venv/bin/python

.PHONY: setup demo test test-slow test-all bench clean

# Idempotent: builds .venv/ and .comfyui/ on the first run, checks them in seconds afterwards.
setup:
	bash scripts/setup_env.sh

# Main job: the embedded ComfyUI runs the shipped SiTo workflow with and without pruning.
# CHECKPOINT=/path/to/model.safetensors uses a real SD1.5 checkpoint.
demo: setup
	$(PY) scripts/demo.py $(if $(CHECKPOINT),--checkpoint "$(CHECKPOINT)") $(if $(STEPS),--steps $(STEPS))

test: setup
	$(PY) -m pytest -m "not slow" -q

test-slow: setup
	$(PY) -m pytest -m "slow" -q

test-all: test test-slow

bench: setup
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

clean:
	rm -rf .comfyui .venv .pytest_cache bench_out out
