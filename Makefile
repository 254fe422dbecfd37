PY ?= python3
VENV ?= .venv
# The versions this project is developed and tested with; pyproject.toml keeps ranges.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-all table bench results projunn results-fashion FORCE

# The pins the venv was installed with: rewritten (so re-installing) only when TORCH_PINS changes, in this file
# or on the command line; pyproject.toml's changes re-install through its own timestamp.
$(VENV)/.pins: FORCE
	@mkdir -p $(VENV)
	@echo '$(TORCH_PINS)' | cmp -s - $@ || echo '$(TORCH_PINS)' > $@

$(VENV)/.installed: pyproject.toml $(VENV)/.pins
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install $(TORCH_PINS) -e ".[test]"
	touch $@

# Train KromHC on the embedded digits dataset (CPU, a few minutes), then evaluate it with the stream diagnostics.
# Retrains from scratch each time, in output/demo_kromhc.
demo: $(VENV)/.installed
	rm -rf output/demo_kromhc
	$(VENV)/bin/python train.py -c configs/digits_kromhc.yaml --output output --experiment demo_kromhc
	$(VENV)/bin/python eval.py --model vit_micro_patch4_32_kromhc --checkpoint output/demo_kromhc/last.pth.tar \
		--diagnostics --output output/demo_kromhc/eval

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

# RESULTS.md's Fashion-MNIST section: depth study, n = 4 grid, n = 8 (needs `apt-get install dataset-fashion-mnist`
# or --dataset-download; finished runs in output/compare_fashion are reused, so it can be completed in parts).
results-fashion: $(VENV)/.installed
	$(VENV)/bin/python compare.py --dataset fashion_mnist

# projUNN (issue 19): its benchmark (step time against N and k, kept fraction, drift; BENCHMARKS.md's
# bench_projunn section, ~5 min), then the residual-free rows (plain, orthogonal) of the Fashion-MNIST depth study
# (RESULTS.md's fashion_mnist section; finished runs are reused).
projunn: $(VENV)/.installed
	OMP_NUM_THREADS=1 $(VENV)/bin/python benchmarks/bench_projunn.py --write-section
	OMP_NUM_THREADS=1 $(VENV)/bin/python compare.py --dataset fashion_mnist --parts depth --depth-rows plain orthogonal
