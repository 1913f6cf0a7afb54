# trainctl — the README's two commands are `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: venv demo test bench clean

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

# The whole test suite: real Ray, real SeaweedFS, real HTTP. pytest exits 5 when it collects no test,
# which fails this target (and CI) rather than passing silently.
test: venv
	$(BIN)/python -m pytest

bench: venv
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) data build *.egg-info
