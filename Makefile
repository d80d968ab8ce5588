# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: venv demo test test-compat bench lint clean cuda-headers browser browser-if-possible ui figures kernel-report

$(STAMP): pyproject.toml constraints.txt setup.py
	$(PYTHON) -m venv $(VENV)
	# constraints.txt pins torch==2.13.0 (the CPU wheel): an unpinned torch pulls GBs of CUDA.
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m daam_fast.cli demo --out daam-out

# Headers of a CUDA build of torch (a venv under .cache/, never imported) for tests/test_cuda_build.py, which
# compiles csrc/ with nvcc. Does nothing without nvcc; the test then skips.
cuda-headers:
	@if command -v nvcc >/dev/null 2>&1; then ./scripts/cuda_build_env.sh >/dev/null; \
	else echo "cuda-headers: nvcc not found, skipping (the CUDA compile test will skip)"; fi

test: $(STAMP) cuda-headers browser-if-possible
	$(PY) -m pytest -q

# The core tests and `daam-fast demo` on other stacks (compat/*.txt: oldest supported diffusers/transformers,
# newest transformers 4.x, newest Triton), one venv each under .compat/; results in compat-out/summary.md.
test-compat:
	PYTHON=$(PYTHON) scripts/test_compat.sh

# The UI's browser test needs Chromium; where it cannot be installed (no root, no apt) that test skips.
browser-if-possible:
	@scripts/install_browser.sh >/dev/null 2>&1 || echo "browser: Chromium could not be installed; the UI browser test will skip"

# Headless Chromium + chromedriver for tests/test_ui.py's browser test (Debian packages, needs root).
browser:
	scripts/install_browser.sh

ui: $(STAMP)
	$(PY) -m daam_fast.cli ui

figures: $(STAMP)
	$(PY) scripts/make_readme_figures.py

# CPU benchmarks (minutes to an hour on 2 shared cores); prints the comparison tables, also written to bench-out/.
bench: $(STAMP)
	DAAM_FAST_BENCH_OUT=bench-out $(PY) -m pytest benchmarks -q --benchmark-only

# Registers, spills, shared memory and resident programs per SM of every GPU kernel variant the dispatcher can
# pick, for sm_75/80/86/89/90, compiled here without a GPU (Triton's own ptxas; nvcc -Xptxas -v for csrc/).
# Writes benchmarks/kernel_resources.json and the tables in docs/PERFORMANCE.md (~10 min on 2 cores).
kernel-report: $(STAMP)
	$(PY) -m benchmarks.kernel_report

lint: $(STAMP)
	$(PY) -m ruff check daam_fast tests benchmarks

clean:
	rm -rf $(VENV) .compat compat-out daam-out bench-out gpu-check-out build *.egg-info
