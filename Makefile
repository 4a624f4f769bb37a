# The two commands a fresh machine needs: `make demo` and `make test` (README).
PYTHON    ?= python3
VENV      := .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed-requirements
# Paths and names from their one home (common/paths.py, common/files/layout.py), read when a recipe runs,
# i.e. after the venv exists.
common     = $(shell $(PY) -c 'import os; from common import paths; from common.files import layout; print($(1))')
DEMO_DIR   = $(call common,os.path.relpath(paths.DEMO_MODEL_DIR))
MODEL_DIR ?= $(call common,os.path.relpath(paths.MODEL_DIR))
# The second capture starts every prompt at this position, far into the model's window
# (max_position_embeddings: Llama-3.2 131072, the demo model 8192), where RoPE is hard.
LONG_OFFSET ?= 100000
# Greedy decode steps captured after the prefill (2_get_x.py --generate) and verified by steps 3 and 4;
# the demo runs 4, `make pipeline` none unless asked (chain mode then holds every layer's weights).
GENERATE  ?= 0
# Step 5's demo: layer 0's references as Q16.16 words for Verilog's $readmemh.
GOLDEN    := --select '_layer0\.csv$$' --format hex --encoding fixed --bits 32 --frac-bits 16

.PHONY: venv demo pipeline steps quant-golden quant-report test test-avx2 rtl bench bench-full clean-outputs FORCE

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# Offline: build the demo model, run steps 1 -> 2 (+ 4 decode steps) -> 3 -> 4 on it at positions 0.. and again at 8000.. (near
# the end of its 8192-token window), write golden vectors (5), grade step 3 (6); ends with step 4's
# chain table and the top-5 tokens. A rerun redoes only what is out of date (below).
demo: $(STAMP)
	$(PY) 0_download_models.py --demo
	$(MAKE) --no-print-directory steps MODEL_DIR=$(DEMO_DIR) LONG_OFFSET=8000 GENERATE=4 QUANT=w8a8
	$(MAKE) --no-print-directory quant-golden MODEL_DIR=$(DEMO_DIR)

# Llama-3.2 from the Hub (needs HF_TOKEN with access): make pipeline [MODEL_DIR=model_paths/<org>_<name>];
# after the float steps, Meta's on-device scheme for it (int4 weights in groups of 32, int8 per-token
# activations) through steps 1-4 and the quantization-error report.
PIPELINE_QUANT ?= w4a8-g32
pipeline: $(STAMP)
	$(PY) 0_download_models.py
	$(MAKE) --no-print-directory steps MODEL_DIR=$(MODEL_DIR) QUANT=$(PIPELINE_QUANT)
	$(MAKE) --no-print-directory quant-report MODEL_DIR=$(MODEL_DIR) QUANT=$(PIPELINE_QUANT)

# Steps 1 (every tensor) -> 2 -> 3 -> 4, a second capture at positions LONG_OFFSET.. checked by steps 3
# and 4 into their own folders, steps 5 and 6, and last step 4's chain mode: x_layer0 to the logits.
# Each step is a file target: a stamp in outputs/<model folder>/.make/, touched when the step
# succeeded. A step reruns when its stamp is older than what it reads (the model's files, the stamps
# of the steps before it), its script, any module of common/ or this Makefile; or when its key output
# (manifest or report) is missing or newer than the stamp (the step was run by hand since). A step
# that fails leaves its stamp old, so the next run tries it again.
ifeq ($(wildcard $(PY))$(filter steps,$(MAKECMDGOALS)),$(PY)steps)
MODEL_DIR := $(MODEL_DIR)
# Every folder a step writes, and the names of their key files, in one Python call.
names := $(shell $(PY) -c 'import os, sys; from common import paths as p; from common.files import layout as l;\
  m, k = sys.argv[1], int(sys.argv[2]); d = lambda f: os.path.relpath(l.default_dir(m, f));\
  print(f"out={os.path.relpath(p.output_dir(m, str()))} weights={d(l.WEIGHTS)} acts={d(l.ACTS)} qkv={d(l.QKV)}",\
        f"forward={d(l.FORWARD)} chain={d(l.FORWARD_CHAIN)} golden={d(l.GOLDEN)} grade={d(l.GRADE)}",\
        f"long_acts={d(l.offset_folder(l.ACTS, k))} long_qkv={d(l.offset_folder(l.QKV, k))}",\
        f"long_forward={d(l.offset_folder(l.FORWARD, k))} manifest={l.MANIFEST} report={l.REPORT_JSON}",\
        f"golden_manifest={l.GOLDEN_MANIFEST}")' '$(MODEL_DIR)' '$(LONG_OFFSET)')
name       = $(patsubst $(1)=%,%,$(filter $(1)=%,$(names)))
done       = $(call name,out)/.make/$(1)
key        = $(or $(wildcard $(call name,$(1))/$(call name,$(2))),FORCE)
ok         = @mkdir -p $(@D) && touch $@
CODE      := $(shell find common -name '*.py') Makefile
MODEL      = $(wildcard $(MODEL_DIR)/*)
WEIGHTS   := $(call done,weights)
ACTS      := $(call done,x_all_layers.generate$(GENERATE))
QKV       := $(call done,qkv)
FORWARD   := $(call done,forward)
LONG_ACTS := $(call done,x_all_layers.offset$(LONG_OFFSET))
LONG_QKV  := $(call done,qkv.offset$(LONG_OFFSET))
LONG_FWD  := $(call done,forward.offset$(LONG_OFFSET))
GOLDEN_OK := $(call done,golden)
GRADE     := $(call done,grade)
CHAIN     := $(call done,forward_chain)
# QUANT=<scheme> (given on the command line, as `make demo` does): after the float steps, the
# torchao-quantized model through steps 1 --quant, 2 --quant, 3 and 4 (layer and chain mode), in the
# folders <folder>-<scheme> (docs/quantized.md).
Q_WEIGHTS := $(if $(QUANT),$(call done,weights-$(QUANT)))
Q_ACTS    := $(if $(QUANT),$(call done,x_all_layers-$(QUANT)))
Q_QKV     := $(if $(QUANT),$(call done,qkv-$(QUANT)))
Q_FWD     := $(if $(QUANT),$(call done,forward-$(QUANT)))
Q_CHAIN   := $(if $(QUANT),$(call done,forward_chain-$(QUANT)))
ALL_STEPS := $(WEIGHTS) $(ACTS) $(QKV) $(FORWARD) $(LONG_ACTS) $(LONG_QKV) $(LONG_FWD) $(GOLDEN_OK) $(GRADE) $(CHAIN) \
             $(Q_WEIGHTS) $(Q_ACTS) $(Q_QKV) $(Q_FWD) $(Q_CHAIN)
STARTED   := $(shell date +%s.%N)

steps: $(STAMP) $(ALL_STEPS)
	@[ -n "$$(find $(ALL_STEPS) -newermt @$(STARTED))" ] || { \
	  echo "== nothing to redo: no input, script or setting changed since the last run (make clean-outputs starts over)"; \
	  echo "   step 4's chain report, $(call name,chain)/report.md:"; \
	  sed -n 's/^\*\*\(.*\)\*\*$$/   \1/p' $(call name,chain)/report.md | head -1; }

$(WEIGHTS): $(MODEL) 1_model_weights.py $(CODE) $(call key,weights,manifest)
	$(PY) 1_model_weights.py --model-dir $(MODEL_DIR)    # every tensor: step 4 needs them all
	$(ok)
$(ACTS): $(MODEL) 2_get_x.py $(CODE) $(call key,acts,manifest)
	$(PY) 2_get_x.py --model-dir $(MODEL_DIR) --generate $(GENERATE)
	$(ok)
$(QKV): $(WEIGHTS) $(ACTS) 3_offline_qkv.py $(CODE) $(call key,qkv,report)
	$(PY) 3_offline_qkv.py --model-dir $(MODEL_DIR)
	$(ok)
$(FORWARD): $(WEIGHTS) $(ACTS) 4_offline_forward.py $(CODE) $(call key,forward,report)
	$(PY) 4_offline_forward.py --model-dir $(MODEL_DIR)
	$(ok)
$(LONG_ACTS): $(MODEL) 2_get_x.py $(CODE) $(call key,long_acts,manifest)
	@echo "== the same check at positions $(LONG_OFFSET).. (2_get_x.py --position-offset)"
	$(PY) 2_get_x.py --model-dir $(MODEL_DIR) --position-offset $(LONG_OFFSET) --out-dir $(call name,long_acts)
	$(ok)
$(LONG_QKV): $(WEIGHTS) $(LONG_ACTS) 3_offline_qkv.py $(CODE) $(call key,long_qkv,report)
	$(PY) 3_offline_qkv.py --model-dir $(MODEL_DIR) --acts-dir $(call name,long_acts) --out-dir $(call name,long_qkv)
	$(ok)
$(LONG_FWD): $(WEIGHTS) $(LONG_ACTS) 4_offline_forward.py $(CODE) $(call key,long_forward,report)
	$(PY) 4_offline_forward.py --model-dir $(MODEL_DIR) --acts-dir $(call name,long_acts) --out-dir $(call name,long_forward)
	$(ok)
$(GOLDEN_OK): $(ACTS) 5_golden.py $(CODE) $(call key,golden,golden_manifest)
	$(PY) 5_golden.py --model-dir $(MODEL_DIR) $(GOLDEN)
	$(ok)
$(GRADE): $(QKV) $(ACTS) 6_grade.py $(CODE) $(call key,grade,report)
	$(PY) 6_grade.py --model-dir $(MODEL_DIR)
	$(ok)
$(CHAIN): $(WEIGHTS) $(ACTS) 4_offline_forward.py $(CODE) $(call key,chain,report)
	@echo "== the whole forward pass offline, from x_layer0 to the logits (positions 0..)"
	$(PY) 4_offline_forward.py --model-dir $(MODEL_DIR) --mode chain
	$(ok)
ifneq ($(QUANT),)
$(Q_WEIGHTS): $(MODEL) 1_model_weights.py $(CODE)
	@echo "== the $(QUANT) model: integer weights (step 1 --quant), torchao's running model (step 2 --quant), proven offline"
	$(PY) 1_model_weights.py --model-dir $(MODEL_DIR) --quant $(QUANT)
	$(ok)
$(Q_ACTS): $(MODEL) 2_get_x.py $(CODE)
	$(PY) 2_get_x.py --model-dir $(MODEL_DIR) --quant $(QUANT)
	$(ok)
$(Q_QKV): $(Q_WEIGHTS) $(Q_ACTS) 3_offline_qkv.py $(CODE)
	$(PY) 3_offline_qkv.py --model-dir $(MODEL_DIR) --quant $(QUANT)
	$(ok)
$(Q_FWD): $(Q_WEIGHTS) $(Q_ACTS) 4_offline_forward.py $(CODE)
	$(PY) 4_offline_forward.py --model-dir $(MODEL_DIR) --quant $(QUANT)
	$(ok)
$(Q_CHAIN): $(Q_WEIGHTS) $(Q_ACTS) 4_offline_forward.py $(CODE)
	$(PY) 4_offline_forward.py --model-dir $(MODEL_DIR) --quant $(QUANT) --mode chain
	$(ok)
endif
else
steps: $(STAMP)  # parsed before the venv existed: once more, now that it does
	@test -x $(PY) && $(MAKE) --no-print-directory steps
endif

FORCE:

# --- steps 5 and 6 on the quantized run (issues 19, 20), after the QUANT steps 1-4 -----------------
# Layer 0's integer tensors as words (5 --integer), the RTL vectors of layer 0's q_proj (5 --rtl, then
# simulated in Icarus Verilog as `make rtl` does; skipped with a note where iverilog is missing), and
# the quantization-error report of the QUANT capture against the float one (6), whose last lines are
# the top-1 agreement and the KL divergence. Skipped, with a note, until the QUANT capture and its
# step 3 folder exist.
QUANT     ?= w8a8
qdir       = $(call common,os.path.relpath(layout.default_dir("$(MODEL_DIR)", layout.quant_folder(layout.$(1), "$(QUANT)"))))
quant-golden: $(STAMP)
	@if [ ! -d "$(call qdir,QKV)" ] || [ ! -d "$(call qdir,ACTS)" ]; then \
	  echo "== quant-golden: no $(call qdir,ACTS) or $(call qdir,QKV) yet (the $(QUANT) steps 2-3): skipped"; \
	else \
	  echo "== the $(QUANT) run: layer 0's integer golden vectors, its q_proj for the RTL, the quantization error" && \
	  $(PY) 5_golden.py --model-dir $(MODEL_DIR) --integer --in-dir $(call qdir,QKV) --select '_layer0\.csv$$' --format hex && \
	  $(PY) 5_golden.py --model-dir $(MODEL_DIR) --rtl --in-dir $(call qdir,QKV) --weights-dir $(call qdir,WEIGHTS) && \
	  { if command -v iverilog >/dev/null && command -v vvp >/dev/null; then \
	      $(PY) examples/rtl/run_rtl.py --model-dir $(MODEL_DIR) --vectors $(call qdir,GOLDEN_RTL); \
	    else echo "== RTL simulation skipped: no iverilog (apt-get install -y iverilog, then make rtl)"; fi; } && \
	  $(MAKE) --no-print-directory quant-report MODEL_DIR=$(MODEL_DIR) QUANT=$(QUANT); \
	fi

# What quantization did: the QUANT capture graded against the float capture of the same prompts (6).
quant-report: $(STAMP)
	$(PY) 6_grade.py --model-dir $(MODEL_DIR) --candidate-dir $(call qdir,ACTS) \
	  --reference-dir $(call common,os.path.relpath(layout.default_dir("$(MODEL_DIR)", layout.ACTS))) --out-dir $(call qdir,GRADE)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The int8 dot-product + requantization RTL in Icarus Verilog against golden vectors: a seeded case and,
# when the demo model is there, its layer-0 q_proj (examples/rtl/README.md); and the demo's real w8a8
# layer-0 q_proj vectors (5_golden.py --rtl, written by `make demo`) when they exist.
RTL_VECTORS = $(call common,os.path.relpath(layout.default_dir(paths.DEMO_MODEL_DIR, layout.quant_folder(layout.GOLDEN_RTL, "w8a8"))))
rtl: $(STAMP)
	$(PY) examples/rtl/run_rtl.py $(if $(wildcard $(RTL_VECTORS)/dims.hex),--vectors $(RTL_VECTORS))

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
