"""Every file name step 4 --integer-only writes (common/check/integer_run.py): one home, as common/files/layout.py.

    int_<node>_layerN.csv        an integer node of layer N (integer_forward.INT_NODES)
    int_norm.csv, int_logits.csv the head's
    int_silu_table_layerN.csv    256 entries; int_rope_cos.csv, int_rope_sin.csv: (positions, Dh/2) Q1.14
    calibration.json             formats, multipliers, gammas, i-exp constants, the rule
    int_ranges.json              the integer input range each nonlinear op saw, per layer
    int_manifest.json, int_report.json, int_report.md
"""
from __future__ import annotations

from common.files.layout import default_dir, layer_file

INT_FORWARD, INT_FORWARD_CHAIN = "forward_int", "forward_int_chain"  # default folders under outputs/<model>/ (+ _zk)
CALIBRATION = "calibration.json"
ROPE_COS, ROPE_SIN = "int_rope_cos.csv", "int_rope_sin.csv"
RANGES = "int_ranges.json"
MANIFEST, REPORT_JSON, REPORT_MD = "int_manifest.json", "int_report.json", "int_report.md"


def int_node(node: str, n: int) -> str:
    """`q`, 3 -> int_q_layer3.csv."""
    return layer_file(f"int_{node}", n)


def int_head_node(node: str) -> str:
    """`logits` -> int_logits.csv."""
    return f"int_{node}.csv"


def silu_table(n: int) -> str:
    return layer_file("int_silu_table", n)


def default_out(model_dir, mode: str, zk: bool = False):
    """outputs/<model>/forward_int, forward_int_chain; the ZK preset's with _zk."""
    return default_dir(model_dir, (INT_FORWARD if mode == "layer" else INT_FORWARD_CHAIN) + ("_zk" if zk else ""))
