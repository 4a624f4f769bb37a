"""Convert a PyTorch checkpoint (.pt/.pth/.bin/.ckpt) into a Hugging Face safetensors model folder.

    python convert_to_safetensors.py out-shakespeare/ckpt.pt --out-dir model_paths/nanogpt-shakespeare
    python convert_to_safetensors.py CHECKPOINT --out-dir DIR --dtype float32 --max-shard-size 2GB

- A nanoGPT checkpoint (a dict with "model" and "model_args", as nanoGPT's train.py saves it;
  "_orig_mod." prefixes from torch.compile and attn.bias mask buffers are handled) becomes a
  GPT2LMHeadModel folder: config.json, model.safetensors, tokenizer_config.json, README.md.
- A plain state dict ({name: tensor}, or {"state_dict": {...}} as Lightning saves) becomes
  model.safetensors, or shards model-0000K-of-0000N.safetensors + model.safetensors.index.json
  above MAX_SHARD_SIZE; config.json and tokenizer files beside the checkpoint are copied.

The file is read with torch.load(weights_only=True): a checkpoint that needs arbitrary code to
unpickle is refused (exit 2), never executed. Memory: the checkpoint once (memory-mapped for
zip-format files) plus one converted tensor. The folder is built under a temporary name beside
OUTPUT_DIR and renamed when complete; an OUTPUT_DIR that already holds files is left alone
unless --force, which replaces it.
"""
import functools
import shlex
import sys
import time
from pathlib import Path

from tqdm import tqdm

from common import cli, paths
from common.cli import InputError, path_arg, print_settings, run
from common.model.checkpoint import load_checkpoint
from common.model.convert import (DTYPES, build_folder, check_output_dir, copy_side_files, gpt2_config,
                            gpt2_tokenizer_config, model_card, parse_size, plan_nanogpt, plan_state_dict,
                            target_dtype, write_weights)
from common.files.atomic import write_json, write_text

CHECKPOINT = None         # the .pt/.pth/.bin/.ckpt file to convert
OUTPUT_DIR = None         # None: model_paths/<checkpoint's folder>_<checkpoint's stem>
DTYPE = "bfloat16"        # float32 | float16 | bfloat16 | keep (floating tensors only; integers keep theirs)
VOCAB_SIZE = None         # nanoGPT only: crop the vocabulary, e.g. 50257 for nanoGPT's padded 50304
MAX_SHARD_SIZE = "5GB"    # one file up to this size, shards above it: bytes, or 500MB, 2GB, 1GiB
FORCE = False             # replace an OUTPUT_DIR that already holds files


def default_output_dir(checkpoint: Path) -> Path:
    return paths.MODEL_PATHS / f"{checkpoint.resolve().parent.name}_{checkpoint.stem}"


def parse_args(argv: list[str]):
    p = cli.Parser(globals())
    p.flag("checkpoint", nargs="?", type=path_arg)
    p.flag("--out-dir", constant="OUTPUT_DIR")  # --output-dir, the old spelling, is kept (cli.SHARED)
    p.flag("--dtype", choices=list(DTYPES))
    p.flag("--vocab-size", type=int)
    p.flag("--max-shard-size")
    p.flag("--force", action="store_true")
    return p.parse_args(argv)


def fill(folder: Path, plan: list, max_shard: int, facts: dict | None, checkpoint: Path, card: str,
         written: list[Path]) -> None:
    """Write the model folder's files into `folder` (build_folder's fresh folder): weights, config, card."""
    total = sum(t.nbytes for t in plan)
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=None) as bar:
        written.extend(write_weights(folder, plan, max_shard, on_tensor=bar.update))
    if facts is not None:
        write_json(folder / "config.json", gpt2_config(facts))
        write_json(folder / "tokenizer_config.json", gpt2_tokenizer_config(facts))
    else:
        copied = copy_side_files(checkpoint, folder)
        if copied:
            print(f"copied from {checkpoint.parent}: {', '.join(copied)}")
    write_text(folder / "README.md", card)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(map(str, argv))
    args = parse_args(argv)

    if args.checkpoint is None:
        raise InputError("no checkpoint given: python convert_to_safetensors.py CHECKPOINT --out-dir DIR")
    checkpoint: Path = args.checkpoint
    output_dir: Path = args.out_dir or default_output_dir(checkpoint)
    dtype = target_dtype(args.dtype)
    max_shard = parse_size(args.max_shard_size)
    check_output_dir(output_dir, checkpoint, args.force)

    t0 = time.perf_counter()
    ckpt = load_checkpoint(checkpoint)
    if args.vocab_size is not None and ckpt.kind != "nanogpt":
        raise InputError(f"--vocab-size applies to nanoGPT checkpoints only; {checkpoint} is a plain state dict")
    settings = {"checkpoint": checkpoint, "kind": ckpt.kind,
                "loaded": "memory-mapped (zip format)" if ckpt.mmapped else "into memory (legacy format)",
                "output dir": output_dir, "dtype": args.dtype, "max shard size": f"{max_shard:,} bytes"}
    if ckpt.kind == "nanogpt":
        settings["vocab size"] = args.vocab_size if args.vocab_size is not None else "from model_args"
    print_settings(settings)

    facts = None
    if ckpt.kind == "nanogpt":
        plan, facts = plan_nanogpt(ckpt, dtype, args.vocab_size)
        print(f"nanoGPT GPT: n_layer={facts['n_layer']} n_head={facts['n_head']} n_embd={facts['n_embd']} "
              f"vocab={facts['vocab_size']} block_size={facts['block_size']} bias={facts['bias']} tied={facts['tied']}; "
              f"{facts['transposed']} Conv1D weights transposed, {facts['zero_biases']} zero biases added, "
              f"{len(facts['dropped'])} mask buffers dropped")
    else:
        plan = plan_state_dict(ckpt.state_dict, dtype)
        print(f"state dict: {len(plan)} tensors")
    total = sum(t.nbytes for t in plan)
    command = "python convert_to_safetensors.py " + " ".join(shlex.quote(a) for a in argv)
    written: list[Path] = []
    card = model_card(checkpoint, output_dir, ckpt.kind, command, settings, facts, ckpt.extras)
    build_folder(output_dir, functools.partial(fill, plan=plan, max_shard=max_shard, facts=facts,
                                               checkpoint=checkpoint, card=card, written=written), args.force)
    dt = time.perf_counter() - t0
    for f in written:
        print(f"wrote {output_dir / f.name} ({(output_dir / f.name).stat().st_size / 1e6:,.1f} MB)")
    print(f"{len(plan)} tensors, {total / 1e6:,.1f} MB in {dt:.1f} s -> {output_dir}")
    return 0


if __name__ == "__main__":
    run(main)
