"""Step 2 --quant: the running model quantized by torchao, and what its quantized linears did to their input.

The references of a quantized capture are what the torchao-quantized model computes (every node, as
for a float capture). Besides them, a forward pre-hook on each quantized linear of a hooked layer
records the per-token scale (and, asymmetric schemes, the zero point) that the linear's own
activation quantization gives its input, by torchao's own functions
(common.model.quant.torchao_activation_quant): ref_xscale_P_layerN.csv [rows, 1] and
ref_xzero_P_layerN.csv [rows, 1], what steps 3 and 4 check their scales against.

Streaming (one layer in memory at a time) quantizes each layer as it is loaded, with the same
config and filter as the whole model (apply_scheme): the same weights, the same linears.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from common.files import layout
from common.model.quant import torchao_activation_quant, torchao_config
from common.model.torchao_import import torchao_quantization
from common.quant.schemes import Scheme, quantized_module

PROJ = {p: ("self_attn", p) for p in layout.ATTENTION_PROJ} | {p: ("mlp", p) for p in layout.MLP_PROJ}


def scale_hooks(scheme: Scheme) -> Callable[[int, nn.Module, Callable], list]:
    """hooks(n, layer, add) -> handles: pre-hooks that add(n, "ref_xscale_P", (rows, 1)) per quantized linear P."""
    def hooks(n: int, layer: nn.Module, add: Callable) -> list:
        if scheme.act is None:  # weight-only: the activations stay float
            return []
        handles = []
        for proj, (block, attr) in PROJ.items():
            linear = getattr(getattr(layer, block), attr)

            def pre(m, args, proj=proj):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).cpu()  # (B, T, K) -> (B*T, K), batch-major
                _, scale, zero = torchao_activation_quant(m.weight, x)
                add(n, f"ref_xscale_{proj}", torch.from_numpy(scale.reshape(-1, 1).copy()))
                if zero is not None:
                    add(n, f"ref_xzero_{proj}", torch.from_numpy(zero.reshape(-1, 1).astype("float32")))
            handles.append(linear.register_forward_pre_hook(pre))
        return handles
    return hooks


def quantize_layer(layer: nn.Module, n: int, scheme: Scheme) -> None:
    """Decoder layer n alone (streaming), quantized in place as apply_scheme quantizes it in the whole model."""
    tq = torchao_quantization()
    for name, m in layer.named_modules():
        if quantized_module(f"model.layers.{n}.{name}", False) and m.weight.dtype != torch.float32:
            raise ValueError(f"layer {n} {name} is {m.weight.dtype}: load the model in float32 to quantize it")
    tq.quantize_(layer, torchao_config(scheme),
                 filter_fn=lambda m, fqn: quantized_module(f"model.layers.{n}.{fqn}", False))


def quantize_head(head: nn.Linear, scheme: Scheme) -> nn.Linear:
    """--quant-head when streaming: the head alone, int8 per output channel (Scheme.head)."""
    holder = nn.Module()
    holder.lm_head = head
    torchao_quantization().quantize_(holder, torchao_config(scheme.head()), filter_fn=lambda m, fqn: fqn == "lm_head")
    return holder.lm_head
