PY ?= python3
VENV ?= .venv
# The versions this project is developed and tested with; pyproject.toml keeps ranges.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-all table bench results

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install $(TORCH_PINS) -e ".[test]"
	touch $@

# Train and evaluate KromHC on the embedded digits dataset (CPU, a few minutes).
demo: $(VENV)/.installed
	$(VENV)/bin/python train.py -c configs/digits_kromhc.yaml

# The test suite CI runs (slow tests excluded; `make test-all` includes them).
test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -m "not slow"

test-all: $(VENV)/.installed
	$(VENV)/bin/python -m pytest

table: $(VENV)/.installed
	$(VENV)/bin/python -m kromhc_vision table

bench: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/bench_trunk_cpu.py

# Regenerate RESULTS.md, results/*.png and BENCHMARKS.md: every variant, n = 2, 4, 8, 3 seeds (CPU: ~30 min).
results: $(VENV)/.installed
	$(VENV)/bin/python compare.py
