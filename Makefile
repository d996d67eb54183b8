# The two commands a learner needs: `make lab` and `make test`. Both set up what is missing first.
#
# Set-up is idempotent: a stamp file records that .venv matches pyproject.toml, and `fetch`
# checks the weights' SHA-256 and downloads only what is missing or invalid.

PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.minigemma-installed
PORT    ?= 8888
PYTEST_ARGS ?=

.PHONY: lab test setup weights exercises bench bench-kernels bench-gpu mutation seed-sweep long-runs clean-venv help

help:
	@echo "make lab        set up if needed, then start JupyterLab on chapters/"
	@echo "make test       set up if needed, then run the whole test suite (notebooks included)"
	@echo "make exercises  regenerate exercises/ from solutions/"
	@echo "make bench      CPU generation benchmark on the real Gemma 3 270M"
	@echo "make mutation   mutation-test the exercise checks (mutmut); writes docs/mutation.md"
	@echo "make seed-sweep every check on its own solution over many seeds (a tolerance wrong on a few seeds)"
	@echo "make long-runs  chapters 08, 09 and 11's LONG runs on seeds 0-2, into docs/runs/ (about 2 hours on 2 cores)"
	@echo "make bench-kernels  Triton kernels vs torch eager/compile/Liger (a GPU; without one it says so)"
	@echo "make bench-gpu  on a lent GPU: kernel tests in bf16, the AOT check on this device, the kernel benchmarks"

setup: $(STAMP)

# torch is installed first and alone, pinned to the CPU build on this machine's disk; the
# reference packages for the parity tests come with the [test] extra. recurrentgemma pins
# numpy<2.4, so it is installed without its dependencies (the [test] extra lists the real ones).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test]'
	$(PY) -m pip install --no-deps 'recurrentgemma[torch]==1.0.1'
	touch $(STAMP)

weights: $(STAMP)
	$(PY) -m minigemma fetch all
	$(PY) -m minigemma.data fetch

lab: weights
	$(VENV)/bin/jupyter lab --allow-root --no-browser --port=$(PORT) --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/chapters

test: weights
	bash .ci/pytest.sh $(PYTEST_ARGS)

exercises: $(STAMP)
	$(PY) -m minigemma exercises

bench: weights
	$(PY) -m minigemma bench generate

# Liger-Kernel, the optional comparison, comes with the [bench] extra: .venv/bin/pip install -e '.[bench]'
bench-kernels: $(STAMP)
	$(PY) -m minigemma.kernels.bench --save docs/benchmarks

# Everything a GPU should run, written to docs/benchmarks/ with the commands (tools/bench_gpu.sh).
bench-gpu: $(STAMP)
	bash tools/bench_gpu.sh

# Mutation testing of the exercise checks: mutmut mutates a copy of the references in build/mutation/
# and runs each exercise's check on every mutant (tools/mutation/run.py); the table goes to docs/mutation.md.
mutation: $(STAMP)
	$(PY) tools/mutation/run.py --write-doc

# Every solution checked on seeds 0..39 (the kernels' on 0..5): a check whose tolerance fails a few seeds only
# shows up as a rare CI failure otherwise (tools/seed_sweep.py).
seed-sweep: $(STAMP)
	$(PY) tools/seed_sweep.py 40 $(filter-out solutions/12_% solutions/13_%,$(wildcard solutions/[0-9][0-9]_*.ipynb))
	$(PY) tools/seed_sweep.py 6 $(wildcard solutions/12_*.ipynb solutions/13_*.ipynb)

# The chapters' LONG runs on seeds 0, 1 and 2, the JSON their plots and tables read (tools/long_runs.py).
long-runs: weights
	$(PY) tools/long_runs.py ch08 --seeds 0 1 2
	$(PY) tools/long_runs.py ch09 --seeds 0 1 2
	$(PY) tools/long_runs.py ch11 --seeds 0 1 2

clean-venv:
	rm -rf $(VENV)
