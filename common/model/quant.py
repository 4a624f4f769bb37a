"""The running quantized model: a scheme's torchao config applied to a loaded transformers Llama, and
the integers torchao holds for each quantized linear.

Which linears: the seven of every decoder layer (common.quant.schemes.QUANTIZED_LINEAR), and the
head with quant_head (int8 per output channel, Scheme.head()). The embedding stays float. The
model must be float32: the offline side (common/quant) reproduces torchao's float32 arithmetic.
"""
from __future__ import annotations

import numpy as np
import torch

from common.cli import InputError
from common.quant.schemes import HEAD, Scheme, check_group, quantized_module
from common.model.torchao_import import torchao_quantization


def check_capture(scheme: Scheme | None, quant_head: bool, dtype: str, cfg) -> None:
    """Step 2's --quant at the door, before anything is loaded (streaming quantizes layer by layer)."""
    if quant_head and scheme is None:
        raise InputError("--quant-head needs --quant SCHEME")
    if scheme is None:
        return
    if dtype != "float32":
        raise InputError(f"--quant {scheme.name} with --dtype {dtype}: torchao's quantized model is "
                         "captured (and recomputed offline) in float32; drop --dtype")
    for what, k in (("d_model", cfg.d_model), ("num_heads * head_dim", cfg.num_heads * cfg.head_dim),
                    ("intermediate_size", cfg.intermediate_size)):
        try:
            check_group(scheme, k, what)
        except ValueError as e:
            raise InputError(f"--quant {e}") from None


def torchao_config(scheme: Scheme):
    """The torchao 0.18 config object of a scheme (what its `torchao_config` text says)."""
    tq = torchao_quantization()
    if scheme.family == "int8":  # per output channel, symmetric (PerRow), the configs' defaults
        return tq.Int8DynamicActivationInt8WeightConfig() if scheme.act else tq.Int8WeightOnlyConfig()
    bits = {8: torch.int8, 4: torch.int4}[scheme.weight_bits]
    granularity = tq.PerAxis(0) if scheme.group_size is None else tq.PerGroup(scheme.group_size)
    if scheme.act:  # torchao 0.18 quantizes these activations asymmetrically (its only choice)
        return tq.Int8DynamicActivationIntxWeightConfig(weight_dtype=bits, weight_granularity=granularity)
    return tq.IntxWeightOnlyConfig(weight_dtype=bits, granularity=granularity)


def quantized_linears(model: torch.nn.Module, scheme: Scheme, quant_head: bool) -> dict[str, torch.nn.Linear]:
    """name -> Linear of every linear the scheme quantizes; InputError when torchao could not apply it."""
    found = {n: m for n, m in model.named_modules() if quantized_module(n, quant_head)}
    layers = {n for n in found if n != HEAD}
    if not layers:
        raise InputError(f"{scheme.name}: the model has no decoder-layer linears (model.layers.N.self_attn.q_proj, ...): "
                         "it is not a Llama model torchao can quantize")
    if quant_head and HEAD not in found:
        raise InputError(f"--quant-head: the model has no {HEAD}: drop --quant-head")
    for name, m in found.items():
        if type(m) is not torch.nn.Linear or m.weight.dim() != 2:
            raise InputError(f"{scheme.name}: {name} is a {type(m).__name__}, not a plain nn.Linear: "
                             "torchao cannot quantize it")
        if m.weight.dtype != torch.float32:
            raise InputError(f"{scheme.name}: {name} is {str(m.weight.dtype).removeprefix('torch.')}: "
                             "load the model in float32 to quantize it")
        try:
            check_group(scheme.head() if name == HEAD else scheme, m.in_features, name)
        except ValueError as e:
            raise InputError(f"--quant {e}") from None
    return found


def apply_scheme(model: torch.nn.Module, scheme: Scheme, quant_head: bool = False) -> list[str]:
    """Quantize the model in place with torchao's quantize_; returns the names of the quantized linears."""
    tq = torchao_quantization()
    names = list(quantized_linears(model, scheme, quant_head))
    layer_names = set(names) - {HEAD}
    tq.quantize_(model, torchao_config(scheme), filter_fn=lambda m, fqn: fqn in layer_names)
    if quant_head:  # a tied head gets its own quantized weight; the embedding keeps the float one
        tq.quantize_(model, torchao_config(scheme.head()), filter_fn=lambda m, fqn: fqn == HEAD)
    return names


def torchao_qdata(model: torch.nn.Module, names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """'<linear>.weight' -> (qdata int8 (N, K), scale float32) as torchao holds them, as numpy."""
    out = {}
    for name in names:
        w = model.get_submodule(name).weight
        if not hasattr(w, "qdata"):
            raise InputError(f"{name} was not quantized by torchao (its weight is a {type(w).__name__})")
        out[f"{name}.weight"] = (w.qdata.detach().numpy().copy(), w.scale.detach().numpy().copy())
    return out


def torchao_activation_quant(weight, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """What torchao's linear does to its input x (M, K) before the matmul, as numpy:
    (xq int8 (M, K), scale float32, zero_point int8 or None), by torchao's own functions:
    Int8Tensor (w8a8): its act_quant_kwargs, the call its linear makes (symmetric, scale (M, 1));
    IntxUnpackedToInt8Tensor (w4a8-g*): choose_qparams_affine + quantize_affine as its linear's
    _apply_int8_act_asym_per_token_quant_dequant calls them (scale (M,), zero point (M,))."""
    torchao_quantization()  # loaded quietly first; these are its internals the linears call
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine
    from torchao.quantization.quantize_.common import _choose_quant_func_and_quantize_tensor
    if getattr(weight, "act_quant_kwargs", None) is not None:
        t = _choose_quant_func_and_quantize_tensor(x, weight.act_quant_kwargs)
        return t.qdata.numpy(), t.scale.numpy(), None
    if getattr(weight, "activation_quantization", None) is not None:
        block = (1, x.shape[-1])
        scale, zp = choose_qparams_affine(x, MappingType.ASYMMETRIC, block, torch.int8, -128, 127,
                                          zero_point_dtype=torch.int8)
        xq = quantize_affine(x, block, scale, zp, torch.int8, -128, 127)
        return xq.numpy(), scale.numpy(), zp.numpy()
    raise ValueError("this weight's linear does not quantize its input (a weight-only scheme)")
