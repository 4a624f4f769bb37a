# The two commands a fresh machine needs: `make demo` and `make test` (README).
PYTHON    ?= python3
VENV      := .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed-requirements
# Paths and names from their one home (common/paths.py, common/layout.py), read when a recipe runs,
# i.e. after the venv exists.
common     = $(shell $(PY) -c 'import os; from common import layout, paths; print($(1))')
DEMO_DIR   = $(call common,os.path.relpath(paths.DEMO_MODEL_DIR))
MODEL_DIR ?= $(call common,os.path.relpath(paths.MODEL_DIR))
# Step 3 needs only the attention projections (and their biases, when a model has them).
ATTN_FILTER = '$(call common,layout.ATTENTION_FILTER)'

.PHONY: venv demo pipeline steps test bench bench-full clean-outputs

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# Offline: build the demo model, then run steps 1 -> 2 -> 3 on it and print the verification table.
demo: $(STAMP)
	$(PY) 0_download_models.py --demo
	$(MAKE) --no-print-directory steps MODEL_DIR=$(DEMO_DIR)

# Llama-3.2 from the Hub (needs HF_TOKEN with access): make pipeline [MODEL_DIR=model_paths/<org>_<name>]
pipeline: $(STAMP)
	$(PY) 0_download_models.py
	$(MAKE) --no-print-directory steps MODEL_DIR=$(MODEL_DIR)

steps: $(STAMP)
	$(PY) 1_model_weights.py --model-dir $(MODEL_DIR) --filter $(ATTN_FILTER)
	$(PY) 2_get_x.py --model-dir $(MODEL_DIR)
	$(PY) 3_offline_qkv.py --model-dir $(MODEL_DIR)

test: $(STAMP)
	$(PY) -m pytest -q tests

# Each benchmark prints its measurements and ratios, and exits 1 when it misses a goal.
bench: $(STAMP)
	@fail=0; for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || fail=1; done; exit $$fail

# Also export a random model with exactly Llama-3.2-1B's config (~16 GB of CSV, ~25 GB free disk).
bench-full: $(STAMP)
	BENCH_FULL=1 $(MAKE) --no-print-directory bench

clean-outputs:
	rm -rf outputs/*/
