# make run   : set up .venv (idempotent) and run the closed-loop eval on the shipped Square checkpoint
# make test  : set up .venv (idempotent) and run the test suite
# make mutants: mutation testing (mutmut), each module against its own tests; MODULES="picard srds" for some
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
MUTANTS_STAMP := $(VENV)/.parapolicy-mutants-installed
MODULES ?=
ARGS ?=
# make run: 3 episodes per sampler (paraddpm vs the ddpm baseline, same seeds and noise), warm start and the
# fast path on, the robot not waiting for the policy (timing=async at this machine's measured latency), so
# success, stalls and task time show what the latency does here; the progress bar stays on
RUN_ARGS ?= n_episodes=3 sampler.warm_start=true fast_path=on timing=async latency=measured torch_threads=1

.PHONY: setup run test collect train bench gpu-wheels gpu-check clean-venv docs mutants

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: an unpinned torch may pull a multi-GB CUDA build
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

run: setup
	@echo "make run: a short look on this machine ($(RUN_ARGS)); the documented comparisons: README, benchmarks/RESULTS.md"
	$(PY) -m parapolicy.eval $(RUN_ARGS) $(ARGS)

# the tests also need the ray extra (tests/test_ray.py: ~240 MB installed, so `make run` goes without it)
$(RAY_STAMP): $(STAMP)
	$(PIP) install -q -e ".[test,ray]"
	touch $(RAY_STAMP)

test: setup $(RAY_STAMP)
	$(PY) -m pytest -q $(ARGS)

# mutation testing: a scratch copy per module under .mutants/ (the tree is never mutated), survivors in
# .mutants/<module>/survivors.txt; CPU hungry, so at low priority (python tests/mutants.py --list: the modules)
$(MUTANTS_STAMP): $(STAMP)
	$(PIP) install -q -e ".[test,mutants]"
	touch $(MUTANTS_STAMP)

mutants: setup $(RAY_STAMP) $(MUTANTS_STAMP)
	nice -n 10 $(PY) tests/mutants.py $(MODULES) $(ARGS)

collect: setup
	$(PY) -m parapolicy.collect $(ARGS)

train: setup
	$(PY) -m parapolicy.train $(ARGS)

bench: setup
	$(PY) -m parapolicy.bench $(ARGS)

# GPU check (scripts/gpu_check.py, docs/gpu.md). gpu-wheels: the pinned wheels a GPU machine lacks
# (scripts/gpu-requirements.txt) into .whl/, sizes reported; fails when the tree that travels plus the
# wheels would pass GPU_CAP_MIB (the device's limit is 64). gpu-check: on a GPU machine, from the
# checkout with .whl/ carried: `make gpu-check` (or `python3 scripts/gpu_check.py`); OUT=<dir>.
# DEVICE=cpu rehearses it here, in a clean venv holding only the GPU image's packages + the wheels.
WHEELS ?= .whl
GPU_CAP_MIB ?= 60
OUT ?= outputs/gpu_check
DEVICE ?= cuda
REHEARSAL_VENV ?= /tmp/parapolicy-gpu-rehearsal

gpu-wheels:
	$(PYTHON) scripts/gpu_check.py --fetch-wheels --wheels $(WHEELS) --cap-mib $(GPU_CAP_MIB)

ifeq ($(DEVICE),cpu)
gpu-check: setup
	$(PY) scripts/gpu_check.py --make-venv $(REHEARSAL_VENV)
	$(REHEARSAL_VENV)/bin/python scripts/gpu_check.py --device cpu --wheels $(WHEELS) --out $(OUT) $(ARGS)
else
gpu-check:
	$(PYTHON) scripts/gpu_check.py --device $(DEVICE) --wheels $(WHEELS) --out $(OUT) $(ARGS)
endif

# make test-lerobot: the real-lerobot suite (tests/lerobot_real/, docs/lerobot.md) in its own Python 3.12 venv
# with lerobot[pusht,diffusion,async]==0.6.1 (~5.7 GB: LeRobot's CUDA torch), parapolicy --no-deps, the
# lerobot_policy_parapolicy plugin and the pusht_gym test robot; offline, 127.0.0.1 only, bounded in time
LEROBOT_PYTHON ?= $(shell pyenv root 2>/dev/null)/versions/3.12.1/bin/python3.12
LEROBOT_VENV ?= $(HOME)/.cache/parapolicy/lerobot-venv
LEROBOT_STAMP := $(LEROBOT_VENV)/.parapolicy-lerobot-installed
LEROBOT_TIMEOUT_S ?= 2400
.PHONY: test-lerobot lerobot-venv

$(LEROBOT_STAMP): lerobot_plugin/pyproject.toml tests/lerobot_real/pusht_robot/pyproject.toml
	test -x $(LEROBOT_VENV)/bin/python || $(LEROBOT_PYTHON) -m venv $(LEROBOT_VENV)
	$(LEROBOT_VENV)/bin/pip install -q "lerobot[pusht,diffusion,async]==0.6.1" "pytest>=7"
	$(LEROBOT_VENV)/bin/pip install -q --no-deps -e . -e lerobot_plugin -e tests/lerobot_real/pusht_robot
	touch $(LEROBOT_STAMP)

lerobot-venv: $(LEROBOT_STAMP)

test-lerobot: $(LEROBOT_STAMP)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 timeout $(LEROBOT_TIMEOUT_S) $(LEROBOT_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/lerobot_real $(ARGS)

clean-venv:
	rm -rf $(VENV)

# the docs site: pages in docs/, the configuration reference generated from conf/ and the API reference
# from docstrings at build time (docs/_hooks/generated_pages.py, mkdocstrings); output in site/ (ignored)
$(DOCS_STAMP): $(STAMP)
	$(PIP) install -q -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict
