"""Step 2: run prompts once; save every layer's input and every node the model computes, with meta.

    python 2_get_x.py                                       # MODEL_DIR, TEST_PROMPT
    python 2_get_x.py --model-dir model_paths/SmolLM2-135M-Instruct-Q4_1 --prompt "Hi" --prompt "Hello there"
    python 2_get_x.py --chat --layers 0,5-7 --dtype bfloat16
    python 2_get_x.py --streaming                           # one decoder layer in memory at a time
    python 2_get_x.py --position-offset 100000              # positions 100000.. (long-context RoPE)
    python 2_get_x.py --generate 4                          # + 4 greedy decode steps through the KV cache

Reads a model folder (config.json, safetensors, tokenizer). Writes to OUT_DIR
(default outputs/<model folder>/x_all_layers), for every decoder layer N, with B prompts padded to
T tokens and rows batch-major (row = b*T + t):
    x_layerN.csv [B*T, d]      the hidden state entering layer N
    xnorm_layerN.csv [B*T, d]  input_layernorm(x), weight included: what q/k/v_proj see
    meta_layerN.json           sizes, RoPE (normalised; the model's own inv_freq and torch's CPU
                               capability), eps, dtype, padding side, provenance
    ref_q_layerN.csv [B*T, H*Dh], ref_k_/ref_v_layerN.csv [B*T, Hkv*Dh]
                               the model's own Q, K after RoPE and V; columns head-major (h*Dh + d)
    ref_attn_layerN.csv [B*T, d]  the attention block's output (after o_proj)
    ref_probs_layerN.csv [B*H*T, T]  softmax attention probabilities, row (b*H + h)*T + t_query, column t_key
    ref_h_layerN.csv [B*T, d]  x + attention: the residual after attention
    ref_hnorm_layerN.csv [B*T, d]  post_attention_layernorm(h)
    ref_act_layerN.csv [B*T, I]  act(gate_proj(hnorm)) * up_proj(hnorm): what down_proj sees
    ref_mlp_layerN.csv [B*T, d]  the MLP output (after down_proj)
    ref_out_layerN.csv [B*T, d]  the layer output h + mlp (= x_layer(N+1).csv bit for bit)
and once per run:
    ref_norm.csv [B*T, d]      the final model.norm output             (LOGITS "all" or "last")
    ref_logits.csv [B*T, V]    the logits; [B, V] with LOGITS "last" (each prompt's last real position)
    vocab.json                 every token id's decoded text, for step 4's top-5 table (no tokenizer there)
    meta_model.json            num_layers, vocab_size, intermediate_size, hidden_act, mlp_bias, norm class,
                               tie_word_embeddings, logits mode, and the layer meta (RoPE, eps, provenance)
    attention_mask.csv, position_ids.csv [B, T], tokens.json
    manifest.json              every file above (path, shape, bytes, sha256) and what was read of the model
                               folder (small files by sha256, the weights by size and mtime); written
                               last, so a run cut short leaves none. Steps 3 and 4 check their inputs by it.
With --generate N (GENERATE), N greedy decode steps follow the prefill through the model's own KV cache
(transformers' DynamicCache, use_cache=True, as generate() runs them); step S (1..N) feeds each prompt
its last greedy token as one new row and writes decode/step_S/: the same per-layer files with one row
per prompt (ref_k/ref_v: the new token's row; ref_probs [B*H, T+S]: over the cache and the new
token), ref_norm/ref_logits [B, ...], meta_layerN.json (seq_len 1, decode_step, cache_len),
attention_mask.csv [B, T+S] (cache + new token), position_ids.csv [B, 1] (each prompt's last
position + 1) and tokens.json (the token fed, the greedy next_ids, every id generated so far);
manifest.json lists them too (decode/step_S/<name>).
Not with --streaming (one layer in memory cannot keep a cache over steps).
Everything is captured by hooks on the running model (eager attention), never recomputed.
Positions count each prompt's real tokens from POSITION_OFFSET (default 0), as generate() does, so a
padded batch matches each prompt run alone; an offset K feeds positions K.. as position_ids, as if K
tokens came before (checks RoPE far into the context window). The total size is printed before
anything is written, with a warning above WARN_WRITE_GB. Files left by an earlier run with other
settings are removed.
"""
import argparse
import time
from pathlib import Path

import torch

from common import paths
from common.cli import InputError, parse_layers, path_arg, print_settings, run
from common.files import layout, manifest
from common.files.atomic import output_folder
from common.llama import attention
from common.model import capture, hf_cache
from common.model.model_config import load_config
from common.model.prompts import check_position_offset, encode_prompts, load_tokenizer
from common.model.weights_check import check_weights

MODEL_DIR = paths.MODEL_DIR
REVISION = hf_cache.REVISION  # with a repo id as MODEL_DIR: None (refs/main), a branch, tag or commit
TEST_PROMPT = "The capital of France is"  # a string, or a list of strings for a batch
OUT_DIR = None  # None: outputs/<model folder>/x_all_layers
SAVE_X_NORM = True  # xnorm_layerN.csv
SAVE_MASKS = True  # attention_mask.csv, position_ids.csv
SAVE_REFERENCE = True  # ref_q/ref_k/ref_v/ref_attn_layerN.csv
SAVE_LAYER_REFS = True  # ref_h/ref_hnorm/ref_act/ref_mlp/ref_out_layerN.csv
SAVE_ATTN_PROBS = True  # ref_probs_layerN.csv: B*H*T*T values per layer (size printed; up to 1024 tokens)
LOGITS = "all"  # ref_norm.csv + ref_logits.csv: "all" positions, "last" real position of each prompt, or "none"
DTYPE = "float32"  # compute dtype: float32 (exact references; bf16/fp16 files are widened), bfloat16, float16
LAYERS = None  # None: every layer; or "0,3-5"
DEVICE = "auto"  # cpu, cuda, auto (cuda when available)
CHAT = False  # wrap each prompt in the tokenizer's chat template (user turn + assistant header)
STREAMING = False  # load, run and free one decoder layer at a time (capture.stream_capture)
PADDING_SIDE = "left"  # left (as generate() pads) or right
POSITION_OFFSET = 0  # first position of every prompt: 0 .. max_position_embeddings - prompt length
GENERATE = 0  # greedy decode steps after the prefill, each captured in decode/step_S/ (not with STREAMING)
WARN_WRITE_GB = 5.0  # warn when the layer CSVs will take more than this

DTYPES = ("float32", "bfloat16", "float16")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device here; use --device cpu or auto")
    return torch.device(name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=path_arg, default=MODEL_DIR,
                   help="a model folder, or a repo id (org/name) in the Hugging Face cache")
    p.add_argument("--revision", default=REVISION, help="with a repo id: a branch, tag or commit (default: main)")
    # append would add to a default list, so the default (TEST_PROMPT) is applied after parsing.
    p.add_argument("--test-prompt", "--prompt", dest="test_prompt", action="append", default=None,
                   metavar="TEXT", help="a prompt; repeat for a batch (default: TEST_PROMPT)")
    p.add_argument("--out-dir", type=path_arg, default=OUT_DIR, help="default: outputs/<model folder>/x_all_layers")
    p.add_argument("--save-x-norm", action=argparse.BooleanOptionalAction, default=SAVE_X_NORM)
    p.add_argument("--save-masks", action=argparse.BooleanOptionalAction, default=SAVE_MASKS)
    p.add_argument("--save-reference", action=argparse.BooleanOptionalAction, default=SAVE_REFERENCE)
    p.add_argument("--save-layer-refs", action=argparse.BooleanOptionalAction, default=SAVE_LAYER_REFS)
    p.add_argument("--save-attn-probs", action=argparse.BooleanOptionalAction, default=SAVE_ATTN_PROBS)
    p.add_argument("--logits", choices=capture.LOGITS_CHOICES, default=LOGITS)
    p.add_argument("--dtype", choices=DTYPES, default=DTYPE, help="compute dtype")
    p.add_argument("--layers", default=LAYERS, help="e.g. 0,3-5 (default: all)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default=DEVICE)
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=CHAT)
    p.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=STREAMING)
    p.add_argument("--padding-side", choices=("left", "right"), default=PADDING_SIDE)
    p.add_argument("--position-offset", type=int, default=POSITION_OFFSET, metavar="K",
                   help="positions start at K (default: POSITION_OFFSET)")
    p.add_argument("--generate", type=int, default=GENERATE, metavar="N",
                   help="N greedy decode steps after the prefill, captured in decode/step_S/ (default: GENERATE)")
    p.add_argument("--warn-write-gb", type=float, default=WARN_WRITE_GB)
    args = p.parse_args(argv)
    args.model_dir = hf_cache.resolve_model_dir(args.model_dir, args.revision)

    if args.generate < 0:
        raise InputError(f"--generate {args.generate}: give 0 (no decode steps) or more")
    if args.generate and args.streaming:
        raise InputError("--generate with --streaming: decode steps need the whole model and its KV cache in "
                         "memory; drop --streaming (or --generate)")
    cfg = load_config(args.model_dir)  # InputError: missing folder/config.json, not Llama-family
    check_weights(args.model_dir, cfg)  # InputError: no weights, or files that disagree with config.json
    prompts = args.test_prompt or ([TEST_PROMPT] if isinstance(TEST_PROMPT, str) else list(TEST_PROMPT))
    layers = parse_layers(args.layers, cfg.num_layers) or list(range(cfg.num_layers))
    device = resolve_device(args.device)
    out_dir = args.out_dir or layout.default_dir(args.model_dir, layout.ACTS)

    dtype = getattr(torch, args.dtype)
    tokenizer = load_tokenizer(args.model_dir)
    if args.chat and not tokenizer.chat_template:
        raise InputError(f"--chat: the tokenizer of {args.model_dir} has no chat template "
                         "(tokenizer_config.json); drop --chat")
    batch = encode_prompts(tokenizer, prompts, chat=args.chat,
                           padding_side=args.padding_side, max_positions=cfg.max_position_embeddings,
                           vocab_size=cfg.vocab_size, position_offset=args.position_offset)
    B, T = batch.input_ids.shape
    check_position_offset(args.position_offset, T + args.generate, cfg.max_position_embeddings)  # room to decode
    logit_rows = {"all": B * T, "last": B, "none": 0}[args.logits]
    # Steps 3 and 4 hold (and check) every head's probabilities up to PROBS_MAX_SEQ_LEN tokens only.
    save_probs = args.save_attn_probs and T <= attention.PROBS_MAX_SEQ_LEN
    size = capture.csv_bytes_estimate(cfg, B * T, len(layers), args.save_x_norm, args.save_reference,
                                      args.save_layer_refs, save_probs, T, logit_rows)
    size += args.generate * capture.csv_bytes_estimate(cfg, B, len(layers), args.save_x_norm, args.save_reference,
                                                       args.save_layer_refs, save_probs, T + args.generate,
                                                       B if logit_rows else 0)
    probs_mb = capture.CSV_BYTES_PER_VALUE * len(layers) * B * cfg.num_heads * T * T / 1e6
    probs = (f"{len(layers)} x [{B * cfg.num_heads * T}, {T}], about {probs_mb:.1f} MB" if save_probs
             else f"off: {T} tokens > PROBS_MAX_SEQ_LEN {attention.PROBS_MAX_SEQ_LEN}" if args.save_attn_probs
             else "off")
    print_settings({"model dir": args.model_dir, "prompts": B, "padded length": T,
                    "positions": f"from {args.position_offset}", "decode steps": args.generate,
                    "layers": f"{len(layers)} of {cfg.num_layers}", "dtype": args.dtype, "device": device,
                    "streaming": args.streaming, "chat": args.chat, "padding side": args.padding_side,
                    "layer refs": args.save_layer_refs, "logits": args.logits,
                    "attention probs": probs,
                    "out dir": out_dir, "about to write": f"~{size / 1e9:.2f} GB of CSV"})
    if size > args.warn_write_gb * 1e9:
        print(f"warning: this capture writes ~{size / 1e9:.1f} GB to {out_dir} ({B} x {T} tokens, "
              f"{len(layers)} layers); fewer --layers or a shorter prompt write less", flush=True)

    output_folder(out_dir, inputs=[args.model_dir, paths.cache_repo(args.model_dir)],
                  create=False)  # never into (or around) the model folder, nor its HF cache repo
    manifest.remove_manifest(out_dir, 2)  # until this run's is written, last, nothing vouches for the folder
    meta = capture.layer_meta(cfg, batch, args.model_dir, dtype, device, args.streaming, args.chat)
    written: dict[str, dict] = {}  # file name (a path inside out_dir) -> manifest entry (shape, bytes, sha256)
    probs_bytes = 0

    def sinks(folder: Path, meta: dict, key=lambda name: name):
        """Where the layers and the head of one forward pass go: folder, with meta; key(name) is the
        manifest's name of a file written there."""
        def sink(n: int, tensors: dict) -> None:
            nonlocal probs_bytes
            entries = capture.write_layer(folder, n, tensors, meta)
            probs_bytes += entries.get(layout.ref_file("probs", n), {}).get("bytes", 0)
            written.update({key(name): e for name, e in entries.items()})

        def head_sink(tensors: dict) -> None:
            written.update({key(name): e for name, e in capture.write_head(folder, tensors).items()})
        return sink, head_sink

    generated: list[torch.Tensor] = []  # (B,) greedy ids: the prefill's, then each step's

    def decode_sinks(step: int, fed: dict):
        folder, key = layout.decode_dir(out_dir, step), lambda name: layout.decode_path(step, name)
        step_meta = {**meta, "seq_len": 1, "decode_step": step, "cache_len": T + step - 1}
        if not generated:  # step 1 feeds the prefill's greedy token
            generated.append(fed["input_ids"][:, 0])

        def record(next_ids: torch.Tensor) -> None:
            generated.append(next_ids)
            entries = capture.write_decode_batch(folder, batch, step, fed, torch.stack(generated, 1), tokenizer,
                                                 args.save_masks)
            written.update({key(name): e for name, e in entries.items()})
        return (*sinks(folder, step_meta, key), record)

    t0 = time.perf_counter()
    run_model = capture.stream_capture if args.streaming else capture.full_model_capture
    decoding = {"generate": args.generate, "decode_sinks": decode_sinks} if args.generate else {}
    sink, head_sink = sinks(out_dir, meta)
    with torch.inference_mode():
        facts = run_model(args.model_dir, batch, layers, sink, dtype, device, args.save_x_norm, args.save_reference,
                          meta, args.save_layer_refs, save_probs, args.logits, head_sink, **decoding)
    written.update(capture.write_batch(out_dir, batch, args.save_masks))
    written.update(capture.write_model_files(out_dir, cfg, meta, facts, args.logits, tokenizer))
    stale = capture.stale_files(out_dir, written) + capture.stale_decode_files(out_dir, written)
    for path in stale:
        path.unlink()
        print(f"removed {path.relative_to(out_dir)} (left by an earlier run)")
    capture.remove_empty_decode_dirs(out_dir)
    if generated:
        text = [tokenizer.decode(row) for row in torch.stack(generated, 1).tolist()]
        print("greedy tokens: " + " | ".join(repr(t) for t in text))
    manifest.write_step_manifest(out_dir, 2, written, manifest.input_signature(args.model_dir))
    nbytes = sum(e["bytes"] for name, e in written.items() if name.endswith(".csv"))
    print(f"wrote {len(written)} files ({nbytes / 1e6:.1f} MB of CSV, attention probabilities "
          f"{probs_bytes / 1e6:.1f} MB of it) and {layout.MANIFEST} (their sha256) to {out_dir} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    run(main)
