# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU-only machine gets the CPU build of torch first (an unpinned torch pulls a multi-GB CUDA build).
TORCH_CPU ?= torch==2.13.0
# No TORCH_EXTENSIONS_DIR: nothing is JIT-compiled (rlhf_exp/dist.py keeps DeepSpeed from building
# its CPU shm comm op, which we never use), so make, direct `rlhf-exp` use and the tests agree.
export WANDB_MODE ?= offline
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup wheel demo test test-fast test-kernels lint bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q "$(TORCH_CPU)"; fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

wheel: setup  ## dist/rlhf_exp-*.whl: the package with its configs and example data, for `pip install`
	$(BIN)/python -m pip wheel -q --no-deps --no-build-isolation -w dist .

demo: setup  ## the main job on the offline default: SFT -> reward -> PPO on the tiny model
	$(BIN)/rlhf-exp experiment=demo

test: setup  ## the whole suite on this machine's CPU kernels (CI runs this), then the unit tier on the others
	$(BIN)/python -m pytest -q --durations=15 tests
	$(MAKE) test-kernels

test-fast: setup  ## the unit tier: no training run, no subprocess (tests/conftest.py)
	$(BIN)/python -m pytest -q -m "not slow" tests

# torch picks its CPU kernels (default, avx2, avx512) by the CPU: they split reductions
# differently, so a test comparing two computations bit-exactly passes on one machine and fails
# on another. The unit tier under the kernel sets this machine would not pick keeps every test
# green on any x86 machine (`make test` runs it after the suite).
KERNELS ?= default avx2
test-kernels: setup  ## the unit tier under each of torch's other CPU kernel sets
	set -e; for k in $(KERNELS); do echo "== ATEN_CPU_CAPABILITY=$$k"; \
		ATEN_CPU_CAPABILITY=$$k $(BIN)/python -m pytest -q -m "not slow" tests; done

lint: setup
	$(BIN)/ruff check rlhf_exp tests bench hydra_plugins

bench: setup
	$(BIN)/python bench/bench_generation.py --model tiny

clean:
	rm -rf outputs multirun .pytest_cache build dist
