# trainctl — the README's two commands are `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: venv browser-deps demo test test-fast lint bench clean

# The venv is rebuilt whenever pyproject.toml changes. torch/torchvision come from this machine's disk.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q -e '.[all,dev]'
	touch $(STAMP)

venv: $(STAMP)

# Start the service on the embedded default (local Ray head + ./data/storage), run the demo job,
# watch it, fetch its best checkpoint, stop the service.
demo: venv
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/demo.sh

# Debian's chromium + chromium-driver for the browser tests, when missing (needs root; else they skip).
browser-deps:
	bash scripts/browser-deps.sh

# The whole test suite: real Ray, real SeaweedFS, real HTTP. pytest exits 5 when it collects no test,
# which fails this target (and CI) rather than passing silently. TEST_WORKERS pytest-xdist workers take the
# tests one at a time, except the files whose module fixture is a live cluster, which go to one worker whole
# (tests/plugins/schedule.py, which says why). Emulated-host tests run side by side (tests/hosts.py takes
# subnets under a lock). Whole files for everything (`--dist loadfile`) was tried: the heavy files met at the
# end, 30:44, and a spot-loss test timed out under load 38; 2 and 4 workers were slower than 3, and so was
# handing every heavy test out before the unit tests; only tests/trainer/'s, collected last, go out before its
# unit tests, which then fill the last minutes (bench/RESULTS.md).
TEST_WORKERS ?= 3
test: venv browser-deps
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist load

# The edit loop: the unit tests only — no Ray cluster, no S3 server, no subprocess importing torch, no
# package install (markers in pyproject.toml). About a minute on 2 cores.
FAST_MARKERS := not ray and not s3 and not install and not slow and not cluster
test-fast: venv
	$(BIN)/python -m pytest -m "$(FAST_MARKERS)" -q

# Lint, format check and types (configured in pyproject.toml). `.ci/run` runs this before the tests.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: venv
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) data build *.egg-info
