"""Step 1: export a model's tensors from its safetensors files (CSV by default).

    python 1_model_weights.py --model-dir model_paths/meta-llama_Llama-3.2-1B-Instruct   # every tensor: what `make steps` runs
    python 1_model_weights.py --filter '\\.input_layernorm\\.|\\.self_attn\\.(q|k|v|o)_proj\\.'  # only what step 3 reads
    python 1_model_weights.py --list                                    # names, shapes, dtypes, shards
    python 1_model_weights.py --layer model.layers.8 --format ckpt      # one state dict, prefix stripped
    python 1_model_weights.py --filter '^model\\.embed_tokens\\.weight$' --format npy --dtype float16
    python 1_model_weights.py --quant w8a8                              # linears as int8 + scales (docs/quantized.md)

Reads MODEL_DIR (model.safetensors, or shards + model.safetensors.index.json); opens only the
shards that hold the selected tensors and reads one tensor at a time.
Writes OUT_DIR/<tensor name>.<csv|txt|npy|safetensors|ckpt> (with --layer and ckpt/safetensors:
one file <PREFIX>.<ext>, keys with the prefix stripped) and OUT_DIR/manifest.json.
CSV: no header, one line per row (a 1-D tensor is one line); every value is the shortest decimal
that parses back to exactly the source's float32 value (bf16/fp16 widened exactly).
--quant SCHEME (w8a8, w4a8-g32, w8a16, w4a16-g32): the seven linears of every layer (and with
--quant-head the head) as <name>.q.csv (integers) and <name>.scale.csv (float32), bit-identical to
torchao's; every other tensor as without it.
A rerun skips files whose manifest entry still matches the source (--force rewrites them).
"""
from __future__ import annotations


from common import cli, paths
from common.cli import InputError, Interrupted, print_settings, run
from common.files import export, layout, quant_export
from common.files.atomic import output_folder
from common.files.safetensors_io import head_is_tied, index_weight_map, list_tensors
from common.model import hf_cache
from common.quant.schemes import scheme_arg

MODEL_DIR = paths.MODEL_DIR  # the model folder, or a repo id in the HF cache (docs/models.md)
REVISION = hf_cache.REVISION  # with a repo id: None (refs/main), a branch, tag or commit
OUT_DIR = None  # None -> outputs/<model folder>/weights
FORMAT = "csv"  # csv | txt (space-separated) | npy | safetensors | ckpt (torch state dict)
# A callable on the tensor name, or None for all. Attention projections only:
#   NAME_FILTER = lambda n: ".self_attn." in n and any(x in n for x in [".q_proj.", ".k_proj.", ".v_proj.", ".o_proj."])
NAME_FILTER = None
LAYER = None  # a name prefix, matched at a dot boundary: "model.layers.8" (not model.layers.80)
DTYPE = None  # None keeps the source's float32 values | float32 | float16 | bfloat16 | source (npy/safetensors/ckpt)
QUANT = None  # None: floats | w8a8 | w4a8-g32 | w8a16 | w4a16-g32 (w4a8-g<N>, w4a16-g<N>): quantized linears
QUANT_HEAD = False  # with QUANT: the head too, int8 per output channel (Meta's Llama-3.2 model card)


def parse_args(argv: list[str] | None):
    p = cli.Parser(globals())
    p.shared("--model-dir")
    p.flag("--revision")
    p.shared("--out-dir")
    p.flag("--format")
    p.flag("--filter", dest="name_filter", type=export.regex_filter,
           help="keep the names this regex matches anywhere (replaces NAME_FILTER)")
    p.flag("--layer")
    p.flag("--dtype")
    p.flag("--quant", type=scheme_arg)
    p.flag("--quant-head", action="store_true")
    p.flag("--list", action="store_true", help="print the selected tensors (all by default) and exit")
    p.flag("--force", action="store_true", help="rewrite files even where the manifest says they match")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:  # Ctrl-C up to the export: nothing written (the export says what it wrote)
        args = parse_args(argv)
        args.model_dir = hf_cache.resolve_model_dir(args.model_dir, args.revision)
        folder = layout.quant_folder(layout.WEIGHTS, args.quant and args.quant.name)  # weights, or weights-w8a8
        out_dir = args.out_dir or layout.default_dir(args.model_dir, folder)
        export.check_choices(args.format, args.dtype, args.layer)
        if args.list:
            infos = export.select_tensors(args.model_dir, args.name_filter, args.layer)
            # The head's status needs every name; with an index it costs no shard reads.
            names = index_weight_map(args.model_dir) or list_tensors(args.model_dir)
            print(export.listing(args.model_dir, infos, head_is_tied(dict.fromkeys(names))))
            return 0
        if args.quant_head and args.quant is None:
            raise InputError("--quant-head needs --quant SCHEME")
        if args.quant is not None and args.format != "csv":
            raise InputError(f"--quant writes CSV (integers and scales): drop --format {args.format}")
        output_folder(out_dir, inputs=[args.model_dir, paths.cache_repo(args.model_dir)],
                      create=False)  # never into (or around) the model folder, nor its HF cache repo
        print_settings(cli.settings(args, OUT_DIR=out_dir, NAME_FILTER=export.describe_filter(args.name_filter),
                                    QUANT=args.quant and args.quant.name))
        infos = export.select_tensors(args.model_dir, args.name_filter, args.layer)
        quantized = {}
        if args.quant is not None:  # checked whole (group sizes) before anything is written
            names = index_weight_map(args.model_dir) or list_tensors(args.model_dir)
            infos, quantized = quant_export.split(infos, args.quant, args.quant_head,
                                                  head_is_tied(dict.fromkeys(names)))
        jobs = export.plan(args.model_dir, infos, args.format, args.dtype, args.layer)
    except KeyboardInterrupt:
        raise Interrupted("before any file was written") from None
    summary = export.export(args.model_dir, out_dir, args.format, args.dtype, jobs, force=args.force)  # Interrupted
    if quantized:
        q = quant_export.export_quantized(args.model_dir, out_dir, quantized, args.quant, args.quant_head, args.force)
        print(f"{args.quant.name}: {q.tensors} quantized weights as .q.csv + .scale.csv ({q.bytes / 1e6:.1f} MB "
              f"in {q.seconds:.2f} s)")
        summary.skipped += q.skipped
    try:
        if summary.skipped:
            print(f"kept {len(summary.skipped)} file(s) that still match their source (--force rewrites them)")
        if len(jobs) == 1 and summary.files:
            print(f"wrote {out_dir / summary.files[0]}")
        print(f"manifest: {out_dir / layout.MANIFEST}")
        print(summary.line())
    except KeyboardInterrupt:
        raise Interrupted(f"after every file was written to {out_dir} and listed in its manifest") from None
    return 0


if __name__ == "__main__":
    run(main)
