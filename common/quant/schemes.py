"""The quantization schemes: one table, one lookup. See docs/quantized.md for the formulas.

A scheme says how a linear's weight is quantized (bits, per output channel or in groups along the
input), whether its input activation is quantized too (int8 per token, dynamic) and which torchao
0.18 config runs it. torchao has two tensor families with different details, recorded as `family`:

    int8 (Int8Tensor)                  symmetric weights AND activations, scale = amax / 127.5,
                                       scale >= float32 eps (2**-23); linear = _int_mm (int32)
    intx (IntxUnpackedToInt8Tensor)    symmetric weights, scale = amax / ((qmax - qmin) / 2),
                                       scale >= float32 smallest normal (2**-126); activations
                                       asymmetric (scale and int8 zero point per token); linear =
                                       float matmul of the dequantized values

Group sizes other than 32 are accepted as `w4a8-g<N>` / `w4a16-g<N>` (N must divide every linear's
input dimension: checked where the model is known).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from common.cli import InputError

ROUNDING = "half_even"  # float -> int everywhere: torch.round, np.rint (ties to even)
FLOAT32_EPS = float(np.finfo(np.float32).eps)  # 2**-23: Int8Tensor's floor on every scale
FLOAT32_TINY = float(np.finfo(np.float32).smallest_normal)  # 2**-126: intx's floor (float32 weights)


@dataclass(frozen=True)
class Scheme:
    name: str
    weight_bits: int  # 8 or 4; int4 values live in int8 arrays ([-8, 7])
    group_size: int | None  # None: one scale per output channel; else groups along the input
    act: str | None  # "sym" | "asym": int8 per token, dynamic; None: float activations
    family: str  # "int8" | "intx": torchao's tensor subclass (see the module docstring)
    torchao_config: str  # the config applied to the running model, as Python source

    @property
    def qmin(self) -> int:
        return -(1 << (self.weight_bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.weight_bits - 1)) - 1

    @property
    def weight_eps(self) -> float:
        """The smallest weight scale torchao allows (a smaller amax is clamped up to it)."""
        return FLOAT32_EPS if self.family == "int8" else FLOAT32_TINY

    @property
    def granularity(self) -> str:
        return "per_channel" if self.group_size is None else f"per_group_{self.group_size}"

    def head(self) -> Scheme:
        """--quant-head: the head as Meta's Llama-3.2 model card does it, int8 per output channel, its
        activations treated as this scheme's (the same torchao family)."""
        config = {"int8": self.torchao_config,
                  "intx": self.torchao_config.replace("torch.int4", "torch.int8")
                  .replace(f"PerGroup({self.group_size})", "PerAxis(0)")}[self.family]
        return replace(self, name=f"{self.name}/head", weight_bits=8, group_size=None, torchao_config=config)

    def record(self, quant_head: bool) -> dict:
        """What the manifest and meta files say about the scheme."""
        return {"scheme": self.name, "weight_bits": self.weight_bits, "granularity": self.granularity,
                "group_size": self.group_size, "range": [self.qmin, self.qmax], "symmetric_weights": True,
                "activations": {"sym": "int8 symmetric per token, dynamic",
                                "asym": "int8 asymmetric per token (int8 zero point), dynamic",
                                None: "float (weight-only)"}[self.act],
                "rounding": ROUNDING, "quant_head": quant_head, "torchao": self.torchao_config}


def _intx(name: str, group: int, act: str | None) -> Scheme:
    if act:
        config = ("Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, "
                  f"weight_granularity=PerGroup({group}))")
    else:
        config = f"IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup({group}))"
    return Scheme(name, 4, group, act, "intx", config)


SCHEMES = {
    "w8a8": Scheme("w8a8", 8, None, "sym", "int8", "Int8DynamicActivationInt8WeightConfig()"),
    "w4a8-g32": _intx("w4a8-g32", 32, "asym"),
    "w8a16": Scheme("w8a16", 8, None, None, "int8", "Int8WeightOnlyConfig()"),
    "w4a16-g32": _intx("w4a16-g32", 32, None),
}
_GROUPED = re.compile(r"(w4a8|w4a16)-g([1-9][0-9]{0,5})")


def get_scheme(name: str) -> Scheme:
    """The scheme called `name` (w4a8-g<N> and w4a16-g<N> for any group size N); unknown: ValueError."""
    if name in SCHEMES:
        return SCHEMES[name]
    m = _GROUPED.fullmatch(name)
    if m:
        return _intx(name, int(m[2]), "asym" if m[1] == "w4a8" else None)
    raise ValueError(f"unknown quantization scheme {name!r}: use one of {', '.join(SCHEMES)} "
                     "(or w4a8-g<N>, w4a16-g<N> for another group size)")


def scheme_arg(text: str) -> Scheme:
    """argparse type for --quant: a scheme name -> its Scheme; unknown: one line, exit 2."""
    try:
        return get_scheme(text)
    except ValueError as e:
        raise InputError(f"--quant: {e}") from None


def check_group(scheme: Scheme, in_features: int, what: str) -> None:
    """A group size must divide the input dimension of every quantized linear; ValueError otherwise."""
    if scheme.group_size is not None and in_features % scheme.group_size:
        raise ValueError(f"{what}: input dimension {in_features} is not a multiple of {scheme.name}'s "
                         f"group size {scheme.group_size}: choose a group size that divides it")


# The linears a scheme quantizes: the seven of every decoder layer. The head (lm_head) only with
# --quant-head; the embedding never (it is a lookup, and torchao's quantize_ leaves it alone).
QUANTIZED_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)")
HEAD = "lm_head"


def quantized_module(module_name: str, quant_head: bool) -> bool:
    """Is the linear called `module_name` (e.g. model.layers.3.mlp.up_proj) quantized?"""
    return QUANTIZED_LINEAR.fullmatch(module_name) is not None or (quant_head and module_name == HEAD)
