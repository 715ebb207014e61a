# shardkit developer targets. Each creates or reuses the virtualenv in .venv.
# torch and torchvision are pinned in constraints.txt (the builds this machine and CI carry on
# disk), and every install here goes through it; the package itself only asks for ranges
# (torch>=2.1 in its [torch] extra), so users elsewhere keep theirs.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The package's bytecode, brought up to date before each target runs it, as pip compiles an
# installed wheel's. Python writes it itself on first import unless PYTHONDONTWRITEBYTECODE is
# set; then every process a run starts (the forkserver, pool and DataLoader workers) compiles the
# package again, a tenth of a second each before it does any work.
BYTECODE := $(PY) -m compileall -q -j 0 shardkit

.PHONY: help demo test lint bench clean

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-7s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch torchvision
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,torch,dask]"
	touch $(STAMP)

demo: $(STAMP) ## make photo-like images, convert them, print info, write a preview, read back
	$(BYTECODE)
	$(PY) scripts/demo.py demo

test: $(STAMP) ## run the test suite
	$(BYTECODE)
	$(PY) -m pytest -q

# The scripts and examples are checked for what drifts when the package changes under them
# (missing attributes and modules, the names and number of arguments, return values), not held
# to the package's full strictness: argument types, annotations and untyped libraries are not checked.
SCRIPT_CHECKS := $(addprefix --disable-error-code=,arg-type no-any-return type-arg no-untyped-call \
	no-untyped-def import-untyped has-type misc unused-ignore)

lint: $(STAMP) ## ruff and mypy
	$(VENV)/bin/ruff check shardkit tests scripts examples
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy $(SCRIPT_CHECKS) scripts examples

bench: $(STAMP) ## conversion (local, Dask, into S3), reading (local, workers, remote), CSV, augmentation and Keras benchmarks (~40 min); write docs/performance.md
	$(BYTECODE)
	$(PY) scripts/bench_convert.py --out bench-out --write-doc docs/performance.md
	$(PY) scripts/bench_decode.py --out bench-out --write-doc docs/performance.md
	$(PY) scripts/bench_read.py --out bench-out/read --write-doc docs/performance.md
	$(PY) scripts/bench_workers.py --out bench-out/workers --write-doc docs/performance.md
	$(PY) scripts/bench_csv.py --out bench-out/csv --write-doc docs/performance.md
	$(PY) scripts/bench_dask.py --out bench-out --write-doc docs/performance.md
	$(PY) scripts/bench_remote_write.py --out bench-out --write-doc docs/performance.md
	$(PY) scripts/bench_augment.py --write-doc docs/performance.md
	$(PY) scripts/bench_keras.py --out bench-out/keras --write-doc docs/performance.md
	$(PY) scripts/bench_remote.py --out bench-out/remote --write-doc docs/performance.md
	-$(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())" && \
		$(PY) scripts/bench_augment.py --device cuda --rounds 20 --write-doc docs/performance.md

clean: ## remove the virtualenv, demo and benchmark output, caches
	rm -rf $(VENV) demo bench-out build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find shardkit -name __pycache__ -prune -exec rm -rf {} +
