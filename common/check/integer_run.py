"""Step 4 --integer-only: calibrate, run the integer-only forward (common/quant/integer_forward.py) in layer
or chain mode, write every intermediate as an integer CSV, the tables, a manifest and a report against
the float32 references of step 2.

Reads step 1's --quant w8a8 folder (<linear>.q.csv, .scale.csv: int8 per output channel; the norms;
the head as lm_head.weight.q.csv with --quant-head, else quantized here from the float head, as torchao
would) and step 2's float capture. Writes to OUT_DIR (names: common/files/int_layout.py):
  calibration.json           formats, multipliers, gammas, i-exp constants, the rule (what ran: read back)
  int_silu_table_layerN.csv  int_rope_cos.csv  int_rope_sin.csv      the tables, read back before the run
  int_<node>_layerN.csv      every node of every layer (integers; probs (B*H*T, T) rows)
  int_norm.csv, int_logits.csv, int_manifest.json (formats, rounding rules, sha256 of every file),
  int_report.json, int_report.md: per node SQNR / NMSE / cosine / max_abs; at the logits KL, top-1, top-5.
With a previous run's folder as CALIBRATION its calibration.json and tables are read (and checked) instead.
"""
from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path

import numpy as np

from common.check import integer_report, offline
from common.cli import InputError, print_settings
from common.files import int_layout as il
from common.files import layout, manifest
from common.files.atomic import output_folder, read_json, write_bytes, write_json
from common.files import csv_io
from common.files.csv_io import read_csv
from common.files.int_csv import Q_SUFFIX, SCALE_SUFFIX, write_csv_exact
from common.llama import attention, forward
from common.llama.rope import rope_inv_freq
from common.quant import calibrate as cal
from common.quant import fixedpoint as fp
from common.quant import integer_forward as ifw
from common.quant import zk_forward as zkf
from common.quant.quantize import quantize_weight
from common.quant.requant import RULES
from common.quant.schemes import get_scheme

REQUANT = "single"  # single | double (common/quant/requant.py)
ROUNDING_RULES = {
    "float -> int (calibration, inputs, tables)": "round half to even, then saturate (fixedpoint.to_fixed)",
    "requantization single": "(acc M + 2^(s-1)) >> s, s = 31 + shift, saturate (ties toward +inf)",
    "requantization double": "gemmlowp SRDHM (ties toward +inf) then RoundingDivideByPOT (ties away from zero)",
    "rmsnorm": "int64 sum of squares, mean half up, isqrt digit by digit (floor), reciprocal 2^62 / r half up",
    "softmax": "max subtraction, I-BERT i-exp (constants floored, >> z floor), int32 sum, division half up",
    "silu": "table over the 256 int8 inputs, entries half even",
    "rope": "Q1.14 cos/sin per position (half even), product >>r 14 (half up), saturate",
    "residual add": "align (<< up, >>r half up down), saturate",
}


# --- reading ---------------------------------------------------------------------------------------

def read_int_csv(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A CSV of plain integers as int64 of `shape`; InputError naming the file otherwise."""
    if not path.is_file():
        raise InputError(f"{path} is missing")
    a = csv_io.read_int_csv(path)
    if a.size != math.prod(shape):
        raise InputError(f"{path} holds {a.size} values, expected {math.prod(shape)} {shape}: rebuild it")
    return a.reshape(shape)


def read_linear(weights_dir: Path, name: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """<name>.q.csv int8 (N, K) and <name>.scale.csv float32 (N, 1): step 1 --quant w8a8's per-channel int8."""
    q_path, s_path = weights_dir / (name + Q_SUFFIX), weights_dir / (name + SCALE_SUFFIX)
    if not q_path.is_file():
        raise InputError(f"{q_path} is missing: --integer-only needs step 1 --quant w8a8 "
                         f"(python 1_model_weights.py --quant w8a8 --out-dir {weights_dir})")
    q = read_int_csv(q_path, shape)
    scale = read_csv(s_path)
    if scale.shape != (shape[0], 1) or q.min() < -128 or q.max() > 127:
        raise InputError(f"{s_path}: --integer-only takes int8 weights with one scale per output channel "
                         "(step 1 --quant w8a8)")
    return q.astype(np.int8), scale


def read_head(weights_dir: Path, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """The head as int8 per channel: lm_head.weight.q.csv (step 1 --quant-head), else the float head
    quantized here (calibration) as torchao's w8a8 would."""
    V, d = meta["vocab_size"], meta["d_model"]
    if (weights_dir / (layout.LM_HEAD + Q_SUFFIX)).is_file():
        return read_linear(weights_dir, layout.LM_HEAD, (V, d))
    name = layout.EMBEDDING if meta["tie_word_embeddings"] else layout.LM_HEAD
    q, s = quantize_weight(read_csv(weights_dir / layout.weight_file(name), (V, d)), get_scheme("w8a8"))
    return q, s


def read_layer_weights(weights_dir: Path, n: int, meta: dict) -> dict:
    shapes = offline._proj_shapes(meta)
    w = {p: read_linear(weights_dir, layout.weight_name(n, "self_attn" if p in layout.ATTENTION_PROJ else "mlp", p,
                                                         "weight"), shapes[p]) for p in ifw.LINEARS}
    for key, norm in (("gamma_in", "input_layernorm"), ("gamma_post", "post_attention_layernorm")):
        w[key] = read_csv(weights_dir / layout.weight_file(layout.norm_weight_name(n, norm)), (meta["d_model"],))
    return w


CAPTURED = ("q", "k", "v", "attn", "h", "hnorm", "act", "mlp", "out", "probs")  # the ref_ files read per layer


def step2_files(meta: dict) -> list[str]:
    per_layer = [layout.layer_file(s, n) for n in range(meta["num_layers"]) for s in ("x", "xnorm")]
    per_layer += [layout.ref_file(s, n) for n in range(meta["num_layers"]) for s in CAPTURED]
    return [layout.META_MODEL, *layout.BATCH_FILES, layout.REF_NORM, layout.REF_LOGITS, *per_layer]


def step1_files(weights_dir: Path, meta: dict) -> list[str]:
    names = []
    for n in range(meta["num_layers"]):
        names += [layout.weight_file(layout.norm_weight_name(n, norm)) for norm in layout.NORMS]
        for p in ifw.LINEARS:
            base = layout.weight_name(n, "self_attn" if p in layout.ATTENTION_PROJ else "mlp", p, "weight")
            names += [base + Q_SUFFIX, base + SCALE_SUFFIX]
    names.append(layout.weight_file(layout.FINAL_NORM))
    if (weights_dir / (layout.LM_HEAD + Q_SUFFIX)).is_file():
        return names + [layout.LM_HEAD + Q_SUFFIX, layout.LM_HEAD + SCALE_SUFFIX]
    return names + [layout.weight_file(layout.EMBEDDING if meta["tie_word_embeddings"] else layout.LM_HEAD)]


def read_captures(acts_dir: Path, n: int, meta: dict) -> dict:
    """Layer n's float captures (x, xnorm and the ref_ files) as (B*T, C) float32."""
    rows = meta["batch_size"] * meta["seq_len"]
    c = {"x": read_csv(acts_dir / layout.layer_file("x", n)), "xnorm": read_csv(acts_dir / layout.layer_file("xnorm", n))}
    for stem in CAPTURED:
        c[stem] = read_csv(acts_dir / layout.ref_file(stem, n))
    for k, a in c.items():
        if k != "probs" and a.shape[0] != rows:
            raise InputError(f"{acts_dir}: {k} of layer {n} has {a.shape[0]} rows, expected {rows}: capture again")
    return c


def derived_nodes(c: dict, w: dict, mask: np.ndarray, meta: dict) -> dict:
    """The float nodes step 2 does not write, from its captures (calibration and the report):
    scores = q k^T / sqrt(Dh) (B, H, T, T), ctx = probs v (B*T, H*Dh), gate, up = hnorm W^T."""
    B, T, H, Hkv, Dh = (meta[k] for k in ("batch_size", "seq_len", "num_heads", "num_kv_heads", "head_dim"))
    q = c["q"].reshape(B, T, H, Dh).transpose(0, 2, 1, 3)  # (B*T, H*Dh) -> (B, H, T, Dh)
    k = attention.repeat_kv(c["k"].reshape(B, T, Hkv, Dh), H // Hkv).transpose(0, 2, 1, 3)
    v = attention.repeat_kv(c["v"].reshape(B, T, Hkv, Dh), H // Hkv).transpose(0, 2, 1, 3)
    scores = (q @ k.transpose(0, 1, 3, 2)) / np.float32(math.sqrt(Dh))  # (B, H, T, T)
    probs = c["probs"].reshape(B, H, T, T)
    ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(B * T, H * Dh)
    deq = {p: w[p][0].astype(np.float32) * w[p][1] for p in ("gate_proj", "up_proj")}
    return {"scores": scores, "ctx": ctx, "gate": c["hnorm"] @ deq["gate_proj"].T, "up": c["hnorm"] @ deq["up_proj"].T}


# --- calibration -----------------------------------------------------------------------------------

def calibration_view(c: dict, real_rows: np.ndarray, allowed: np.ndarray) -> dict:
    """The captured values calibration looks at: real tokens' rows, allowed scores only."""
    view = {k: a[real_rows] for k, a in c.items() if k not in ("scores", "probs")}
    view["scores"] = c["scores"][np.broadcast_to(allowed, c["scores"].shape)]
    return view


def calibrate_model(acts_dir: Path, weights_dir: Path, meta: dict, mask: np.ndarray, position_ids: np.ndarray,
                    rule: str, zk: bool = False) -> tuple[dict, dict, dict]:
    """(record, int8 weights per layer and head, float captures per layer and head); `zk`: the ZK preset's."""
    real_rows = mask.reshape(-1) > 0
    allowed = attention.attention_allowed(mask)[:, None]  # (B, 1, T, T)
    layers, weights, captures = [], {}, {}
    for n in range(meta["num_layers"]):
        w = read_layer_weights(weights_dir, n, meta)
        c = read_captures(acts_dir, n, meta)
        c.update(derived_nodes(c, w, mask, meta))
        layers.append((cal.calibrate_zk_layer if zk else cal.calibrate_layer)(
            n, calibration_view(c, real_rows, allowed), w, meta["rms_norm_eps"], meta["head_dim"], meta["seq_len"]))
        weights[n], captures[n] = w, c
    d = meta["d_model"]
    head_q, head_s = read_head(weights_dir, meta)
    norm_ref = read_csv(acts_dir / layout.REF_NORM, (mask.size, d))
    logits_ref = offline.read_ref_logits(acts_dir, meta, mask.size if meta["logits"] == "all" else mask.shape[0])
    gamma = read_csv(weights_dir / layout.weight_file(layout.FINAL_NORM), (d,))
    last_out = captures[meta["num_layers"] - 1]["out"]
    head = (cal.calibrate_zk_head(last_out[real_rows], gamma, meta["rms_norm_eps"]) if zk else
            cal.calibrate_head(last_out[real_rows], norm_ref[real_rows], logits_ref, gamma,
                               head_s.reshape(-1).astype(np.float64), meta["rms_norm_eps"]))
    P = int(position_ids.max()) + 1
    cos, sin = fp.rope_tables(np.arange(P), rope_inv_freq(meta["head_dim"], meta["rope_theta"], meta.get("rope_scaling")))
    record = {"rule": rule, "preset": "zk" if zk else "int8", "layers": layers, "head": head,
              "rope": {"positions": P, "cos": cos.tolist(), "sin": sin.tolist()},
              "rsqrt": {"method": "digit-by-digit isqrt of the mean square in [2^60, 2^62), reciprocal 2^62 / r",
                        "RSQRT_BITS": fp.RSQRT_BITS, "NORM_FRAC": fp.NORM_FRAC}}
    captures["head"] = {"norm": norm_ref, "logits": logits_ref}
    weights["head"] = head_q if not zk else cal.zk_weight(head_q, head_s)
    if zk:  # the weights' real values at 2^16 (half even): the last float step
        for n in range(meta["num_layers"]):
            weights[n] = {**weights[n], **{p: cal.zk_weight(*weights[n][p]) for p in ifw.LINEARS}}
    return record, weights, captures


# --- tables as files, read back -------------------------------------------------------------------

def write_tables(out_dir: Path, record: dict) -> None:
    layers = [{k: v for k, v in L.items() if k != "silu_table"} | {"silu_len": len(L["silu_table"])}
              for L in record["layers"]]
    write_json(out_dir / il.CALIBRATION, {k: v for k, v in record.items() if k not in ("rope", "layers")}
               | {"layers": layers, "rope": {"positions": record["rope"]["positions"]}})
    for L in record["layers"]:
        write_csv_exact(out_dir / il.silu_table(L["layer"]), np.array(L["silu_table"], np.int64)[None, :])
    write_csv_exact(out_dir / il.ROPE_COS, np.array(record["rope"]["cos"], np.int64))
    write_csv_exact(out_dir / il.ROPE_SIN, np.array(record["rope"]["sin"], np.int64))


def read_tables(folder: Path, meta: dict) -> dict:
    """calibration.json and the table files of a folder, checked: what the run uses."""
    where = folder / il.CALIBRATION
    record = read_json(where, "run step 4 --integer-only again without --calibration")
    preset = record.get("preset")
    if (preset not in ("int8", "zk") or record.get("rule") not in RULES or not isinstance(record.get("layers"), list)
            or len(record["layers"]) != meta["num_layers"]):
        raise InputError(f"{where}: not a calibration of this model's {meta['num_layers']} layers: rebuild it")
    for n, L in enumerate(record["layers"]):
        cal.check_layer_record(L, preset, f"{where} layer {n}")
        path = folder / il.silu_table(n)
        fmt = fp.ZK_FORMAT if preset == "zk" else cal.fmt_of(L["fmt_silu"])
        length = L["silu_len"] if preset == "zk" else 256
        L["silu_table"] = fp.check_table(str(path), read_int_csv_row(path), (length,), fmt).tolist()
    cal.check_shape(record["head"], cal.HEAD_KEYS[preset], f"{where} head")
    if preset == "int8":
        cal.check_record(record["head"], f"{where} head")
    cal.check_shape(record.get("rope"), ("positions",), f"{where} rope")
    half = meta["head_dim"] // 2
    P = record["rope"]["positions"]
    for key, name in (("cos", il.ROPE_COS), ("sin", il.ROPE_SIN)):
        table = read_int_csv_row(folder / name)
        record["rope"][key] = fp.check_table(str(folder / name), table.reshape(-1, half) if table.size % half == 0
                                             else table, (P, half), fp.FixedFormat(16, fp.ROPE_FRAC)).tolist()
    return record


def read_int_csv_row(path: Path) -> np.ndarray:
    """A table file of integers, any shape, flattened to int64 (its length is checked by the caller)."""
    if not path.is_file():
        raise InputError(f"{path} is missing: rebuild the tables (run without --calibration)")
    return csv_io.read_int_csv(path).reshape(-1)


# --- building the integer model from the record ---------------------------------------------------

def rq_of(ms: dict) -> ifw.Requant:
    return ifw.Requant(np.array(ms["M"], np.int64), np.array(ms["shift"], np.int64))


def int_layer(L: dict, w: dict) -> ifw.IntLayer:
    fmt = {k: cal.fmt_of(L[f"fmt_{k}"]) for k in ("x", "h", "out", "attn", "mlp", "scores", "silu")}
    fmt["gamma_in"], fmt["gamma_post"] = cal.fmt_of(L["input_norm"]["fmt_gamma"]), cal.fmt_of(L["post_norm"]["fmt_gamma"])
    return ifw.IntLayer(w={p: w[p][0] for p in ifw.LINEARS}, rq={k: rq_of(v) for k, v in L["requant"].items()},
                        fmt=fmt, gamma_in=np.array(L["input_norm"]["gamma"], np.int64),
                        gamma_post=np.array(L["post_norm"]["gamma"], np.int64), eps_x=L["eps_x"], eps_h=L["eps_h"],
                        iexp=L["iexp"], silu_table=np.array(L["silu_table"], np.int64), act_bits=L["act_bits"])


def int_head(Hrec: dict, wq: np.ndarray) -> ifw.IntHead:
    return ifw.IntHead(w=wq, rq=rq_of(Hrec["requant"]["head"]), fmt_x=cal.fmt_of(Hrec["fmt_x"]),
                       gamma=np.array(Hrec["norm"]["gamma"], np.int64), fmt_gamma=cal.fmt_of(Hrec["norm"]["fmt_gamma"]),
                       eps_x=Hrec["eps_x"], fmt_logits=cal.fmt_of(Hrec["fmt_logits"]), act_bits=Hrec["act_bits"])


# --- the run --------------------------------------------------------------------------------------

def write_nodes(out_dir: Path, n: int, nodes: dict, B: int, H: int, T: int) -> list[str]:
    names = []
    for node in ifw.INT_NODES:
        a = nodes[node]
        a = a.reshape(B * H * T, -1) if node in ("scores", "probs") else a  # (B, H, T, T) -> (B*H*T, T)
        names.append(il.int_node(node, n))
        write_csv_exact(out_dir / names[-1], a.astype(np.int64))
    return names


def zk_layer(L: dict, w: dict) -> zkf.ZkLayer:
    return zkf.ZkLayer(w={p: w[p] for p in ifw.LINEARS}, gamma_in=np.array(L["input_norm"]["gamma"], np.int64),
                       gamma_post=np.array(L["post_norm"]["gamma"], np.int64),
                       fmt_norm_x=cal.fmt_of(L["input_norm"]["fmt_in"]), fmt_norm_h=cal.fmt_of(L["post_norm"]["fmt_in"]),
                       eps_x=L["input_norm"]["eps"], eps_h=L["post_norm"]["eps"], inv_sqrt_dh=L["inv_sqrt_dh"],
                       fmt_scores=cal.fmt_of(L["fmt_scores"]), iexp=L["iexp"], silu_lo=L["silu_lo"],
                       silu_table=np.array(L["silu_table"], np.int64))


def run_layers(record: dict, weights: dict, captures: dict, mode: str, cos, sin, mask, shape: ifw.Shape, rule: str,
               emit) -> tuple[np.ndarray, dict]:
    """Every layer (layer mode: each from its captured x; chain: from x_layer0), emit(n, nodes, L) after each;
    returns (the head's input, the ranges each nonlinear op saw)."""
    zk, x, ranges = record["preset"] == "zk", None, {}
    for L in record["layers"]:
        n = L["layer"]
        ranges[n] = {}
        if zk:
            if mode == "layer" or x is None:  # the door: the captured float x at 2^16, half even
                x = fp.to_fixed(captures[n]["x"], fp.ZK_FORMAT)
            nodes = zkf.layer_zk(x, zk_layer(L, weights[n]), cos, sin, mask, shape, ranges[n])
            x = nodes["out"]
        else:
            layer = int_layer(L, weights[n])
            if mode == "layer" or x is None:  # the door: the captured float x to Q(24, f_x), half even
                x = fp.to_fixed(captures[n]["x"], layer.fmt["x"])
            nodes = ifw.layer_int(x, layer, cos, sin, mask, shape, rule, ranges[n])
            nxt = record["layers"][n + 1]["fmt_x"] if n + 1 < len(record["layers"]) else record["head"]["fmt_x"]
            x = ifw.next_input(nodes["out"], layer.fmt["out"], cal.fmt_of(nxt))
        emit(n, nodes, L)
    if mode == "layer":
        last = captures[len(record["layers"]) - 1]["out"]
        x = fp.to_fixed(last, fp.ZK_FORMAT if zk else cal.fmt_of(record["head"]["fmt_x"]))
    return x, ranges


def run(acts_dir: Path, weights_dir: Path, out_dir: Path, model_dir, mode: str = "layer", rule: str = REQUANT,
        calibration: Path | None = None, zk: bool = False, verify_hashes: bool = True) -> int:
    """The whole --integer-only run; returns the exit code (0 when the top-1 token holds at every prompt's last position)."""
    t0 = time.perf_counter()
    if rule not in RULES:
        raise InputError(f"--requant {rule}: give one of {', '.join(RULES)}")
    print("4_offline_forward.py --integer-only: calibrate on step 2's capture, run every layer in integers, report")
    print_settings({"ACTS_DIR": acts_dir, "WEIGHTS_DIR": weights_dir, "OUT_DIR": out_dir, "MODE": mode,
                    "PRESET": "zk" if zk else "int8", "REQUANT": rule, "CALIBRATION": calibration,
                    "ACT_BITS": cal.ACT_BITS, "VERIFY_HASHES": verify_hashes})
    output_folder(out_dir, inputs=[acts_dir, weights_dir] + ([calibration] if calibration else []))
    meta = offline.read_model_meta(acts_dir, model_dir)
    B, T, H, Hkv, Dh = (meta[k] for k in ("batch_size", "seq_len", "num_heads", "num_kv_heads", "head_dim"))
    if meta["hidden_act"] != "silu" or meta["attention_bias"] or meta["mlp_bias"]:
        raise InputError(f"{acts_dir / layout.META_MODEL}: --integer-only implements Llama's SiLU MLP without biases")
    hashes = manifest.HashCheck(verify_hashes)  # every input file against its folder's manifest, before it is read
    hashes.folder(acts_dir, step2_files(meta), "step 2", layout.rerun_step2(model_dir))
    hashes.folder(weights_dir, step1_files(weights_dir, meta), "step 1", layout.rerun_step1(meta["model_dir"], weights_dir))
    print(f"input files: {hashes.line()}")
    mask, position_ids, _ = offline.read_batch(acts_dir, B, T)
    real_rows, last = mask.reshape(-1) > 0, forward.last_real_rows(mask)
    seen_scores = np.broadcast_to(attention.attention_allowed(mask)[:, None], (B, H, T, T))  # (B, H, T, T)
    record, weights, captures = calibrate_model(acts_dir, weights_dir, meta, mask, position_ids, rule, zk)
    preset = record["preset"]
    if calibration is not None:  # a previous run's formats and tables, checked, instead of this one's
        record = read_tables(calibration, meta) | {"rule": rule}
        if record.get("preset") != preset:
            raise InputError(f"{calibration / il.CALIBRATION} is of the {record.get('preset')} preset, "
                             f"this run is {preset}: drop --calibration or match --zk")
    write_tables(out_dir, record)
    record = read_tables(out_dir, meta) | {"rule": rule}  # what runs is what the files say
    cos_t, sin_t = np.array(record["rope"]["cos"], np.int64), np.array(record["rope"]["sin"], np.int64)
    pos = position_ids.astype(np.int64)
    if pos.max() >= len(cos_t):
        raise InputError(f"{calibration}: RoPE tables hold {len(cos_t)} positions, the prompts reach {pos.max()}")
    cos, sin = ifw.rope_positions(cos_t, sin_t, pos)
    files, report = [], {}

    def emit(n: int, nodes: dict, L: dict) -> None:
        files.extend(write_nodes(out_dir, n, nodes, B, H, T))
        report[n] = integer_report.node_metrics(nodes, L, captures[n], real_rows, seen_scores, preset)
    x, ranges = run_layers(record, weights, captures, mode, cos, sin, mask, ifw.Shape(B, T, H, Hkv, Dh), rule, emit)
    rows = None if meta["logits"] == "all" else last
    ranges["head"] = {}
    if preset == "zk":
        Hn = record["head"]["norm"]
        head = zkf.head_zk(x, cal.fmt_of(Hn["fmt_in"]), np.array(Hn["gamma"], np.int64), Hn["eps"], weights["head"],
                           rows, ranges["head"])
        norm, logits = fp.from_fixed(head["norm"], fp.ZK_FORMAT), fp.from_fixed(head["logits"], fp.ZK_FORMAT)
    else:
        head = ifw.head_int(x, int_head(record["head"], weights["head"]), rows, rule, ranges["head"])
        norm = head["norm"] * record["head"]["norm"]["scale_out"]
        logits = fp.from_fixed(head["logits"], cal.fmt_of(record["head"]["fmt_logits"]))
    for node in ifw.HEAD_NODES:
        files.append(il.int_head_node(node))
        write_csv_exact(out_dir / files[-1], head[node].astype(np.int64))
    at = last if meta["logits"] == "all" else np.arange(B)
    head_report = {"norm": integer_report.metrics(norm[real_rows], captures["head"]["norm"][real_rows]),
                   "logits": integer_report.logit_metrics(logits, captures["head"]["logits"], at)}
    if meta["logits"] == "all":  # elsewhere: every real position, not only each prompt's last
        every = np.flatnonzero(real_rows)
        agree = forward.top_k(logits[every], 1) == forward.top_k(captures["head"]["logits"][every], 1)
        head_report["logits"]["top1_every_position"] = [int(agree.sum()), len(every)]
    passed = head_report["logits"]["top1_agree"] == head_report["logits"]["prompts"]
    write_json(out_dir / il.RANGES, {"what": "the integer input range each nonlinear op saw, per layer "
                                             "(EZKL lookup range, zkLLM tlookup)", "preset": preset, "ranges": ranges})
    settings = {"mode": mode, "preset": preset, "input hashes": hashes.line(),
                "requant": rule if preset == "int8" else "none (ZK: >>r 16)",
                "acts_dir": str(acts_dir), "weights_dir": str(weights_dir),
                "calibration": str(calibration) if calibration else "from the captures"}
    write_json(out_dir / il.REPORT_JSON, {"settings": settings, "layers": report, "head": head_report,
                                          "pass": passed})
    write_bytes(out_dir / il.REPORT_MD, integer_report.report_markdown(settings, report, head_report, passed).encode())
    write_manifest(out_dir, record, files, settings)
    lm = head_report["logits"]
    print(f"wrote {len(files)} integer CSV files, tables, {il.CALIBRATION}, {il.MANIFEST}, {il.REPORT_MD} to {out_dir} "
          f"in {time.perf_counter() - t0:.1f} s")
    print(f"integer-only ({mode}, {settings['requant']}, {preset}): logits SQNR {lm['sqnr_db']:.1f} dB, "
          f"KL {lm['kl']:.3g}, top-1 {lm['top1_agree']}/{lm['prompts']} at the last position, top-5 overlap "
          f"{lm['top5_overlap']:.2f}: " + ("PASS" if passed else "FAIL"))
    return 0 if passed else 1


def write_manifest(out_dir: Path, record: dict, files: list[str], settings: dict) -> None:
    tables = [il.CALIBRATION, il.ROPE_COS, il.ROPE_SIN] + [il.silu_table(L["layer"]) for L in record["layers"]]
    sha = {name: hashlib.sha256((out_dir / name).read_bytes()).hexdigest() for name in files + tables}

    def formats(L: dict) -> dict:  # everything but the long lists (gammas and tables live in their files)
        return {k: ({kk: vv for kk, vv in v.items() if kk != "gamma"} if isinstance(v, dict) else v)
                for k, v in L.items() if k not in ("silu_table", "requant")}
    zk = record["preset"] == "zk"
    write_json(out_dir / il.MANIFEST, {"what": "step 4 --integer-only", "settings": settings, "preset": record["preset"],
                                       "rule": None if zk else record["rule"],
                                       "rounding": zkf.ZK_ROUNDING if zk else ROUNDING_RULES,
                                       "formats": {f"layer {L['layer']}": formats(L) for L in record["layers"]},
                                       "head": formats(record["head"]), "rsqrt": record["rsqrt"], "files": sha})
