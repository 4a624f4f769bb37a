"""Every file name a step writes or reads, and the checks of a step's folder.

One home for the on-disk contract (SPEC): no other module builds these names.

    outputs/<model folder>/weights/        step 1: <tensor name>.csv, manifest.json
                           x_all_layers/   step 2: <stem>_layerN.csv, meta_layerN.json, batch files
                           qkv/            step 3: q/k/v/attn/probs_layerN.csv, report.json, report.md, PNGs
                           x_all_layers_offsetK/, qkv_offsetK/   the same at positions K.. (make demo)
                           forward/, forward_chain/   step 4: every node of every layer, norm.csv, logits.csv
                           x_all_layers/decode/step_S/   step 2 with --generate N: decode step S (1..N),
                                           the same files for one new token per prompt (qkv/, forward/ alike)

Per-layer files are `<stem>_layer<N>.<ext>`; the model's own value of a quantity that a later
step recomputes is its `ref_` twin (`ref_q_layerN.csv` beside step 3's `q_layerN.csv`). A new
quantity needs only a new stem, a new folder only a new constant below.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from common import paths
from common.cli import InputError

# Default folders under outputs/<model folder>/ (paths.output_dir).
WEIGHTS, ACTS, QKV, FORWARD, GOLDEN = "weights", "x_all_layers", "qkv", "forward", "golden"
FORWARD_CHAIN = "forward_chain"  # step 4's chain mode, beside its layer mode's folder

DECODE = "decode"  # step 2's --generate N: decode/step_S/ for S = 1..N, in the step folders of 2, 3 and 4
STEP_FOLDER = "step_{}"  # decode step S's folder inside DECODE

# Step 2's files besides the per-layer ones: exactly what was fed to the model.
ATTENTION_MASK = "attention_mask.csv"  # (B, T), 1 = real token
POSITION_IDS = "position_ids.csv"  # (B, T)
TOKENS = "tokens.json"  # prompts, padding side, input_ids, token strings
# Step 2's once-per-run files of the whole model: the final norm, the logits, the model's meta, its vocab.
REF_NORM, REF_LOGITS = "ref_norm.csv", "ref_logits.csv"  # (B*T, d); (B*T, V), or (B, V) with LOGITS "last"
META_MODEL = "meta_model.json"
VOCAB = "vocab.json"  # every token id's text, so step 4 shows top tokens without a tokenizer
MODEL_FILES = (REF_NORM, REF_LOGITS, META_MODEL, VOCAB)
BATCH_FILES = (ATTENTION_MASK, POSITION_IDS, TOKENS)
MANIFEST = "manifest.json"  # steps 1 and 2: every file written, with its sha256 (common/files/manifest.py)
REPORT_JSON, REPORT_MD = "report.json", "report.md"  # a verifying step's report
ERRORS_PLOT = "errors.png"  # max_rel per layer and quantity
# Step 4's files besides the per-layer ones (its recomputed norm and logits: step 2's without ref_).
NORM, LOGITS = "norm.csv", "logits.csv"
CHAIN_PLOT = "chain_errors.png"  # chain mode: the error of each layer's output as it grows
TOP_TOKENS_PLOT = "top_tokens.png"  # the top next tokens, model vs offline, per prompt

# Per-layer stems step 2 writes: x, xnorm and the model's own value of every node (ref_ twins of
# steps 3 and 4's files).
LAYER_REF_STEMS = ("h", "hnorm", "act", "mlp", "out")  # step 2's SAVE_LAYER_REFS
ATTENTION_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
STEP2_STEMS = ("x", "xnorm", "ref_q", "ref_k", "ref_v", "ref_attn", *(f"ref_{s}" for s in LAYER_REF_STEMS),
               "ref_probs", *(f"ref_{t}_{p}" for t in ("xscale", "xzero") for p in ATTENTION_PROJ + MLP_PROJ))
# Step 3's per-layer files (probs: (B*H*T, T), row (b*H + h)*T + t_query, column t_key).
QKV_STEMS = ("q", "k", "v", "probs", "attn")
# Step 4's per-layer files, in forward order (q/k/v/attn/probs are step 3's, checked there).
FORWARD_STEMS = ("xnorm", "h", "hnorm", "act", "mlp", "out")
NORMS = ("input_layernorm", "post_attention_layernorm")
EMBEDDING, FINAL_NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
# Step 1's --filter for what step 3 needs: the input norm and the attention projections (and biases).
ATTENTION_FILTER = r"\.input_layernorm\.|\.self_attn\.(q|k|v|o)_proj\."

_LAYER_FILE = re.compile(r"(?P<stem>\w+?)_layer(?P<n>\d+)\.(?P<ext>csv|json)")
META_KEYS = ("batch_size", "seq_len", "d_model", "num_heads", "num_kv_heads", "head_dim", "rope_theta",
             "rope_type", "rope_scaling", "attention_bias", "dtype", "model_dir", "rms_norm_eps")


def default_dir(model_dir: str | Path, folder: str) -> Path:
    """outputs/<model folder>/<folder>, folder one of the constants above (WEIGHTS, ACTS, ...)."""
    return paths.output_dir(model_dir, folder)


def quant_folder(folder: str, scheme: str | None) -> str:
    """A quantized run's folders live beside the float ones: x_all_layers, w8a8 -> x_all_layers-w8a8."""
    return f"{folder}-{scheme}" if scheme else folder


def quant_file(proj: str, n: int, what: str) -> str:
    """A quantized linear's integer tensor (steps 3/4): what in QUANT_KINDS; q_proj, 3, xq -> xq_q_proj_layer3.csv."""
    return layer_file(f"{what}_{proj}", n)


def xq(proj: str, n: int) -> str:
    """int8 [rows, in_features]: the linear's quantized input."""
    return quant_file(proj, n, "xq")


def xscale(proj: str, n: int) -> str:
    """float32 [rows, 1]: its per-token scale."""
    return quant_file(proj, n, "xscale")


def xzero(proj: str, n: int) -> str:
    """int8 [rows, 1]: its per-token zero point (asymmetric schemes only)."""
    return quant_file(proj, n, "xzero")


def acc(proj: str, n: int) -> str:
    """int32 [rows, out_features] (grouped: [rows, out_features * G], column o*G + g): the exact accumulator."""
    return quant_file(proj, n, "acc")


def ref_xscale(proj: str, n: int) -> str:
    """Step 2, quantized capture: the per-token scale torchao's running linear used (ref_xscale_q_proj_layer3.csv)."""
    return ref_file(f"xscale_{proj}", n)


def ref_xzero(proj: str, n: int) -> str:
    """Step 2, asymmetric schemes: the per-token zero point torchao's running linear used."""
    return ref_file(f"xzero_{proj}", n)


def quant_weight_files(name: str) -> tuple[str, str]:
    """Step 1 --quant's files of a quantized weight: <name>.q.csv (integers), <name>.scale.csv (float32)."""
    return f"{name}.q.csv", f"{name}.scale.csv"


def offset_folder(folder: str, offset: int) -> str:
    """A capture at positions offset.. and its checks live beside the default ones:
    x_all_layers, 100000 -> x_all_layers_offset100000 (qkv -> qkv_offset100000)."""
    return f"{folder}_offset{offset}"


def decode_dir(folder: Path, step: int) -> Path:
    """Decode step `step` (1-based) of a step folder: x_all_layers, 2 -> x_all_layers/decode/step_2."""
    return Path(folder) / DECODE / STEP_FOLDER.format(step)


def decode_path(step: int, name: str) -> str:
    """A decode step's file as a path inside its step folder (a manifest key): 2, x_layer0.csv -> decode/step_2/x_layer0.csv."""
    return f"{DECODE}/{STEP_FOLDER.format(step)}/{name}"


def decode_steps(folder: Path) -> list[int]:
    """The decode steps a step folder holds (decode/step_S/), in order; [] when none."""
    found = (re.fullmatch(r"step_(\d+)", p.name) for p in (Path(folder) / DECODE).glob("step_*") if p.is_dir())
    return sorted(int(m[1]) for m in found if m)


def layer_file(stem: str, n: int, ext: str = "csv") -> str:
    """`x`, 3 -> x_layer3.csv."""
    return f"{stem}_layer{n}.{ext}"


def ref_file(stem: str, n: int) -> str:
    """The model's own value of a recomputed quantity: `q`, 3 -> ref_q_layer3.csv."""
    return layer_file(f"ref_{stem}", n)


def meta_file(n: int) -> str:
    return layer_file("meta", n, "json")


def attention_plot(layer: int, head: int) -> str:
    return f"attention_layer{layer}_head{head}.png"


def parse_layer_file(name: str) -> tuple[str, int] | None:
    """x_layer3.csv -> ("x", 3); meta_layer3.json -> ("meta", 3); anything else -> None."""
    m = _LAYER_FILE.fullmatch(name)
    return (m["stem"], int(m["n"])) if m else None


def is_step2_file(name: str) -> bool:
    """A file step 2 writes (so a rerun may remove it when it did not write it this time)."""
    parsed = parse_layer_file(name)
    if parsed is None:
        return name in BATCH_FILES or name in MODEL_FILES
    stem, _ = parsed
    return (stem == "meta" and name.endswith(".json")) or (stem in STEP2_STEMS and name.endswith(".csv"))


def weight_name(n: int, module: str, proj: str, kind: str) -> str:
    """The checkpoint's tensor name: 3, self_attn, q_proj, weight -> model.layers.3.self_attn.q_proj.weight."""
    return f"model.layers.{n}.{module}.{proj}.{kind}"


def norm_weight_name(n: int, norm: str) -> str:
    """3, input_layernorm -> model.layers.3.input_layernorm.weight."""
    return f"model.layers.{n}.{norm}.weight"


def weight_file(name: str) -> str:
    """Step 1 names a CSV after its tensor."""
    return f"{name}.csv"


def attention_weight_files(weights_dir: Path, n: int, bias: bool) -> dict[str, Path]:
    """Tensor name -> step-1 CSV path of layer n's q/k/v/o_proj (weights, and biases when `bias`)."""
    kinds = ("weight", "bias") if bias else ("weight",)
    names = [weight_name(n, "self_attn", proj, kind) for proj in ATTENTION_PROJ for kind in kinds]
    return {name: weights_dir / weight_file(name) for name in names}


def mlp_weight_files(weights_dir: Path, n: int, bias: bool) -> dict[str, Path]:
    """Tensor name -> step-1 CSV path of layer n's gate/up/down_proj (weights, and biases when `bias`)."""
    kinds = ("weight", "bias") if bias else ("weight",)
    names = [weight_name(n, "mlp", proj, kind) for proj in MLP_PROJ for kind in kinds]
    return {name: weights_dir / weight_file(name) for name in names}


def layer_weight_files(weights_dir: Path, n: int, attention_bias: bool, mlp_bias: bool) -> dict[str, Path]:
    """Every tensor of decoder layer n that step 4 needs: both norms, attention, MLP."""
    norms = {norm_weight_name(n, norm): weights_dir / weight_file(norm_weight_name(n, norm)) for norm in NORMS}
    return {**norms, **attention_weight_files(weights_dir, n, attention_bias),
            **mlp_weight_files(weights_dir, n, mlp_bias)}


def head_weight_files(weights_dir: Path, tied: bool) -> dict[str, Path]:
    """The final norm and the head: lm_head.weight, or the embedding when the embeddings are tied."""
    names = (FINAL_NORM, EMBEDDING if tied else LM_HEAD)
    return {name: weights_dir / weight_file(name) for name in names}


# --- reading a step-2 folder -------------------------------------------------------------------

def rerun_step2(model_dir: str | Path | None = None) -> str:
    """The command that makes a step-2 folder (for the default folder of model_dir, when given)."""
    return "run: python 2_get_x.py" + (f" --model-dir {shlex.quote(str(model_dir))}" if model_dir else "")


def rerun_step1(model_dir: str | Path, weights_dir: Path) -> str:
    """The command that rewrites a step-1 folder's files, even those its manifest says still match."""
    return (f"run: python 1_model_weights.py --model-dir {shlex.quote(str(model_dir))} "
            f"--out-dir {shlex.quote(str(weights_dir))} --force")


def capture_source(acts_dir: Path, fallback: str | Path | None) -> str | Path | None:
    """The model folder a step-2 capture came from (its meta files say), for a rerun hint that names the
    right model even when the capture's files are damaged; `fallback` where no meta file says it."""
    for name in (META_MODEL, *sorted(p.name for p in acts_dir.glob(meta_file("*")))):
        try:
            said = json.loads((acts_dir / name).read_bytes()).get("model_dir")
        except (OSError, ValueError, AttributeError, RecursionError):  # a hint only: the hash check names the fault
            continue
        if isinstance(said, str) and said:
            return said
    return fallback


def step2_layers(acts_dir: Path, model_dir: str | Path | None = None) -> list[int]:
    """The layers with a meta file in a step-2 folder; InputError when there are none."""
    if not acts_dir.is_dir():
        raise InputError(f"activations folder {acts_dir} does not exist: {rerun_step2(model_dir)}")
    parsed = (parse_layer_file(p.name) for p in acts_dir.glob(meta_file("*")))
    have = sorted(n for stem, n in filter(None, parsed) if stem == "meta")
    if not have:
        raise InputError(f"no meta_layerN.json in {acts_dir}: {rerun_step2(model_dir)}")
    return have


# --- reading a step-1 folder -------------------------------------------------------------------

def qkv_weight_files(weights_dir: Path, n: int, bias: bool) -> dict[str, Path]:
    """What step 3 reads of layer n: input_layernorm and q/k/v/o_proj (and their biases)."""
    norm = norm_weight_name(n, "input_layernorm")
    return {norm: weights_dir / weight_file(norm), **attention_weight_files(weights_dir, n, bias)}


def check_attention_weights(weights_dir: Path, metas: dict[int, dict]) -> None:
    """Every file step 3 reads of the layers in `metas` exists, or InputError with the step-1 command."""
    layers = list(metas)
    missing = [p for n in layers for p in qkv_weight_files(weights_dir, n, metas[n]["attention_bias"]).values()
               if not p.is_file()]
    if not missing:
        return
    src = shlex.quote(str(metas[layers[0]]["model_dir"]))
    one_layer = rf"^model\.layers\.{layers[0]}\.(input_layernorm|self_attn)\."
    select = f"--filter {shlex.quote(one_layer if len(layers) == 1 else ATTENTION_FILTER)}"
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise InputError(f"{missing[0]} is missing{more}: run python 1_model_weights.py --model-dir {src} "
                     f"--out-dir {shlex.quote(str(weights_dir))} {select}")


# --- steps 5 and 6 -----------------------------------------------------------------------------

GRADE = "grade"  # step 6's default folder under outputs/<model folder>/ (beside GOLDEN, step 5's)
GOLDEN_MANIFEST = "golden_manifest.json"  # step 5's record of every file it wrote


def golden_file(tensor: str, fmt: str, layer: int | None) -> str:
    """Step 5's file of a tensor: <tensor>.<fmt>; npz: one archive per layer, layerN.npz (model.npz: no layer)."""
    if fmt == "npz":
        return "model.npz" if layer is None else f"layer{layer}.npz"
    return f"{tensor}.{fmt}"


# --- the quantized path (issue 19, docs/quantized.md): integer tensors of steps 3/4 ------------

# Per layer N and linear P, steps 3/4 of a quantized capture write (rows as the node's, b*T + t):
#   xq_P_layerN.csv int8 [rows, in], xscale_P_layerN.csv float32 [rows, 1],
#   xzero_P_layerN.csv int8 [rows, 1] (asymmetric schemes), acc_P_layerN.csv int32 [rows, out (x G)]
QUANT_LINEARS = ATTENTION_PROJ + MLP_PROJ
GOLDEN_RTL = "golden_rtl"  # step 5 --rtl's default folder (+ "-<scheme>"): examples/rtl's vector files
QUANT_KINDS = ("xq", "xscale", "xzero", "acc")
_QUANT_FILE = re.compile(r"(?P<kind>xq|xscale|xzero|acc)_(?P<proj>" + "|".join(QUANT_LINEARS) + r")_layer(?P<n>\d+)")


def parse_quant_file(stem: str) -> tuple[str, str, int] | None:
    """xq_q_proj_layer0 -> ("xq", "q_proj", 0); anything else -> None."""
    m = _QUANT_FILE.fullmatch(stem)
    return (m["kind"], m["proj"], int(m["n"])) if m else None
