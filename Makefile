# Set-up and everyday commands. `make test` and `make demo` set up on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fxlava-setup

.PHONY: setup demo test test-all clean

setup: $(STAMP)

# One stamp for the whole environment: a second `make setup` does nothing until a pin changes.
$(STAMP): pyproject.toml requirements/torch.txt requirements/base.txt requirements/nodeps.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements/torch.txt -r requirements/base.txt
	# Lava and SpikingJelly: their declared requirements conflict (see requirements/nodeps.txt).
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --ignore-requires-python -r requirements/nodeps.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	$(BIN)/python -c "import fxlava, lava.lib.dl.slayer, lava.lib.dl.netx, spikingjelly.activation_based.lava_exchange"
	touch $(STAMP)

# The main job: the tutorial's trained MNIST CSNN -> netx file -> Lava, with out/demo/rasters.png.
demo: setup
	$(BIN)/python -m fxlava.examples.demo --out-dir out/demo

test: setup
	$(BIN)/python -m pytest

test-all: setup
	$(BIN)/python -m pytest -m ''

clean:
	rm -rf $(VENV) build *.egg-info
