"""Test helpers for steps 5/6 on the quantized path: a torchao-quantized capture of the same batch as a
float step-2 folder, and the integer files steps 3/4 write for it (the contract in docs/quantized.md).

The quantized capture is the real thing: the model loaded in float32, torchao's config applied
(common.model.quant.apply_scheme), run on the float capture's exact batch with step 2's own hooks and
writers (common.model.capture). Step 2 --quant does the same; these helpers keep steps 5/6's tests
independent of it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from common.files import layout, manifest
from common.files.csv_io import read_csv
from common.files.quant_export import write_csv_exact
from common.model import capture
from common.model.quant import apply_scheme
from common.quant.intmm import int_matmul
from common.quant.quantize import quantize_activation_per_token
from common.quant.schemes import get_scheme


def quantized_capture(model_dir: Path, float_dir: Path, out_dir: Path, scheme: str = "w8a8") -> Path:
    """Step 2's folder of the torchao-quantized model on float_dir's batch; meta files record the scheme."""
    from transformers import LlamaForCausalLM

    sch = get_scheme(scheme)
    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                             attn_implementation=capture.ATTN_IMPLEMENTATION).eval()
    apply_scheme(model, sch)
    out_dir.mkdir(parents=True)
    float_files = json.loads((float_dir / layout.MANIFEST).read_text())["files"]
    written = {}
    for name in (layout.TOKENS, layout.ATTENTION_MASK, layout.POSITION_IDS, layout.VOCAB):
        shutil.copy(float_dir / name, out_dir / name)  # the same batch: the same bytes
        written[name] = float_files[name]
    meta_model = json.loads((float_dir / layout.META_MODEL).read_text())
    record = sch.record(False)
    written.update(manifest.save_json(out_dir, layout.META_MODEL, {**meta_model, "quant": record}))
    metas = {n: json.loads((float_dir / layout.meta_file(n)).read_text()) for n in layout.step2_layers(float_dir)}
    ids = torch.tensor(json.loads((float_dir / layout.TOKENS).read_text())["input_ids"])
    mask = torch.from_numpy(read_csv(float_dir / layout.ATTENTION_MASK)).long()
    pos = torch.from_numpy(read_csv(float_dir / layout.POSITION_IDS)).long()

    def sink(n, tensors):
        written.update(capture.write_layer(out_dir, n, tensors, {**metas[n], "quant": record}))

    head = capture.capture_head(model.model.norm, model.lm_head,
                                lambda t: written.update(capture.write_head(out_dir, t)),
                                capture.logit_rows(mask, meta_model["logits"]))
    layers = {n: model.model.layers[n] for n in metas}
    with capture.capture_layers(model.config, layers, sink, capture.Settings()), head, torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=0)
    manifest.write_step_manifest(out_dir, 2, written, manifest.input_signature(model_dir))
    return out_dir


def integer_files(acts_dir: Path, weights_dir: Path, out_dir: Path, layers=(0,)) -> Path:
    """The w8a8 integer files of q/k/v_proj (input xnorm) and gate/up_proj (input hnorm) of `layers`, as
    steps 3/4 write them: xq_ int8 (per token, torchao's rounding), xscale_ float32, acc_ = xq @ wq.T int32."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(acts_dir / layout.META_MODEL, out_dir / layout.META_MODEL)
    for n in layers:
        for inp, projs, module in (("xnorm", ("q_proj", "k_proj", "v_proj"), "self_attn"),
                                   ("hnorm", ("gate_proj", "up_proj"), "mlp")):
            src = acts_dir / layout.layer_file(inp if inp == "xnorm" else f"ref_{inp}", n)
            xq, xscale = quantize_activation_per_token(read_csv(src))
            for p in projs:
                wq = np.loadtxt(weights_dir / f"{layout.weight_name(n, module, p, 'weight')}.q.csv",
                                delimiter=",", dtype=np.int64, ndmin=2)
                write_csv_exact(out_dir / layout.xq(p, n), xq)
                write_csv_exact(out_dir / layout.xscale(p, n), xscale)
                write_csv_exact(out_dir / layout.acc(p, n), int_matmul(xq, wq.astype(np.int8)))
    return out_dir
