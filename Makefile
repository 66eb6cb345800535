# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install the package.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Set to https://download.pytorch.org/whl/cpu for CPU-only torch wheels (about 200 MB instead of several GB of
# CUDA libraries) on a machine without an NVIDIA GPU; empty: PyPI's default wheels.
TORCH_INDEX ?=
# pytest-xdist workers for `make test` (each test file runs whole on one worker: its module fixtures are built
# once): one more than the CPU cores, since many tests wait on a subprocess, a server or a browser (on 2 idle cores,
# 2026-12-04: 7:13 with 3 workers against 7:51 with 2); PYTEST_WORKERS=0 runs the suite in this one process.
PYTEST_WORKERS ?= $(shell python3 -c 'import os; print((os.cpu_count() or 1) + 1)' 2>/dev/null || echo auto)
# The tests' temporary files (tiny runs write and fsync about 15 GB of checkpoints in all; pytest deletes each
# passing test's folder when it ends) go to a RAM-backed folder when there is one with 4 GiB free: on 2 cores,
# 2026-12-05, 5:55 of pytest against 7:46 on the disk. Empty: the system's temporary folder.
TEST_TMPDIR ?= $(shell python3 -c 'import os, shutil; d = "/dev/shm"; print(d if os.path.isdir(d) and os.access(d, os.W_OK) and shutil.disk_usage(d).free >= 4 << 30 else "")' 2>/dev/null)
PYTEST := $(if $(TEST_TMPDIR),TMPDIR=$(TEST_TMPDIR) )$(PY) -m pytest

.PHONY: demo test test-fast install browser docs clean reference-model

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "braintumor needs Python >= 3.11"' \
		|| { echo "error: braintumor needs Python >= 3.11 (set PYTHON=python3.11)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX),$(PY) -m pip install --quiet torch torchvision --index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/braintumor demo --out demo-run

browser:
	bash scripts/install_chromium.sh

# The whole suite in one pytest run (with its xdist workers); ends with pytest's own summary line and exit code.
test: $(STAMP) browser
	$(PYTEST) -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The unit tier: every test not marked slow (slow = trains a model, starts a process, server or browser, or
# takes a second or more on 2 cores).
test-fast: $(STAMP)
	$(PYTEST) -q -m "not slow" -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The documentation site (mkdocs.yml, docs/) into site/, offline; any warning (a broken link, a page missing from
# the navigation) fails the build. Also checks the links of README.md and MODEL_CARD.md.
DOCS_STAMP := $(VENV)/.docs-stamp

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(PY) scripts/check_links.py README.md MODEL_CARD.md
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

# The shipped reference model (MODEL_CARD.md), in two trainings on the real Training folder (about 50 + 45
# minutes on 2 idle cores): a teacher from the scratch-cpu recipe as it was then (128 px, 22 epochs, float32: the
# flags below pin those values), kept in float16 as the previous reference model was, then a student of the same
# size distilled from it on the same split (recipe distill), whose validated weights are kept in float16 inside
# the package. The exact teacher file used is in git history:
#   git show e8789b0:src/braintumor/reference/reference-resnet18.pt > runs/reference-teacher.pt
# and make skips the teacher's training when that file exists.
REAL_DATA ?= ../shared/data/brain-tumor-mri/Training
REFERENCE_RUN ?= runs/reference
REFERENCE_TEACHER ?= runs/reference-teacher.pt

$(REFERENCE_TEACHER): | $(STAMP)
	$(VENV)/bin/braintumor train $(REAL_DATA) --recipe scratch-cpu --image-size 128 --progressive-resize 0 \
		--epochs 22 --precision fp32 --seed 0 --out $(basename $@) --no-progress
	$(PY) scripts/make_reference_model.py $(basename $@) --tta off --out $@

reference-model: $(STAMP) $(REFERENCE_TEACHER)
	$(VENV)/bin/braintumor train $(REAL_DATA) --recipe distill --teacher $(REFERENCE_TEACHER) --seed 0 \
		--out $(REFERENCE_RUN) --no-progress
	$(PY) scripts/make_reference_model.py $(REFERENCE_RUN) --tta off

clean:
	rm -rf $(VENV) demo-run runs .pytest_cache site
