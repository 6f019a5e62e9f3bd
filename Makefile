# Two entry points for a fresh clone: `make demo` and `make test`. Both build .venv on demand
# and reuse it while pyproject.toml is unchanged (the stamp file records the last install).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-slow bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml setup.cfg | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Compress the bundled Fashion-MNIST CNN (examples/README.md) to 50% of its FLOPs and print the report.
demo: $(STAMP)
	$(BIN)/specprune compress examples/fashion_cnn.pt --config configs/example.yaml --output out/demo --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# Every benchmark (hours on 2 cores the first time; models and results are cached in bench_cache/, or in
# $SPECPRUNE_BENCH_CACHE). The AIMET rows of bench_quality run in their own .venv-aimet, made here.
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	bash scripts/setup_aimet_venv.sh $(PYTHON)
	$(BIN)/python scripts/bench_spectral.py
	$(BIN)/python scripts/bench_quality.py
	$(BIN)/python scripts/bench_speed.py

clean:
	rm -rf $(VENV) build *.egg-info
