# The front door: `make demo` trains, evaluates and samples the default small MoR model;
# `make test` runs the test suite. Both create or reuse .venv.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export DS_ACCELERATOR ?= cpu
export WANDB_MODE ?= offline
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_OFFLINE ?= 1
# OpenMP threads spin only briefly when idle (a second process on the cores otherwise slows
# both many times over): GOMP_SPINCOUNT and the thread count are picked by
# megamor.env.thread_defaults (every entry point, and each test worker) from the cores this
# process may use. Set OMP_NUM_THREADS / OMP_WAIT_POLICY / GOMP_SPINCOUNT to override.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
# resolved (a symlinked ../shared too): tests compare resolved paths
export MEGAMOR_DATA_DIR ?= $(or $(realpath $(CURDIR)/../shared/data),$(abspath $(CURDIR)/../shared/data))

.PHONY: venv test test-fast demo bench lint clean gpu-check gpu-wheels config-doc

# The stamp is rebuilt when setup.py or the constraints change.
$(VENV)/.installed: setup.py constraints.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# Both tiers run on pytest-xdist workers, one per usable core, a test file's tests on one worker
# (docs/testing.md). TEST_WORKERS=0 runs the tests in one process.
TEST_WORKERS ?= auto
XDIST = -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: venv
	$(VPY) -m pytest -q $(XDIST) tests $(PYTEST_ARGS)

# The fast tier: no training process, SLURM daemon or multi-process group (docs/testing.md).
test-fast: venv
	$(VPY) -m pytest -q $(XDIST) -m "not launch" tests $(PYTEST_ARGS)

demo: venv
	$(VPY) -m megamor.demo $(DEMO_ARGS)

bench: venv
	$(VPY) evals/bench_model.py

# GPU acceptance: parity then speed, one markdown report (runs/gpu_check/report.md); on a CPU
# use GPU_CHECK_ARGS=--tiny. On the GPU machine: evals/gpu_check_device.sh (after gpu-wheels).
gpu-check: venv
	$(VPY) -m megamor.gpu_check $(GPU_CHECK_ARGS)

# Wheels the GPU machine's image lacks (omegaconf, deepspeed, pydantic, ...) into .whl/.
gpu-wheels: venv
	bash evals/gpu_wheels.sh $(VPY)

lint: venv
	$(VPY) -m ruff check megamor tests evals data_prep launch notebooks

# docs/config.md from the config dataclasses (tests/test_config_doc.py fails when it is stale).
config-doc: venv
	$(VPY) -m megamor.config_doc

clean:
	rm -rf $(VENV) .cache .pytest_cache
