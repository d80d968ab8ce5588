# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: venv demo test bench lint clean cuda-headers browser ui figures

$(STAMP): pyproject.toml constraints.txt setup.py
	$(PYTHON) -m venv $(VENV)
	# constraints.txt pins torch==2.13.0 (the CPU wheel): an unpinned torch pulls GBs of CUDA.
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# Only for its CLIP BPE vocabulary file; --no-deps keeps torchvision out.
	$(PY) -m pip install -q --no-deps clip-anytorch==2.6.0
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m daam_fast.cli demo --out daam-out

# Headers of a CUDA build of torch (a venv under .cache/, never imported) for tests/test_cuda_build.py, which
# compiles csrc/ with nvcc. Does nothing without nvcc; the test then skips.
cuda-headers:
	@if command -v nvcc >/dev/null 2>&1; then ./scripts/cuda_build_env.sh >/dev/null; \
	else echo "cuda-headers: nvcc not found, skipping (the CUDA compile test will skip)"; fi

test: $(STAMP) cuda-headers
	$(PY) -m pytest -q

# Headless Chromium + chromedriver for tests/test_ui.py's browser test (Debian packages, needs root).
browser:
	scripts/install_browser.sh

ui: $(STAMP)
	$(PY) -m daam_fast.cli ui

figures: $(STAMP)
	$(PY) scripts/make_readme_figures.py

bench: $(STAMP)
	$(PY) -m pytest benchmarks -q --benchmark-only

lint: $(STAMP)
	$(PY) -m ruff check daam_fast tests benchmarks

clean:
	rm -rf $(VENV) daam-out build *.egg-info
