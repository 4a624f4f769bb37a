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
# The second capture starts every prompt at this position, far into the model's window
# (max_position_embeddings: Llama-3.2 131072, the demo model 8192), where RoPE is hard.
LONG_OFFSET ?= 100000
long_dir   = $(call common,os.path.relpath(layout.default_dir("$(MODEL_DIR)", layout.offset_folder(layout.$(1), $(LONG_OFFSET)))))
# Greedy decode steps captured after the prefill (2_get_x.py --generate) and verified by steps 3 and 4;
# the demo runs 4, `make pipeline` none unless asked (chain mode then holds every layer's weights).
GENERATE  ?= 0
# Step 5's demo: layer 0's references as Q16.16 words for Verilog's $readmemh.
GOLDEN    := --select '_layer0\.csv$$' --format hex --encoding fixed --bits 32 --frac-bits 16

.PHONY: venv demo pipeline steps test test-avx2 bench bench-full clean-outputs

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# Offline: build the demo model, run steps 1 -> 2 (+ 4 decode steps) -> 3 -> 4 on it at positions 0.. and again at 8000.. (near
# the end of its 8192-token window), write golden vectors (5), grade step 3 (6); ends with step 4's
# chain table and the top-5 tokens.
demo: $(STAMP)
	$(PY) 0_download_models.py --demo
	$(MAKE) --no-print-directory steps MODEL_DIR=$(DEMO_DIR) LONG_OFFSET=8000 GENERATE=4

# Llama-3.2 from the Hub (needs HF_TOKEN with access): make pipeline [MODEL_DIR=model_paths/<org>_<name>]
pipeline: $(STAMP)
	$(PY) 0_download_models.py
	$(MAKE) --no-print-directory steps MODEL_DIR=$(MODEL_DIR)

# Steps 1 (every tensor) -> 2 -> 3 -> 4, a second capture at positions LONG_OFFSET.. checked by steps 3
# and 4 into their own folders, steps 5 and 6, and last step 4's chain mode: x_layer0 to the logits.
steps: $(STAMP)
	$(PY) 1_model_weights.py --model-dir $(MODEL_DIR)    # every tensor: step 4 needs them all
	$(PY) 2_get_x.py --model-dir $(MODEL_DIR) --generate $(GENERATE)
	$(PY) 3_offline_qkv.py --model-dir $(MODEL_DIR)
	$(PY) 4_offline_forward.py --model-dir $(MODEL_DIR)
	@echo "== the same check at positions $(LONG_OFFSET).. (2_get_x.py --position-offset)"
	$(PY) 2_get_x.py --model-dir $(MODEL_DIR) --position-offset $(LONG_OFFSET) --out-dir $(call long_dir,ACTS)
	$(PY) 3_offline_qkv.py --model-dir $(MODEL_DIR) --acts-dir $(call long_dir,ACTS) --out-dir $(call long_dir,QKV)
	$(PY) 4_offline_forward.py --model-dir $(MODEL_DIR) --acts-dir $(call long_dir,ACTS) --out-dir $(call long_dir,FORWARD)
	$(PY) 5_golden.py --model-dir $(MODEL_DIR) $(GOLDEN)
	$(PY) 6_grade.py --model-dir $(MODEL_DIR)
	@echo "== the whole forward pass offline, from x_layer0 to the logits (positions 0..)"
	$(PY) 4_offline_forward.py --model-dir $(MODEL_DIR) --mode chain

test: $(STAMP)
	$(PY) -m pytest -q tests

# An AVX2-only x86-64 machine on an AVX-512 one (docs/reproducibility.md): OpenBLAS's Haswell kernels,
# numpy's dispatch without its AVX-512 targets (numpy.show_runtime() lists them), torch's AVX2 kernels.
AVX2_ENV := OPENBLAS_CORETYPE=Haswell NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL AVX512_SPR" ATEN_CPU_CAPABILITY=avx2
test-avx2: $(STAMP)
	$(AVX2_ENV) $(PY) tests/machine.py --avx2
	$(AVX2_ENV) $(PY) -m pytest -q tests

# Each benchmark prints its measurements and ratios, and exits 1 when it misses a goal.
bench: $(STAMP)
	@fail=0; for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || fail=1; done; exit $$fail

# Also export a random model with exactly Llama-3.2-1B's config (~16 GB of CSV, ~25 GB free disk).
bench-full: $(STAMP)
	BENCH_FULL=1 $(MAKE) --no-print-directory bench

clean-outputs:
	rm -rf outputs/*/
