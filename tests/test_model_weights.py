"""Step 1 (1_model_weights.py): every format holds exactly the tensors safetensors itself loads;
selection, --layer, --dtype, sanitised names, reruns, bad input and a kill mid-export."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import model_factory
from common import cli
from common.files.atomic import TEMP_SUFFIX
from common.files.csv_io import read_csv
from common.files.export import safe_file_name
from common.files.layout import ATTENTION_FILTER
from common.files.safetensors_io import INDEX_NAME
from conftest import ROOT, load_script, run_script



@dataclass
class Result:
    code: int
    out: str
    err: str


def step1(*args, name_filter=None) -> Result:
    """Run 1_model_weights.py in this process (as `run` would: exit code, stdout, stderr)."""
    mod = load_script("1_model_weights.py")
    if name_filter is not None:
        mod.NAME_FILTER = name_filter
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.run(lambda: mod.main(list(map(str, args))))
    except SystemExit as e:
        code = e.code
    return Result(code, out.getvalue(), err.getvalue())


def source_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """What safetensors itself loads from every shard: the reference."""
    state = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def f32_bits(t) -> np.ndarray:
    a = t.float().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float32)
    return a.view(np.uint32)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_back(path: Path, fmt: str, shape) -> dict[str, torch.Tensor] | np.ndarray:
    if fmt == "csv":
        return read_csv(path, shape)
    if fmt == "txt":
        return np.loadtxt(path, dtype=np.float32, ndmin=2).reshape(shape)
    if fmt == "npy":
        return np.load(path)
    if fmt == "safetensors":
        return load_file(path)
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory) -> Path:
    """13 layers, so model.layers.1 and model.layers.1x both exist."""
    cfg = {**model_factory.TINY, "num_hidden_layers": 13, "hidden_size": 32, "intermediate_size": 48,
           "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 64}
    return model_factory.build_model(tmp_path_factory.mktemp("deep") / "m", config=cfg, with_tokenizer=False,
                                     max_shard_size="40KB")


@pytest.mark.parametrize("variant", ["llama32", "fp16_single", "untied", "bias"])
@pytest.mark.parametrize("fmt", ["csv", "txt", "npy", "safetensors", "ckpt"])
def test_every_format_is_exact(tiny_models, tmp_path, variant, fmt):
    model = tiny_models[variant]
    ref = source_tensors(model)
    r = step1("--model-dir", model, "--out-dir", tmp_path, "--format", fmt)
    assert r.code == 0, r.err
    assert r.out.splitlines()[-1].startswith(f"exported {len(ref)} tensors, {sum(t.numel() for t in ref.values()):,} values")
    files = json.loads((tmp_path / "manifest.json").read_text())["files"]
    assert len(files) == len(ref) and sorted(p.name for p in tmp_path.iterdir()) == sorted([*files, "manifest.json",
                                                                                            ".manifest.json.lock"])
    for name, t in ref.items():
        file_name = f"{name}.{fmt}"
        entry = files[file_name]
        assert entry["tensors"][0]["name"] == name and entry["tensors"][0]["shape"] == list(t.shape)
        assert entry["tensors"][0]["source_dtype"] == {torch.bfloat16: "BF16", torch.float16: "F16"}[t.dtype]
        assert entry["dtype"] == "float32" and entry["sha256"] == sha256(tmp_path / file_name)
        back = load_back(tmp_path / file_name, fmt, tuple(t.shape))
        if isinstance(back, dict):
            assert list(back) == [name] and back[name].dtype == torch.float32
            back = back[name]
        np.testing.assert_array_equal(f32_bits(back), f32_bits(t))  # widened exactly, bit for bit
    if fmt == "csv":
        text = (tmp_path / "model.norm.weight.csv").read_text()
        assert text.count("\n") == 1 and "e" not in text  # a 1-D tensor is one line of plain numbers


def test_list_says_shapes_dtypes_shards_and_whether_the_head_is_tied(tiny_models):
    r = step1("--model-dir", tiny_models["llama32"], "--list")
    assert r.code == 0, r.err
    line = next(s for s in r.out.splitlines() if s.startswith("model.embed_tokens.weight"))
    assert "[320, 64]" in line and "BF16" in line and "model-00001-of-" in line
    assert "head: tied to model.embed_tokens.weight (no lm_head.weight in the files)" in r.out
    r = step1("--model-dir", tiny_models["untied"], "--list", "--filter", "lm_head")
    assert r.code == 0 and r.out.splitlines()[0].startswith("lm_head.weight") and "head: lm_head.weight is stored" in r.out
    assert len(r.out.splitlines()) == 3  # the one tensor, the totals, the head


def test_name_filter_callable_and_regex_select_the_attention_projections(tiny_models, tmp_path):
    model = tiny_models["bias"]
    readme_filter = lambda n: ".self_attn." in n and any(x in n for x in [".q_proj.", ".k_proj.", ".v_proj.", ".o_proj."])  # noqa: E731
    want = {n for n in source_tensors(model) if readme_filter(n)}
    assert len(want) == 3 * 8  # q/k/v/o weights and biases (attention_bias gives o_proj one too)
    r = step1("--model-dir", model, "--out-dir", tmp_path / "callable", name_filter=readme_filter)
    assert r.code == 0, r.err
    assert {p.stem for p in (tmp_path / "callable").glob("*.csv")} == want
    r = step1("--model-dir", model, "--out-dir", tmp_path / "regex", "--filter", ATTENTION_FILTER)
    step3_needs = want | {n for n in source_tensors(model) if n.endswith(".input_layernorm.weight")}
    assert {p.stem for p in (tmp_path / "regex").glob("*.csv")} == step3_needs  # step 3 starts at the input norm


def test_layer_prefix_matches_at_a_dot_boundary_and_is_stripped(deep_model, tmp_path):
    ref = source_tensors(deep_model)
    layer1 = {n: t for n, t in ref.items() if n.startswith("model.layers.1.")}
    assert layer1 and any(n.startswith("model.layers.12.") for n in ref)
    for fmt in ("ckpt", "safetensors"):
        r = step1("--model-dir", deep_model, "--out-dir", tmp_path, "--layer", "model.layers.1", "--format", fmt,
                  "--dtype", "source")
        assert r.code == 0, r.err
        state = load_back(tmp_path / f"model.layers.1.{fmt}", fmt, None)  # ckpt: torch.load(weights_only=True)
        assert set(state) == {n.removeprefix("model.layers.1.") for n in layer1}
        assert "self_attn.q_proj.weight" in state
        for n, t in layer1.items():  # --dtype source: the stored bf16 bits, untouched
            assert state[n.removeprefix("model.layers.1.")].dtype == torch.bfloat16
            assert torch.equal(state[n.removeprefix("model.layers.1.")].view(torch.int16), t.view(torch.int16))
    entry = json.loads((tmp_path / "manifest.json").read_text())["files"]["model.layers.1.ckpt"]
    assert sorted(m["key"] for m in entry["tensors"]) == sorted(state) and entry["dtype"] == "bfloat16"
    r = step1("--model-dir", deep_model, "--out-dir", tmp_path / "csv", "--layer", "model.layers.1")
    assert {p.stem for p in (tmp_path / "csv").glob("*.csv")} == set(layer1)
    r = step1("--model-dir", deep_model, "--out-dir", tmp_path / "none", "--layer", "model.layers.13", "--format", "ckpt")
    assert r.code == 2 and r.err.count("\n") == 1 and "--layer model.layers.13" in r.err
    assert not (tmp_path / "none").exists()


def test_dtype_float16_extracts_the_embedding_table(llama32, tmp_path):
    emb = source_tensors(llama32)["model.embed_tokens.weight"]
    r = step1("--model-dir", llama32, "--out-dir", tmp_path, "--filter", r"^model\.embed_tokens\.weight$",
              "--format", "npy", "--dtype", "float16")
    assert r.code == 0, r.err
    a = np.load(tmp_path / "model.embed_tokens.weight.npy")
    assert a.dtype == np.float16 and a.shape == tuple(emb.shape)
    np.testing.assert_array_equal(a.view(np.uint16), emb.to(torch.float16).numpy().view(np.uint16))
    r = step1("--model-dir", llama32, "--out-dir", tmp_path, "--filter", "embed_tokens", "--format", "safetensors",
              "--dtype", "float16")
    t = load_file(tmp_path / "model.embed_tokens.weight.safetensors")["model.embed_tokens.weight"]
    assert t.dtype == torch.float16 and torch.equal(t, emb.to(torch.float16))
    manifest = json.loads((tmp_path / "manifest.json").read_text())["files"]
    assert manifest["model.embed_tokens.weight.npy"]["dtype"] == "float16"


def test_only_the_shards_holding_the_selection_are_opened(llama32, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(llama32, model)
    weight_map = json.loads((model / INDEX_NAME).read_text())["weight_map"]
    keep = weight_map["model.embed_tokens.weight"]
    for shard in set(weight_map.values()) - {keep}:
        (model / shard).write_bytes(b"\x01garbage")  # unreadable: any attempt to open it fails
    r = step1("--model-dir", model, "--out-dir", tmp_path / "out", "--filter", "embed_tokens")
    assert r.code == 0, r.err
    np.testing.assert_array_equal(read_csv(tmp_path / "out" / "model.embed_tokens.weight.csv", (320, 64)),
                                  source_tensors(llama32)["model.embed_tokens.weight"].float().numpy())
    other, other_shard = next((n, s) for n, s in weight_map.items() if s != keep)
    r = step1("--model-dir", model, "--out-dir", tmp_path / "bad", "--filter", f"^{other}$")
    assert r.code == 2 and r.err.count("\n") == 1 and "truncated" in r.err and other_shard in r.err
    assert not (tmp_path / "bad").exists()


def test_hostile_tensor_names_stay_inside_out_dir(tmp_path):
    names = ["../evil", "a/b", "x\x00y", "tab\tname", "..", ".hidden", "/abs", "a%2Fb", "", "ok.name", "é\u202e"]
    tensors = {n: torch.full((2, 3), float(i)) + torch.arange(6.0).reshape(2, 3) / 8 for i, n in enumerate(names)}
    model = tmp_path / "weird"
    model.mkdir()
    save_file(tensors, model / "model.safetensors")
    work = tmp_path / "work"
    out = work / "out"
    for fmt in ("csv", "npy", "ckpt"):
        r = step1("--model-dir", model, "--out-dir", out, "--format", fmt)
        assert r.code == 0, r.err
    assert sorted(p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*") if p.is_file()) == \
        ["weird"] + ["work"] * (3 * len(names) + 2)  # nothing outside out_dir
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert len({safe_file_name(n) for n in names}) == len(names)  # distinct names stay distinct
    for n, t in tensors.items():
        entry = files[safe_file_name(n) + ".csv"]
        assert entry["tensors"][0]["name"] == n
        np.testing.assert_array_equal(read_csv(out / (safe_file_name(n) + ".csv"), (2, 3)), t.numpy())
        assert torch.equal(torch.load(out / (safe_file_name(n) + ".ckpt"), weights_only=True)[n], t)
    assert all(not p.name.startswith(".") or p.name == ".manifest.json.lock" for p in out.iterdir())


def test_rerun_skips_matching_files_and_force_rewrites(llama32, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(llama32, model)
    out = tmp_path / "out"
    assert step1("--model-dir", model, "--out-dir", out, "--filter", ATTENTION_FILTER).code == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.csv")}
    assert len(stamps) == 15  # 3 layers x (q/k/v/o_proj + input_layernorm): what step 3 reads
    r = step1("--model-dir", model, "--out-dir", out, "--filter", ATTENTION_FILTER)
    assert "kept 15 file(s)" in r.out and r.out.splitlines()[-1].startswith("exported 0 tensors")
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.csv")} == stamps
    r = step1("--model-dir", model, "--out-dir", out, "--filter", ATTENTION_FILTER, "--force")
    assert r.out.splitlines()[-1].startswith("exported 15 tensors")
    assert all(p.stat().st_mtime_ns != stamps[p.name] for p in out.glob("*.csv"))
    # Another selection adds to the manifest; a changed shard is exported again; a damaged file too.
    assert step1("--model-dir", model, "--out-dir", out, "--filter", "norm").code == 0
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert len(files) == 12 + 7  # the input norms were there already
    shard = model / files["model.layers.0.self_attn.q_proj.weight.csv"]["tensors"][0]["shard"]
    os.utime(shard, ns=(time.time_ns(), time.time_ns()))
    (out / "model.norm.weight.csv").write_text("1.0\n")
    r = step1("--model-dir", model, "--out-dir", out)
    held = sum(1 for e in files.values() if e["tensors"][0]["shard"] == shard.name)
    assert r.out.splitlines()[-1].startswith(f"exported {29 - (12 + 7) + held + 1} tensors")


@pytest.mark.parametrize("case", ["missing folder", "no safetensors", "index names a missing shard",
                                  "truncated", "malformed header", "unknown format", "unknown dtype",
                                  "dtype for csv", "matches nothing", "bad regex"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(llama32, tiny_models, tmp_path, case):
    model = tmp_path / "model"
    args = []
    if case == "missing folder":
        pass
    elif case == "no safetensors":
        model.mkdir()
        (model / "config.json").write_text("{}")
    elif case == "index names a missing shard":
        shutil.copytree(llama32, model)
        next(model.glob("model-00002-*.safetensors")).unlink()
    elif case in ("truncated", "malformed header"):
        shutil.copytree(tiny_models["fp16_single"], model)
        f = model / "model.safetensors"
        data = f.read_bytes()
        f.write_bytes(data[: len(data) - 100] if case == "truncated" else data[:8] + b"{not json" + data[17:])
    else:
        shutil.copytree(llama32, model)
        args = {"unknown format": ["--format", "parquet"], "unknown dtype": ["--format", "npy", "--dtype", "int4"],
                "dtype for csv": ["--dtype", "float16"], "matches nothing": ["--filter", "^lm_head"],
                "bad regex": ["--filter", "(["]}[case]
    r = step1("--model-dir", model, "--out-dir", tmp_path / "out", *args)
    assert r.code == 2 and r.err.count("\n") == 1 and r.err.startswith("error: "), r
    assert "Traceback" not in r.err and not (tmp_path / "out").exists()
    if case == "matches nothing":
        assert "the head is tied" in r.err


def test_cli_errors_and_exports_as_a_user_runs_it(llama32, tmp_path):
    r = run_script("1_model_weights.py", "--model-dir", tmp_path / "nope", "--out-dir", tmp_path / "out")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
    r = run_script("1_model_weights.py", "--model-dir", llama32, "--out-dir", tmp_path / "out", "--filter", ATTENTION_FILTER)
    assert r.returncode == 0, r.stderr
    assert "NAME_FILTER = regex" in r.stdout
    assert r.stdout.splitlines()[-1].startswith("exported 15 tensors")


def is_temp(name: str, final: str) -> bool:
    """A temporary file of common/files/atomic.py for the file `final`: .<final>.<random>.tmp"""
    return name.startswith(f".{final}.") and name.endswith(TEMP_SUFFIX)


def test_a_kill_mid_export_leaves_only_complete_files(tmp_path):
    """SIGKILL during a large tensor: every file under a final name is complete, and a rerun finishes."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"w{i}": torch.randn(2048, 2048, generator=g) for i in range(3)}  # 4 M values: ~55 MB of CSV each
    model = tmp_path / "model"
    model.mkdir()
    save_file(tensors, model / "model.safetensors")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "1_model_weights.py"), "--model-dir", str(model),
                             "--out-dir", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not any(is_temp(p.name, "w1.csv") and p.stat().st_size > 4e6
                                             for p in (out.iterdir() if out.exists() else [])):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.3)  # the forked CSV workers die with their parent (PR_SET_PDEATHSIG)
    sizes = {p.name: p.stat().st_size for p in out.iterdir()}
    time.sleep(0.3)
    assert {p.name: p.stat().st_size for p in out.iterdir()} == sizes  # nothing is still writing
    final = sorted(n for n in sizes if not n.startswith("."))
    assert any(is_temp(n, "w1.csv") for n in sizes) and "w1.csv" not in final
    for n in final:
        if n.endswith(".csv"):
            np.testing.assert_array_equal(read_csv(out / n, (2048, 2048)), tensors[n[:-4]].numpy())
        else:
            json.loads((out / n).read_text())
    r = step1("--model-dir", model, "--out-dir", out)
    assert r.code == 0 and not [p for p in out.iterdir() if p.name.endswith(TEMP_SUFFIX)]
    for n, t in tensors.items():
        np.testing.assert_array_equal(read_csv(out / f"{n}.csv", (2048, 2048)), t.numpy())


def test_large_tensors_go_through_the_parallel_writer_exactly(tmp_path):
    """Above PARALLEL_MIN_VALUES the forked workers read the values straight from the shard."""
    from common.files import csv_io, csv_pool
    if csv_io.cpu_workers() < 2:
        pytest.skip("one core: the writer runs in-process")
    g = torch.Generator().manual_seed(5)
    tensors = {f"t_{dt}".replace("torch.", ""): torch.randn(701, 512, generator=g).to(dt)
               for dt in (torch.bfloat16, torch.float16, torch.float32)}
    assert all(t.numel() >= csv_io.PARALLEL_MIN_VALUES for t in tensors.values())
    tensors["odd_1d"] = torch.randn(300_001, generator=g).to(torch.bfloat16)  # one line, unaligned offset
    model = tmp_path / "model"
    model.mkdir()
    save_file(tensors, model / "model.safetensors")
    csv_pool.close_pool()
    r = step1("--model-dir", model, "--out-dir", tmp_path / "out")
    assert r.code == 0, r.err
    assert csv_pool._pool is not None and len(csv_pool._pool.pids) > 1  # the parallel path ran
    for name, t in tensors.items():
        np.testing.assert_array_equal(f32_bits(read_csv(tmp_path / "out" / f"{name}.csv", tuple(t.shape))), f32_bits(t))
