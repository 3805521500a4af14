# make run   : set up .venv (idempotent) and run the closed-loop eval on the shipped Square checkpoint
# make test  : set up .venv (idempotent) and run the test suite
# make docs  : build the docs site (mkdocs.yml) into site/, strict: a broken link or API reference fails
# GPU users: make run TORCH_SPEC="torch==2.11.0" (or any CUDA build); the default is the CPU build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python
STAMP := $(VENV)/.parapolicy-installed
RAY_STAMP := $(VENV)/.parapolicy-ray-installed
DOCS_STAMP := $(VENV)/.parapolicy-docs-installed
ARGS ?=

.PHONY: setup run test collect train bench clean-venv docs

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: an unpinned torch may pull a multi-GB CUDA build
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

run: setup
	$(PY) -m parapolicy.eval $(ARGS)

# the tests also need the ray extra (tests/test_ray.py: ~240 MB installed, so `make run` goes without it)
$(RAY_STAMP): $(STAMP)
	$(PIP) install -q -e ".[test,ray]"
	touch $(RAY_STAMP)

test: setup $(RAY_STAMP)
	$(PY) -m pytest -q $(ARGS)

collect: setup
	$(PY) -m parapolicy.collect $(ARGS)

train: setup
	$(PY) -m parapolicy.train $(ARGS)

bench: setup
	$(PY) -m parapolicy.bench $(ARGS)

clean-venv:
	rm -rf $(VENV)

# the docs site: pages in docs/, the configuration reference generated from conf/ and the API reference
# from docstrings at build time (docs/_hooks/generated_pages.py, mkdocstrings); output in site/ (ignored)
$(DOCS_STAMP): $(STAMP)
	$(PIP) install -q -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict
