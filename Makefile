# Two commands for a newcomer:  `make demo`  and  `make test`.
# Both create ./.venv on first use. TORCH_SPEC installs torch before the project, so that
# `pip install -e .` finds it satisfied (set TORCH_SPEC= to keep a torch you already have).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# the test suite runs in this many processes (pytest-xdist; a test file stays in one), one torch
# thread each: about half the wall time on two cores. TEST_WORKERS=0 runs it in this process
TEST_WORKERS ?= 2
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hypergrad-installed

.PHONY: demo test bench install clean gpu-wheels

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[demo,test,refs]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) experiments/digits_weight_decay.py

test: $(STAMP)
	$(PY) -m ruff check hypergrad tests benchmarks experiments
	$(PY) -m mypy
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(PY) benchmarks/hyperstep.py

# The peers as wheels for the GPU machine's Python 3.12 (nothing can be downloaded there):
# name .whl in the device call's carry; benchmarks/gpu.sh installs them.
WHEEL_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64,--platform $(p))
gpu-wheels:
	mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(WHEEL_PLATFORMS) -d .whl torchopt==0.7.3 higher==0.2.1 optree graphviz

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
