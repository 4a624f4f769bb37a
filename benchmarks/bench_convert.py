"""Benchmark: convert_to_safetensors.py vs a naive conversion, peak memory and time, on nanoGPT GPT-2 124M.

    flock /tmp/llama-xray-bench.lock python benchmarks/bench_convert.py

Builds (once, ~20 s, ~2 GB RAM while building) a random nanoGPT checkpoint of GPT-2 124M's shape
as train.py saves it (fp32 model with torch.compile's _orig_mod. prefixes, AdamW moments, 1.5 GB)
in outputs/bench_models/, then converts it to bf16 both ways, each in its own process:
- convert: convert_to_safetensors.py (mmap'd weights_only load, one tensor at a time, streamed writes);
- naive: torch.load into memory, a converted copy of every tensor, safetensors.torch.save_file.
A sampler reads each child's /proc status every 5 ms: RssAnon (memory the process allocated) and
VmRSS (plus file pages it has mapped, which the kernel can drop at will). Goal (issue 7): the
converter's peak anonymous memory above an idle `import torch` stays under one tensor's bf16 size
x 1.5 (the "one tensor" bound) and far below the naive path's, which holds two copies.
"""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import paths  # noqa: E402

CKPT = paths.OUTPUTS / "bench_models" / "nanogpt-gpt2-124m" / "ckpt.pt"
OUT = paths.OUTPUTS / "bench_models" / "convert-out"
ARGS = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, bias=True, vocab_size=50304, dropout=0.0)
ONE_TENSOR_GOAL = 1.5  # converter's extra anonymous memory / largest output tensor must be below this

NAIVE = """
import sys, torch
from safetensors.torch import save_file
ckpt = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
out = {}
for k, v in ckpt["model"].items():
    k = k.removeprefix("_orig_mod.")
    if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
        v = v.t()
    out[k] = v.to(torch.bfloat16).contiguous().clone()
save_file(out, sys.argv[2] + "/model.safetensors", metadata={"format": "pt"})
"""


def build_checkpoint(path: Path) -> None:
    import torch

    if path.is_file():
        return
    print(f"building a random nanoGPT GPT-2 124M checkpoint in {path} ...", flush=True)
    d, V, P = ARGS["n_embd"], ARGS["vocab_size"], ARGS["block_size"]
    shapes = {"transformer.wte.weight": (V, d), "transformer.wpe.weight": (P, d)}
    for i in range(ARGS["n_layer"]):
        h = f"transformer.h.{i}."
        shapes |= {h + "ln_1.weight": (d,), h + "ln_1.bias": (d,), h + "attn.c_attn.weight": (3 * d, d),
                   h + "attn.c_attn.bias": (3 * d,), h + "attn.c_proj.weight": (d, d), h + "attn.c_proj.bias": (d,),
                   h + "ln_2.weight": (d,), h + "ln_2.bias": (d,), h + "mlp.c_fc.weight": (4 * d, d),
                   h + "mlp.c_fc.bias": (4 * d,), h + "mlp.c_proj.weight": (d, 4 * d), h + "mlp.c_proj.bias": (d,)}
    shapes |= {"transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)}
    torch.manual_seed(0)
    model = {k: 0.02 * torch.randn(s) for k, s in shapes.items()}
    model["lm_head.weight"] = model["transformer.wte.weight"]  # tied, as nanoGPT
    params = [v for k, v in model.items() if k != "lm_head.weight"]
    opt = {"state": {i: {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
                     for i, p in enumerate(params)},
           "param_groups": [{"lr": 6e-4, "betas": (0.9, 0.95), "params": list(range(len(params)))}]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": {"_orig_mod." + k: v for k, v in model.items()}, "optimizer": opt, "model_args": ARGS,
                "iter_num": 1, "best_val_loss": torch.tensor(3.0), "config": {"compile": True}}, tmp)
    tmp.rename(path)


def measure(cmd: list[str]) -> dict:
    """Run cmd; its wall time and peak RssAnon / VmRSS in MB, sampled from /proc every 5 ms."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, cwd=ROOT)
    peak = {"RssAnon": 0, "VmRSS": 0}
    while p.poll() is None:
        try:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                key = line.split(":")[0]
                if key in peak:
                    peak[key] = max(peak[key], int(line.split()[1]) // 1024)
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.005)
    if p.wait() != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {p.returncode}")
    return {"s": time.perf_counter() - t0, "anon_mb": peak["RssAnon"], "rss_mb": peak["VmRSS"]}


def main() -> int:
    build_checkpoint(CKPT)
    py = sys.executable
    base = measure([py, "-c", "import torch, time; time.sleep(0.5)"])
    results = {}
    for name, cmd in {"convert": [py, "convert_to_safetensors.py", str(CKPT), "--output-dir", str(OUT), "--force"],
                      "naive": [py, "-c", NAIVE, str(CKPT), str(OUT)]}.items():
        shutil.rmtree(OUT, ignore_errors=True)
        OUT.mkdir(parents=True)
        results[name] = measure(cmd)
    shutil.rmtree(OUT, ignore_errors=True)
    largest_mb = ARGS["vocab_size"] * ARGS["n_embd"] * 2 / 2**20  # wte in bf16
    extra = {k: r["anon_mb"] - base["anon_mb"] for k, r in results.items()}
    print(f"checkpoint {CKPT.stat().st_size / 2**20:,.0f} MB (model + AdamW), largest bf16 tensor {largest_mb:.0f} MB, "
          f"idle import torch {base['anon_mb']} MB anon")
    for k, r in results.items():
        print(f"  {k:8s} {r['s']:5.1f} s   peak anon {r['anon_mb']:6,} MB (+{extra[k]:,} MB)   peak rss {r['rss_mb']:6,} MB")
    ratio = extra["convert"] / largest_mb
    print(f"converter extra anon / largest tensor = {ratio:.2f} (goal < {ONE_TENSOR_GOAL}); "
          f"anon convert/naive = {results['convert']['anon_mb'] / results['naive']['anon_mb']:.2f}; "
          f"time convert/naive = {results['convert']['s'] / results['naive']['s']:.2f}")
    print(json.dumps({"results": results, "idle": base, "largest_tensor_mb": largest_mb}))
    return 0 if ratio < ONE_TENSOR_GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
