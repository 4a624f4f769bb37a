"""The CSV files are exact: every value parses back, with every common reader, to the source's float32
bits; the writer is the shortest round-trip form; the parallel writer writes the same bytes."""
from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd
import pytest
import torch

from common.cli import InputError
from common.files import csv_format, csv_io, csv_pool
from common.files.csv_io import read_csv, write_csv, write_numbers


def bits(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).view(np.uint32)


@pytest.fixture(scope="module")
def hard_values() -> np.ndarray:
    """Finite float32 values that stress a formatter: random bit patterns over every exponent,
    subnormals, +-0, extremes, powers of two and their neighbours, every bf16 and fp16 value."""
    rng = np.random.default_rng(1234)
    u = rng.integers(0, 2**32, 400_000, dtype=np.uint64).astype(np.uint32)
    special = np.array([0x00000000, 0x80000000, 0x00000001, 0x80000001, 0x007FFFFF, 0x00800000,
                        0x7F7FFFFF, 0xFF7FFFFF, 0x3F800000, 0x3F800001, 0x3F7FFFFF, 0x4B7FFFFF,
                        0x4B800000, 0x33800000, 0x2F800000], dtype=np.uint32)
    exps = (np.arange(256, dtype=np.uint32) << 23)  # 2^e for every exponent, and one ulp either side
    pow2 = np.concatenate([exps, exps + 1, exps - 1, exps | 0x80000000])
    sub = rng.integers(1, 0x00800000, 20_000, dtype=np.uint32)  # subnormals
    bf16 = np.arange(2**16, dtype=np.uint32) << 16  # every bfloat16, widened
    fp16 = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float32).view(np.uint32)
    allv = np.concatenate([u, special, pow2, sub, bf16, fp16]).view(np.float32)
    allv = allv[np.isfinite(allv)]
    return allv[: allv.size // 1000 * 1000].reshape(-1, 1000)  # (rows, 1000)


@pytest.fixture(scope="module")
def hard_csv(hard_values, tmp_path_factory) -> tuple[np.ndarray, bytes]:
    path = tmp_path_factory.mktemp("csv") / "hard.csv"
    write_csv(path, hard_values)
    return hard_values, path.read_bytes()


def test_python_float_reads_every_value_back(hard_csv):
    a, text = hard_csv
    tokens = text.decode().replace("\n", ",").rstrip(",").split(",")
    assert text.count(b"\n") == a.shape[0] and len(tokens) == a.size
    back = np.array([np.float32(float(t)) for t in tokens], dtype=np.float32)
    np.testing.assert_array_equal(bits(back), bits(a).ravel())
    # Parsed to float64 (correctly rounded) and then cast: no double rounding.
    np.testing.assert_array_equal(bits(np.array(tokens, dtype=np.float64).astype(np.float32)), bits(a).ravel())


def test_numpy_pandas_and_our_reader_read_every_value_back(hard_csv, tmp_path):
    a, text = hard_csv
    np.testing.assert_array_equal(bits(np.loadtxt(io.BytesIO(text), dtype=np.float32, delimiter=",")), bits(a))
    as64 = pd.read_csv(io.BytesIO(text), header=None).to_numpy()  # pandas parses float64 ...
    assert as64.dtype == np.float64
    np.testing.assert_array_equal(bits(as64.astype(np.float32)), bits(a))  # ... and the cast is exact
    (tmp_path / "x.csv").write_bytes(text)
    np.testing.assert_array_equal(bits(read_csv(tmp_path / "x.csv", a.shape)), bits(a))


def significant_digits(s: str) -> str:
    return s.lstrip("-").lower().split("e")[0].replace(".", "").strip("0")


def test_values_are_the_shortest_round_trip_form(hard_csv):
    """No value uses more significant digits than numpy's shortest (Dragon4) repr of the float32."""
    a, text = hard_csv
    tokens = text.decode().replace("\n", ",").rstrip(",").split(",")
    flat = a.ravel()
    for i in np.random.default_rng(0).choice(a.size, 20_000, replace=False):
        shortest = np.format_float_scientific(flat[i], unique=True)
        assert len(significant_digits(tokens[i])) <= len(significant_digits(shortest)), (tokens[i], shortest)


def test_typical_weights_take_about_13_bytes_per_value(tmp_path):
    w = torch.randn(512, 512).mul(0.02).to(torch.bfloat16)  # Llama-like bf16 weights
    n = write_csv(tmp_path / "w.csv", w)
    assert n == os.path.getsize(tmp_path / "w.csv")
    assert 9 < n / w.numel() < 14.5
    np.testing.assert_array_equal(read_csv(tmp_path / "w.csv", (512, 512)), w.float().numpy())


def test_nan_and_inf_are_written_as_readers_expect(tmp_path):
    a = np.array([[1.5, np.nan, -np.inf], [np.inf, -0.0, 3.0]], dtype=np.float32)
    write_csv(tmp_path / "n.csv", a)
    text = (tmp_path / "n.csv").read_text()
    assert text == "1.5,NaN,-inf\ninf,-0.0,3.0\n"
    for back in (read_csv(tmp_path / "n.csv", a.shape), np.loadtxt(tmp_path / "n.csv", np.float32, delimiter=","),
                 pd.read_csv(tmp_path / "n.csv", header=None).to_numpy().astype(np.float32),
                 np.array([[float(v) for v in line.split(",")] for line in text.splitlines()], np.float32)):
        np.testing.assert_array_equal(back, a)  # NaN == NaN here; -0.0 keeps its sign:
        assert np.signbit(back[1, 1])


def test_shapes_one_line_for_1d_and_sources_of_every_kind(tmp_path):
    p = tmp_path / "v.csv"
    write_csv(p, torch.arange(5, dtype=torch.int64))
    assert p.read_text() == "0.0,1.0,2.0,3.0,4.0\n"
    assert read_csv(p, (5,)).tolist() == [0, 1, 2, 3, 4]
    write_csv(p, np.float32(2.5))
    assert p.read_text() == "2.5\n"
    long_1d = np.random.default_rng(0).standard_normal(3 * 4096 + 17).astype(np.float32)  # several segments
    write_csv(p, long_1d)
    assert p.read_bytes().count(b"\n") == 1
    np.testing.assert_array_equal(read_csv(p, long_1d.shape), long_1d)
    with pytest.raises(ValueError):
        write_csv(p, np.zeros((2, 2, 2)))


def test_parallel_writer_writes_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(csv_io, "CHUNK_VALUES", 700)  # many small chunks, so every worker gets several
    monkeypatch.setattr(csv_io, "PARALLEL_MIN_VALUES", 0)
    a = np.random.default_rng(3).standard_normal((301, 97)).astype(np.float32)
    a[7, 5], a[300, 96] = np.nan, -np.inf
    serial = write_numbers(tmp_path / "s.csv", a, workers=1, sha256=True)
    for workers in (2, 3, 5):
        done = []
        parallel = write_numbers(tmp_path / f"p{workers}.csv", a, workers=workers, sha256=True, on_chunk=done.append)
        assert parallel == serial and (tmp_path / f"p{workers}.csv").read_bytes() == (tmp_path / "s.csv").read_bytes()
        assert sum(done) == a.size
    for half in (torch.bfloat16, torch.float16):  # widened chunk by chunk in the workers, exactly
        h = torch.from_numpy(a).to(half)
        write_numbers(tmp_path / "h1.csv", h.float(), workers=1)
        write_numbers(tmp_path / "h2.csv", h, workers=2)
        assert (tmp_path / "h1.csv").read_bytes() == (tmp_path / "h2.csv").read_bytes()
    one_line = np.arange(10_000, dtype=np.float32)
    write_numbers(tmp_path / "l1.csv", one_line, workers=1)
    write_numbers(tmp_path / "l2.csv", one_line, workers=2)
    assert (tmp_path / "l1.csv").read_bytes() == (tmp_path / "l2.csv").read_bytes()
    pids = list(csv_pool._pool.pids)
    write_numbers(tmp_path / "again.csv", a, workers=2)
    assert csv_pool._pool.pids == pids  # the workers are forked once and reused
    write_numbers(tmp_path / "t.txt", a[:3, :4], sep=" ")
    assert (tmp_path / "t.txt").read_text().splitlines()[0] == " ".join(
        (tmp_path / "s.csv").read_text().splitlines()[0].split(",")[:4])


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_workers_keep_no_output_file_open(tmp_path, monkeypatch):
    # The pool is forked inside the first large write, while that output file is open: a worker that
    # kept it open would pin a deleted or replaced output's disk space and page cache.
    monkeypatch.setattr(csv_io, "PARALLEL_MIN_VALUES", 0)
    csv_pool.close_pool()
    a = np.ones((64, 64), np.float32)
    write_numbers(tmp_path / "a.csv", a, workers=2)
    write_numbers(tmp_path / "b.csv", a, workers=2)  # every worker has closed its a.csv task by now
    assert csv_pool._pool.pids
    for pid in csv_pool._pool.pids:
        fd_dir = f"/proc/{pid}/fd"
        targets = [os.readlink(os.path.join(fd_dir, fd)) for fd in os.listdir(fd_dir)]
        assert str(tmp_path / "a.csv") not in targets, targets


def test_a_failing_writer_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(csv_io, "CHUNK_VALUES", 500)
    monkeypatch.setattr(csv_io, "PARALLEL_MIN_VALUES", 0)
    real = csv_format.format_block
    calls = []

    def failing(block, *seps):
        calls.append(1)
        if len(calls) == 3:  # in a forked worker this raises there, and the parent must notice
            raise MemoryError("planted")
        return real(block, *seps)
    csv_pool.close_pool()  # workers forked from now on run the planted failure
    monkeypatch.setattr(csv_format, "format_block", failing)
    a = np.ones((100, 50), np.float32)
    for workers in (1, 2):
        calls.clear()
        with pytest.raises((MemoryError, OSError)):
            write_csv(tmp_path / "x.csv", a, workers=workers)
        assert list(tmp_path.iterdir()) == []  # neither the final name nor a temp file
    assert csv_pool._pool is None or not csv_pool._pool.pids  # a failed pool is closed, never reused


def test_read_errors_name_the_file_and_both_shapes(tmp_path):
    p = tmp_path / "m.csv"
    write_csv(p, np.zeros((3, 4), np.float32))
    with pytest.raises(InputError, match=r"m\.csv has shape \(3, 4\), expected \(4, 3\)"):
        read_csv(p, (4, 3))
    with pytest.raises(InputError, match="missing"):
        read_csv(tmp_path / "nope.csv")
    for bad in ("1,2\n3\n", "1,2\n3,4,5\n", "1,x\n2,3\n", "1,,2\n"):
        p.write_text(bad)
        with pytest.raises(InputError, match=r"m\.csv.*not a plain numeric CSV"):
            read_csv(p)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_dropping_written_output_from_the_cache_keeps_every_byte(tmp_path, monkeypatch):
    # A window of a few bytes: every chunk is waited for and dropped, files are let go in order,
    # and a deleted one is closed at once; the files are exactly the serial writer's.
    monkeypatch.setattr(csv_io, "CHUNK_VALUES", 700)
    monkeypatch.setattr(csv_io, "PARALLEL_MIN_VALUES", 0)
    monkeypatch.setattr(csv_pool, "DROP_BEHIND_BYTES", 10)
    monkeypatch.setattr(csv_pool, "DROP_BEHIND_FILES", 2)
    csv_pool.close_pool()
    a = np.random.default_rng(4).standard_normal((300, 90)).astype(np.float32)
    for k in range(5):
        write_numbers(tmp_path / f"p{k}.csv", a * (k + 1), workers=2)
        if k == 1:
            (tmp_path / "p1.csv").unlink()
    for k in (0, 2, 3, 4):
        write_numbers(tmp_path / "serial.csv", a * (k + 1), workers=1)
        assert (tmp_path / f"p{k}.csv").read_bytes() == (tmp_path / "serial.csv").read_bytes()
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # the descriptor listdir itself used
            pass
    assert sum(str(tmp_path) in t for t in held) <= 2, held  # at most DROP_BEHIND_FILES outputs still open
    assert csv_pool._pool.behind.pending <= 10
    csv_pool.close_pool()
