# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv and install the package.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-fast install browser clean reference-model

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "braintumor needs Python >= 3.11"' \
		|| { echo "error: braintumor needs Python >= 3.11 (set PYTHON=python3.11)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/braintumor demo --out demo-run

browser:
	bash scripts/install_chromium.sh

test: $(STAMP) browser
	$(PY) scripts/run_tests.py

# The unit tier: every test not marked slow (slow = trains a model, starts processes or a browser; >= 1 s).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

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
	rm -rf $(VENV) demo-run runs .pytest_cache
