"""5_golden.py and 6_grade.py: golden vectors out, anyone's outputs in.

Round trips: every format x every encoding reads back (through golden_manifest.json, as 6_grade.py
reads it) to exactly the source (float32), to torch's own rounding (bfloat16/float16: an independent
reference), or within half a step (fixed point, unsaturated); saturation is counted, never silent.
Grading: step 3's outputs PASS; a planted error FAILs and is named as the first failing node in forward
order; a Q16.16 candidate rounded from the right values PASSes, one word off by 1000 steps FAILs;
bad names, shapes and manifests are exit 2 with nothing written.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script, run_script
from test_offline_qkv import capture, export_weights

from common.check import golden, grade
from common.cli import InputError
from common.files import nodes
from common.files.atomic import sha256_file
from common.files.csv_io import read_csv, write_csv

golden_script = load_script("5_golden.py")
grade_script = load_script("6_grade.py")
offline = load_script("3_offline_qkv.py")

ENCODINGS = [("float32", None, None), ("bfloat16", None, None), ("float16", None, None),
             ("fixed", 8, 4), ("fixed", 16, 8), ("fixed", 32, 16)]


def tricky_values() -> np.ndarray:
    """(6, 40) float32: ties for every encoding, subnormals, signed zeros, large values that saturate."""
    rng = np.random.default_rng(0)
    specials = np.array([0.0, -0.0, 1.0, -1.0, 0.5, -1.5, 2.0 ** -17, -(2.0 ** -17), 3 * 2.0 ** -17,  # Q16.16 ties
                         1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11,  # bf16/fp16 ties
                         1e-40, -1e-42, 6e-8, 70000.0, -70000.0, 40000.5, 3.3e38, -3.4e38, 1e5, 7.96875, -8.0],
                        np.float32)
    body = rng.standard_normal(240 - specials.size).astype(np.float32) * np.float32(4)
    return np.concatenate([specials, body]).reshape(6, 40)


def encoding(name, bits, frac) -> golden.Encoding:
    return golden.make_encoding(name, bits, frac)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("golden_src")
    write_csv(d / "q_layer2.csv", tricky_values())
    return d


@pytest.mark.parametrize("fmt", golden.FORMATS)
@pytest.mark.parametrize("name,bits,frac", ENCODINGS)
def test_round_trip_through_the_manifest(source, tmp_path, fmt, name, bits, frac):
    enc = encoding(name, bits, frac)
    x = read_csv(source / "q_layer2.csv")
    out = tmp_path / "g"
    manifest, stats = golden.write_golden([source / "q_layer2.csv"], out, fmt, enc, "saturate", {}, {})
    entry = manifest["files"][0]
    assert entry["sha256"] == sha256_file(out / entry["file"])
    assert entry["source_sha256"] == sha256_file(source / "q_layer2.csv") and entry["shape"] == [6, 40]

    [c], skipped = grade.find_candidates(out)  # read back as 6_grade.py does: manifest, sha256, decode
    assert (c.layer, c.node, skipped) == (2, "q", [])
    back = grade.load(c)
    assert back.shape == x.shape
    if name == "float32":
        assert np.array_equal(back.view(np.uint32), x.view(np.uint32))  # bit-exact, -0.0 included
        assert stats.rounded == stats.saturated == 0
    elif name in ("bfloat16", "float16"):
        want = torch.from_numpy(x).to(getattr(torch, name)).float().numpy()  # torch rounds to nearest even
        assert np.array_equal(back.view(np.uint32), want.view(np.uint32))
        assert stats.rounded == int(np.count_nonzero(want != x))
        assert stats.saturated == int(np.count_nonzero(np.isinf(want)))  # 3.3e38 etc. overflow float16
        assert entry["saturated"] == stats.saturated
    else:
        lo, hi = -(2.0 ** (bits - 1 - frac)), 2.0 ** (bits - 1 - frac) - 2.0 ** -frac
        fits = (x >= lo - 2.0 ** -(frac + 1)) & (x <= hi + 2.0 ** -(frac + 1))
        err = np.abs(back - x.astype(np.float64))
        assert err[fits].max() <= 2.0 ** -(frac + 1)  # within half a step
        assert np.array_equal(back[~fits], np.where(x[~fits] > 0, hi, lo))  # clipped to the ends
        assert stats.saturated == entry["saturated"] == int(np.count_nonzero(~fits)) > 0
        assert abs(entry["worst_saturated"]) == np.abs(x[~fits]).max()


def test_fixed_point_rounds_half_to_even_and_words_are_twos_complement(tmp_path):
    write_csv(tmp_path / "src" / "v_layer0.csv", np.array([[-1.5, 2.0 ** -17, 3 * 2.0 ** -17, -1.0, 0.25]], np.float32))
    out = tmp_path / "g"
    assert golden_script.main(["--in-dir", str(tmp_path / "src"), "--out-dir", str(out), "--format", "hex",
                               "--encoding", "fixed", "--bits", "32", "--frac-bits", "16"]) == 0
    # -1.5 -> -98304; 0.5 step -> 0 (even); 1.5 steps -> 2; -1 -> -65536; 0.25 -> 16384
    assert (out / "v_layer0.hex").read_text() == "fffe8000\n00000000\n00000002\nffff0000\n00004000\n"
    assert golden_script.main(["--in-dir", str(tmp_path / "src"), "--out-dir", str(out), "--format", "mem",
                               "--encoding", "fixed", "--bits", "8", "--frac-bits", "4"]) == 0
    lines = (out / "v_layer0.mem").read_text().splitlines()
    assert lines[0].startswith("// v_layer0: shape [1, 5]") and "Q4.4" in lines[0]
    assert lines[1:] == ["e8", "00", "00", "f0", "04"]
    assert not (out / "v_layer0.hex").exists()  # the earlier run's file, listed in its manifest, is gone


def test_bfloat16_words_and_npz_archives_per_layer(tmp_path):
    src = tmp_path / "src"
    for n in (0, 1):
        write_csv(src / (nodes.stem("q", n, ref=True) + ".csv"), np.full((2, 3), 1 + n, np.float32))
    write_csv(src / "attention_mask.csv", np.ones((1, 2), np.float32))
    out = tmp_path / "g"
    manifest, _ = golden.write_golden(sorted(src.glob("*.csv")), out, "npz", encoding("bfloat16", None, None), "saturate",
                                      {}, {})
    assert sorted(p.name for p in out.iterdir()) == ["golden_manifest.json", "layer0.npz", "layer1.npz", "model.npz"]
    with np.load(out / "layer1.npz") as z:
        assert z.files == ["ref_q"] and z["ref_q"].dtype == np.uint16 and (z["ref_q"] == 0x4000).all()  # 2.0
    assert {e["file"]: e["key"] for e in manifest["files"]}["model.npz"] == "attention_mask"


def test_step1_weights_go_into_one_archive_per_layer(tmp_path):
    src = tmp_path / "weights"
    write_csv(src / "model.layers.3.mlp.up_proj.weight.csv", np.ones((4, 2), np.float32))
    write_csv(src / "model.norm.weight.csv", np.ones(2, np.float32))
    golden_script.main(["--in-dir", str(src), "--out-dir", str(tmp_path / "g"), "--format", "npz"])
    with np.load(tmp_path / "g" / "layer3.npz") as z, np.load(tmp_path / "g" / "model.npz") as m:
        assert (z.files, m.files) == (["mlp.up_proj.weight"], ["model.norm.weight"])


def test_layout_names_the_head_major_columns(tmp_path, pipeline):
    _, _, acts, _ = pipeline
    out = tmp_path / "g"
    r = run_script("5_golden.py", "--in-dir", acts, "--out-dir", out, "--select", r"^ref_q_layer1\.csv$",
                   "--format", "hex", "--encoding", "fixed", "--bits", "32", "--frac-bits", "16")
    assert r.returncode == 0, r.stderr
    assert "saturation: none" in r.stdout and re.search(r"rounding .* changed [\d,]+ of [\d,]+ values", r.stdout)
    [entry] = json.loads((out / "golden_manifest.json").read_text())["files"]
    meta = json.loads((acts / "meta_layer1.json").read_text())
    lay = entry["layout"]
    assert lay["columns"].startswith("h*Dh + d") and lay["rows"].startswith("b*T + t")
    assert (lay["H"], lay["Dh"], lay["B"], lay["T"]) == (meta["num_heads"], meta["head_dim"], meta["batch_size"],
                                                        meta["seq_len"])
    # The README's testbench read: head h of token t of prompt b is Dh consecutive words.
    words = (out / "ref_q_layer1.hex").read_text().split()
    q = read_csv(acts / "ref_q_layer1.csv")
    b, t, h, H, Dh, T = 1, 5, 2, lay["H"], lay["Dh"], lay["T"]
    base = ((b * T + t) * H + h) * Dh
    got = [int(w, 16) - (1 << 32) * (int(w, 16) >> 31) for w in words[base:base + Dh]]
    assert np.abs(np.array(got) / 65536 - q[b * T + t, h * Dh:(h + 1) * Dh]).max() <= 2.0 ** -17


# --- bad input to 5_golden.py: exit 2, one line, nothing written -------------------------------------

def test_golden_overflow_error_writes_nothing(source, tmp_path):
    out = tmp_path / "g"
    with pytest.raises(InputError, match=r"q_layer2.csv: \d+ values do not fit fixed Q8.8"):
        golden_script.main(["--in-dir", str(source), "--out-dir", str(out), "--format", "bin", "--encoding", "fixed",
                            "--bits", "16", "--frac-bits", "8", "--on-overflow", "error"])
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name != "g"]  # no staging folder left behind


@pytest.mark.parametrize("args,message", [
    (["--select", "nothing_matches"], "no CSV file"),
    (["--encoding", "fixed", "--bits", "12"], "--bits 12"),
    (["--encoding", "fixed", "--bits", "16", "--frac-bits", "16"], "--frac-bits 16"),
    (["--same"], "is, contains or lies inside the input folder"),
])
def test_golden_bad_input(source, tmp_path, args, message):
    out = source if args == ["--same"] else tmp_path / "g"
    args = [] if args == ["--same"] else args
    with pytest.raises(InputError, match=re.escape(message)):
        golden_script.main(["--in-dir", str(source), "--out-dir", str(out), *args])
    assert not (tmp_path / "g").exists() and not (source / golden.MANIFEST).exists()


def test_fixed_point_refuses_nan(tmp_path):
    write_csv(tmp_path / "src" / "k_layer0.csv", np.array([[1.0, np.nan]], np.float32))
    with pytest.raises(InputError, match=r"k_layer0.csv has NaN at \(0, 1\)"):
        golden_script.main(["--in-dir", str(tmp_path / "src"), "--out-dir", str(tmp_path / "g"), "--encoding", "fixed"])


# --- grading -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline(llama32, tmp_path_factory):
    """Steps 1 -> 2 -> 3 on the Llama-3.2-shaped tiny model: (model, weights, acts, qkv)."""
    base = tmp_path_factory.mktemp("golden_pipeline")
    weights = export_weights(llama32, base / "weights")
    acts = capture(llama32, base / "x")
    assert offline.main(["--model-dir", str(llama32), "--weights-dir", str(weights), "--acts-dir", str(acts),
                         "--out-dir", str(base / "qkv")]) == 0
    return llama32, weights, acts, base / "qkv"


def grade_run(candidate: Path, acts: Path, out: Path, *args: str) -> tuple[int, dict | None]:
    code = grade_script.main(["--candidate-dir", str(candidate), "--reference-dir", str(acts), "--out-dir", str(out),
                              *args])
    report = out / "report.json"
    return code, json.loads(report.read_text()) if report.is_file() else None


def copy_candidate(qkv: Path, dest: Path) -> Path:
    shutil.copytree(qkv, dest)
    return dest


def real_row(acts: Path, prompt: int) -> int:
    """A real token's row of `prompt` (its last position)."""
    mask = read_csv(acts / "attention_mask.csv")
    return prompt * mask.shape[1] + int(np.flatnonzero(mask[prompt])[-1])


def forward_labels(folder: Path) -> list[str]:
    """The nodes of a folder's CSV files (not its inputs), in forward order."""
    parsed = [p[:2] for f in folder.glob("*.csv") if (p := nodes.parse(f.stem))]
    return [nodes.label(*p) for p in sorted(parsed, key=lambda p: nodes.forward_key(*p))]


def test_step3_outputs_pass_as_a_user_runs_it(pipeline, tmp_path):
    model, _, acts, qkv = pipeline
    out = tmp_path / "grade"
    r = run_script("6_grade.py", "--model-dir", model, "--candidate-dir", qkv, "--reference-dir", acts, "--out-dir", out)
    assert r.returncode == 0, r.stdout + r.stderr
    expected = forward_labels(qkv)  # whatever step 3 writes (q, k, v, attn, ...), in forward order
    assert "first failing node: none" in r.stdout
    assert re.search(rf"^PASS: {len(expected)} nodes graded", r.stdout, re.M), r.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["pass"] and report["first_failing"] is None
    assert [n["label"] for n in report["nodes"]] == expected
    assert expected.index("layer 0 q") < expected.index("layer 0 attn") < expected.index("layer 1 q")
    for n in report["nodes"]:
        assert n["max_rel"] <= 1e-5 and n["cosine"] > 1 - 1e-10 and (n["nmse_db"] == "-inf" or n["nmse_db"] < -100)
    assert (out / "report.md").is_file() and (out / "errors.png").stat().st_size > 10_000


def test_one_value_changed_in_layer_2_attn_is_the_first_failing_node(pipeline, tmp_path):
    _, _, acts, qkv = pipeline
    cand = copy_candidate(qkv, tmp_path / "cand")
    attn = read_csv(cand / "attn_layer2.csv")
    attn[real_row(acts, 0), 7] += 0.05
    write_csv(cand / "attn_layer2.csv", attn)
    out = tmp_path / "grade"
    code, report = grade_run(cand, acts, out)
    assert code == 1 and not report["pass"]
    first = report["first_failing"]
    assert (first["layer"], first["node"], first["label"]) == (2, "attn", "layer 2 attn")
    assert first["worst_row"] == real_row(acts, 0) and first["worst_col"] == 7
    assert [n["label"] for n in report["nodes"] if not n["pass"]] == ["layer 2 attn"]
    assert "first failing node in forward order: layer 2 attn" in (out / "report.md").read_text()


def test_forward_order_not_file_order_names_the_first_failure(pipeline, tmp_path):
    """attn_layer1 sorts before q_layer2 and v_layer1 by name, and after q_layer1 in the forward pass."""
    _, _, acts, qkv = pipeline
    cand = copy_candidate(qkv, tmp_path / "cand")
    for name in ("attn_layer1", "v_layer1", "q_layer2"):
        a = read_csv(cand / f"{name}.csv")
        a[real_row(acts, 1), 0] += 1.0
        write_csv(cand / f"{name}.csv", a)
    code, report = grade_run(cand, acts, tmp_path / "grade")
    assert code == 1 and report["first_failing"]["label"] == "layer 1 v"


def test_a_change_in_a_padding_row_is_not_graded(pipeline, tmp_path):
    _, _, acts, qkv = pipeline
    mask = read_csv(acts / "attention_mask.csv")
    pad = int(np.flatnonzero(mask.reshape(-1) == 0)[0])  # the short prompt is left-padded
    cand = copy_candidate(qkv, tmp_path / "cand")
    q = read_csv(cand / "q_layer0.csv")
    q[pad] += 100.0
    write_csv(cand / "q_layer0.csv", q)
    assert grade_run(cand, acts, tmp_path / "grade")[0] == 0


def q16_candidate(qkv: Path, dest: Path, fmt: str = "hex") -> Path:
    assert golden_script.main(["--in-dir", str(qkv), "--out-dir", str(dest), "--format", fmt,
                               "--encoding", "fixed", "--bits", "32", "--frac-bits", "16"]) == 0
    return dest


def test_q16_16_candidate_passes_and_one_word_1000_steps_off_fails(pipeline, tmp_path, capsys):
    _, _, acts, qkv = pipeline
    cand = q16_candidate(qkv, tmp_path / "q16")
    capsys.readouterr()
    code, report = grade_run(cand, acts, tmp_path / "grade")
    assert code == 0, report
    assert report["settings"]["effective ATOL"] == str(1e-7 + 2.0 ** -16)
    assert "quantisation step 2^-16" in capsys.readouterr().out

    # One word of layer 1's k, 1000 steps off; the manifest updated so that only the value is wrong.
    path = cand / "k_layer1.hex"
    words = path.read_text().split("\n")
    i = real_row(acts, 0) * read_csv(qkv / "k_layer1.csv").shape[1] + 3
    words[i] = f"{(int(words[i], 16) + 1000) % (1 << 32):08x}"
    path.write_text("\n".join(words))
    manifest = json.loads((cand / golden.MANIFEST).read_text())
    for e in manifest["files"]:
        if e["file"] == path.name:
            e["sha256"] = sha256_file(path)
    (cand / golden.MANIFEST).write_text(json.dumps(manifest))
    code, report = grade_run(cand, acts, tmp_path / "grade2")
    assert code == 1 and report["first_failing"]["label"] == "layer 1 k"
    assert report["first_failing"]["max_abs"] == pytest.approx(1000 * 2.0 ** -16, rel=0.02)


def test_bfloat16_npz_candidate_passes_with_its_rounding_allowed(pipeline, tmp_path):
    _, _, acts, qkv = pipeline
    cand = tmp_path / "bf16"
    assert golden_script.main(["--in-dir", str(qkv), "--out-dir", str(cand), "--format", "npz",
                               "--encoding", "bfloat16"]) == 0
    code, report = grade_run(cand, acts, tmp_path / "grade")
    assert code == 0 and max(n["max_rel"] for n in report["nodes"]) > 1e-3  # bf16 really is coarser


# --- bad input to 6_grade.py: exit 2, one line naming the file, nothing written --------------------

def plant_unknown_name(cand: Path, acts: Path) -> str:
    shutil.copy(cand / "q_layer0.csv", cand / "qq_layer0.csv")
    return "qq_layer0.csv: unknown name 'qq_layer0'"


def plant_wrong_shape(cand: Path, acts: Path) -> str:
    a = read_csv(cand / "v_layer1.csv")
    write_csv(cand / "v_layer1.csv", a[:, :-1])
    return f"v_layer1.csv has shape {(a.shape[0], a.shape[1] - 1)}, its reference {acts / 'ref_v_layer1.csv'} {a.shape}"


def plant_missing_reference(cand: Path, acts: Path) -> str:
    shutil.copy(cand / "attn_layer0.csv", cand / "attn_layer7.csv")  # the tiny model has 3 layers
    return "ref_attn_layer7.csv is missing"


def plant_hex_without_manifest(cand: Path, acts: Path) -> str:
    (cand / "q_layer0.hex").write_text("00000000\n")
    return "q_layer0.hex: a .hex file needs"


def manifest_edit(edit):
    def plant(cand: Path, acts: Path) -> str:
        shutil.rmtree(cand)
        q16_candidate(acts.parent / "qkv", cand)
        manifest = json.loads((cand / golden.MANIFEST).read_text())
        message = edit(cand, manifest)
        (cand / golden.MANIFEST).write_text(json.dumps(manifest))
        return message
    return plant


def _changed_file(cand, m):
    (cand / "k_layer2.hex").write_text((cand / "k_layer2.hex").read_text().replace("0", "1", 1))
    return "k_layer2.hex: sha256"


def _missing_file(cand, m):
    (cand / "q_layer1.hex").unlink()
    return "q_layer1.hex is missing"


def _unknown_encoding(cand, m):
    m["encoding"] = "posit16"
    return "--encoding 'posit16'"


def _wrong_shape(cand, m):
    m["files"][0]["shape"][1] += 1
    return f"{m['files'][0]['file']} holds"


@pytest.mark.parametrize("plant", [plant_unknown_name, plant_wrong_shape, plant_missing_reference,
                                   plant_hex_without_manifest, manifest_edit(_changed_file),
                                   manifest_edit(_missing_file), manifest_edit(_unknown_encoding),
                                   manifest_edit(_wrong_shape)])
def test_grade_bad_input_exits_2(pipeline, tmp_path, plant):
    _, _, acts, qkv = pipeline
    cand = copy_candidate(qkv, tmp_path / "cand")
    message = plant(cand, acts)
    out = tmp_path / "grade"
    with pytest.raises(InputError) as e:
        grade_script.main(["--candidate-dir", str(cand), "--reference-dir", str(acts), "--out-dir", str(out)])
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()


def test_grade_bad_input_is_one_line_as_a_user_sees_it(pipeline, tmp_path):
    _, _, acts, qkv = pipeline
    cand = copy_candidate(qkv, tmp_path / "cand")
    plant_wrong_shape(cand, acts)
    r = run_script("6_grade.py", "--candidate-dir", cand, "--reference-dir", acts, "--out-dir", tmp_path / "grade")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "v_layer1.csv" in r.stderr and not (tmp_path / "grade").exists()


# --- forward order and real rows of the other nodes ------------------------------------------------

def test_forward_order_of_every_node():
    names = [nodes.stem(n, layer) for layer in (1, 0) for n in reversed(nodes.LAYER_NODES)] + ["logits", "norm"]
    parsed = [nodes.parse(n)[:2] for n in names]
    ordered = [nodes.label(*p) for p in sorted(parsed, key=lambda p: nodes.forward_key(*p))]
    assert ordered[:12] == [f"layer 0 {n}" for n in
                            ("x", "xnorm", "q", "k", "v", "probs", "attn", "h", "hnorm", "act", "mlp", "out")]
    assert ordered[12] == "layer 1 x" and ordered[-2:] == ["norm", "logits"]
    assert nodes.parse("ref_hnorm_layer3") == (3, "hnorm", True) and nodes.parse("weights_layer3") is None


def test_real_rows_of_probs_and_last_token_logits():
    mask = np.array([[0, 1, 1], [1, 1, 1]], np.float32)  # B=2, T=3, prompt 0 left-padded
    probs = grade.real_rows("probs", 2 * 4 * 3, mask, Path("p"))  # H=4: rows (b*H + h)*T + t
    assert probs.reshape(2, 4, 3)[0, :, 0].tolist() == [False] * 4 and probs.sum() == 4 * 5
    assert grade.real_rows("logits", 2, mask, Path("l")).tolist() == [True, True]
    assert grade.real_rows("logits", 6, mask, Path("l")).tolist() == [False, True, True, True, True, True]
    with pytest.raises(InputError, match="has 5 rows"):
        grade.real_rows("out", 5, mask, Path("o"))


def test_step2_golden_graded_against_itself_is_exact(pipeline, tmp_path):
    """Golden float32 of a whole step 2 folder (ref_ names, x, xnorm, the masks) grades at exactly 0."""
    _, _, acts, _ = pipeline
    cand = tmp_path / "g"
    assert golden_script.main(["--in-dir", str(acts), "--out-dir", str(cand), "--format", "npy"]) == 0
    code, report = grade_run(cand, acts, tmp_path / "grade")
    assert code == 0 and report["settings"]["skipped"] == "attention_mask, position_ids"
    assert [n["label"] for n in report["nodes"]] == forward_labels(acts)
    assert {"x", "xnorm", "q", "k", "v", "attn"} <= {n["node"] for n in report["nodes"]}
    assert all(n["max_abs"] == 0 and n["nmse_db"] == "-inf" for n in report["nodes"])
    assert [n["reference"] for n in report["nodes"]][:3] == ["x_layer0.csv", "xnorm_layer0.csv", "ref_q_layer0.csv"]


def test_probs_and_last_token_logits_grade_over_real_rows_only(tmp_path):
    """probs rows (b*H + h)*T + t and one logits row per prompt: padding rows never count."""
    B, T, H, V = 2, 3, 2, 5
    rng = np.random.default_rng(1)
    ref, cand = tmp_path / "ref", tmp_path / "cand"
    mask = np.array([[0, 1, 1], [1, 1, 1]], np.float32)  # prompt 0 left-padded
    write_csv(ref / "attention_mask.csv", mask)
    probs, logits = rng.random((B * H * T, T), dtype=np.float32), rng.standard_normal((B, V), dtype=np.float32)
    write_csv(ref / (nodes.stem("probs", 0, ref=True) + ".csv"), probs)
    write_csv(ref / "ref_logits.csv", logits)
    bad_probs = probs.copy()
    bad_probs[(0 * H + 1) * T + 0] += 1.0  # prompt 0, head 1, the padded position 0
    write_csv(cand / (nodes.stem("probs", 0) + ".csv"), bad_probs)
    np.save(cand / "logits.npy", logits)
    code, report = grade_run(cand, ref, tmp_path / "grade", "--no-verify-hashes")  # made here: no step-2 manifest
    assert code == 0 and [n["label"] for n in report["nodes"]] == ["layer 0 probs", "logits"]

    bad_probs[(1 * H + 1) * T + 0] += 1.0  # prompt 1, head 1, position 0: real
    write_csv(cand / (nodes.stem("probs", 0) + ".csv"), bad_probs)
    logits[1, 2] += 1.0
    np.save(cand / "logits.npy", logits)
    code, report = grade_run(cand, ref, tmp_path / "grade2", "--no-verify-hashes")
    assert code == 1 and report["first_failing"]["label"] == "layer 0 probs"
    assert report["first_failing"]["worst_row"] == (1 * H + 1) * T + 0
    assert [n["pass"] for n in report["nodes"]] == [False, False]
