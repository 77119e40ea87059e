# Two commands set everything up on a fresh machine:
#   make demo   -- the main job (creates .venv if missing)
#   make test   -- the test suite (creates .venv if missing)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned to the releases that install from this machine's disk.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: venv demo test bench clean

$(BIN)/taxonomist: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/taxonomist

venv: $(BIN)/taxonomist

demo: venv
	$(BIN)/taxonomist demo

test: venv
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) .pytest_cache
