# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo test install bench clean

# chipwise itself: all `make demo` needs.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

# The test dependencies on top (pytest, transformers and PyTorch's CPU build, libtpu for TPU AOT compiles).
$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(DEV_STAMP)

install: $(STAMP)

# Trains the `tiny` preset on the Python standard library's own source, samples from it, exports it as a
# Hugging Face checkpoint and writes its HTML report.
demo: $(STAMP)
	$(VENV)/bin/chipwise train --config configs/demo.yaml --overwrite
	$(VENV)/bin/chipwise sample --run runs/demo --prompt "def get_" --max-new-tokens 120 --temperature 0.8 --top-k 40
	$(VENV)/bin/chipwise export --run runs/demo --out runs/demo-hf --overwrite
	$(VENV)/bin/chipwise report runs/demo --out runs/demo-report --overwrite

# Timing tests (the planner's CPU calibration) run alone afterwards, on one CPU device, so that the other test
# worker's load does not land in their measurements.
test: $(DEV_STAMP)
	XLA_FLAGS="--xla_force_host_platform_device_count=8" $(VENV)/bin/pytest -q -n 2 --dist loadfile --durations=30 -m "not timing"
	XLA_FLAGS="--xla_force_host_platform_device_count=1" $(VENV)/bin/pytest -q -s -p no:xdist --durations=10 -m timing

# The CPU benchmark against PyTorch (eager and torch.compile); installs the CPU wheel of torch.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/train_step.py --preset tiny --batch-size 16 --seq-len 256 --compare-torch

clean:
	rm -rf $(VENV) runs
