"""Step 2: run prompts once; save every layer's input and every node the model computes, with meta.

    python 2_get_x.py                                       # MODEL_DIR, TEST_PROMPT
    python 2_get_x.py --model-dir model_paths/SmolLM2-135M-Instruct-Q4_1 --prompt "Hi" --prompt "Hello there"
    python 2_get_x.py --chat --layers 0,5-7 --dtype bfloat16
    python 2_get_x.py --streaming                           # one decoder layer in memory at a time
    python 2_get_x.py --position-offset 100000              # positions 100000.. (long-context RoPE)
    python 2_get_x.py --generate 4                          # + 4 greedy decode steps through the KV cache

Reads a model folder (config.json, safetensors, tokenizer). Writes to OUT_DIR (default
outputs/<model folder>/x_all_layers), rows batch-major (row = b*T + t): each layer's input x_layerN,
xnorm, every node the model computes (ref_q/k/v/attn/probs/h/hnorm/act/mlp/out_layerN), ref_norm and
ref_logits, meta_layerN.json, meta_model.json, masks, positions, tokens.json, vocab.json, and last
manifest.json (every file's sha256: steps 3 and 4 check their inputs by it). --generate N adds
decode/step_S/ (greedy steps through the model's own KV cache); --quant SCHEME captures torchao's
quantized model and the per-token activation scales it used (ref_xscale_P_layerN.csv). Everything is
captured by hooks on the running model, never recomputed. Files and flags: docs/step2_capture.md.
"""
import argparse
import time

import torch

from common import cli, paths
from common.cli import InputError, parse_layers, print_settings, run
from common.files import layout, manifest
from common.files.atomic import output_folder
from common.model import capture, hf_cache
from common.model.model_config import load_config
from common.model.quant import check_capture
from common.model.prompts import check_position_offset, encode_prompts, load_tokenizer
from common.model.weights_check import check_weights
from common.quant.schemes import scheme_arg

MODEL_DIR = paths.MODEL_DIR  # the model folder (config.json, safetensors, tokenizer), or a repo id in the HF cache
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
QUANT = None  # None: the float model | w8a8 | w4a8-g32 | w8a16 | w4a16-g32: quantized by torchao first
QUANT_HEAD = False  # with QUANT: the head too, int8 per output channel (Meta's Llama-3.2 model card)
WARN_WRITE_GB = 5.0  # warn when the layer CSVs will take more than this

DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.Parser(globals())
    p.shared("--model-dir")
    p.flag("--revision")
    # append would add to a default list, so the default (TEST_PROMPT) is applied after parsing.
    p.flag("--test-prompt", "--prompt", dest="test_prompt", action="append", default=None, metavar="TEXT")
    p.shared("--out-dir")
    for name in ("--save-x-norm", "--save-masks", "--save-reference", "--save-layer-refs", "--save-attn-probs"):
        p.flag(name, action=argparse.BooleanOptionalAction)
    p.flag("--logits", choices=capture.LOGITS_CHOICES)
    p.flag("--dtype", choices=DTYPES)
    p.flag("--layers", type=str)  # checked against the model's layer count once config.json is read
    p.flag("--device", choices=("cpu", "cuda", "auto"))
    p.flag("--chat", action=argparse.BooleanOptionalAction)
    p.flag("--streaming", action=argparse.BooleanOptionalAction)
    p.flag("--padding-side", choices=("left", "right"))
    p.flag("--position-offset", type=int, metavar="K")
    p.flag("--generate", type=int, metavar="N")
    p.flag("--quant", type=scheme_arg, metavar="SCHEME")
    p.flag("--quant-head", action="store_true")
    p.flag("--warn-write-gb", type=float)
    args = p.parse_args(argv)
    capture.check_generate(args.generate, args.streaming)
    args.model_dir = hf_cache.resolve_model_dir(args.model_dir, args.revision)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.model_dir)  # InputError: missing folder/config.json, not Llama-family
    check_weights(args.model_dir, cfg)  # InputError: no weights, or files that disagree with config.json
    check_capture(args.quant, args.quant_head, args.dtype, cfg)
    prompts = args.test_prompt or ([TEST_PROMPT] if isinstance(TEST_PROMPT, str) else list(TEST_PROMPT))
    layers = parse_layers(args.layers, cfg.num_layers) or list(range(cfg.num_layers))
    scheme_name = args.quant.name if args.quant else None
    out_dir = args.out_dir or layout.default_dir(args.model_dir, layout.quant_folder(layout.ACTS, scheme_name))
    tokenizer = load_tokenizer(args.model_dir)
    if args.chat and not tokenizer.chat_template:
        raise InputError(f"--chat: the tokenizer of {args.model_dir} has no chat template "
                         "(tokenizer_config.json); drop --chat")
    batch = encode_prompts(tokenizer, prompts, chat=args.chat,
                           padding_side=args.padding_side, max_positions=cfg.max_position_embeddings,
                           vocab_size=cfg.vocab_size, position_offset=args.position_offset)
    B, T = batch.input_ids.shape
    check_position_offset(args.position_offset, T + args.generate, cfg.max_position_embeddings)  # room to decode
    s = capture.settings(args.dtype, args.device, args.save_x_norm, args.save_reference, args.save_layer_refs,
                         args.save_attn_probs, T, args.logits, args.generate,
                         (args.quant, args.quant_head) if args.quant else None)
    size, probs = capture.plan(cfg, B, T, len(layers), s, args.save_attn_probs)
    print_settings({**cli.settings(args, TEST_PROMPT=f"{B} prompt(s), padded to {T} tokens", OUT_DIR=out_dir, QUANT=scheme_name,
                                   LAYERS=f"{len(layers)} of {cfg.num_layers}", DEVICE=s.device),
                    "attention probs": probs, "about to write": f"~{size / 1e9:.2f} GB of CSV"})
    if size > args.warn_write_gb * 1e9:
        print(f"warning: this capture writes ~{size / 1e9:.1f} GB to {out_dir} ({B} x {T} tokens, "
              f"{len(layers)} layers); fewer --layers or a shorter prompt write less", flush=True)

    output_folder(out_dir, inputs=[args.model_dir, paths.cache_repo(args.model_dir)],
                  create=False)  # never into (or around) the model folder, nor its HF cache repo
    manifest.remove_manifest(out_dir, 2)  # until this run's is written, last, nothing vouches for the folder
    meta = capture.layer_meta(cfg, batch, args.model_dir, s.dtype, s.device, args.streaming, args.chat)
    if args.quant is not None:
        meta["quant"] = args.quant.record(args.quant_head)
    written = capture.Written()  # file name (a path inside out_dir) -> manifest entry (shape, bytes, sha256)
    decoder = capture.Decoder(written, out_dir, meta, batch, tokenizer, args.save_masks)
    t0 = time.perf_counter()
    run_model = capture.stream_capture if args.streaming else capture.full_model_capture
    with torch.inference_mode():
        facts = run_model(args.model_dir, batch, layers, s, capture.Sink(written, out_dir, meta), decoder)
    written.entries.update(capture.write_batch(out_dir, batch, args.save_masks))
    written.entries.update(capture.write_model_files(out_dir, cfg, meta, facts, args.logits, tokenizer))
    capture.remove_stale(out_dir, written.entries)
    if written.generated:
        text = [tokenizer.decode(row) for row in torch.stack(written.generated, 1).tolist()]
        print("greedy tokens: " + " | ".join(repr(t) for t in text))
    manifest.write_step_manifest(out_dir, 2, written.entries, manifest.input_signature(args.model_dir))
    nbytes = sum(e["bytes"] for name, e in written.entries.items() if name.endswith(".csv"))
    print(f"wrote {len(written.entries)} files ({nbytes / 1e6:.1f} MB of CSV, attention probabilities "
          f"{written.probs_bytes / 1e6:.1f} MB of it) and {layout.MANIFEST} (their sha256) to {out_dir} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    run(main)
