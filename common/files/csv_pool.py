"""The CSV writer's worker pool: formats the row chunks of one large tensor on every core at once.

Workers are forked once per process and reused; each array is handed over through a memfd (or
mapped straight from its safetensors shard); each worker writes its own chunks with pwritev
straight into the output file, so no text is copied between processes. The parent hashes the
file in order as it fills (plain sha256 of the file) and drops written output from the page cache
once it is on disk (_DropBehind).

Why a pool of our own rather than ProcessPoolExecutor.map over the same row chunks (each chunk's
text returned to the parent, which writes and hashes it in order): with the executor every byte of
text also crosses a pipe and is copied into the file by the one parent, a serial stage that grows
with the core count; here the parent only hashes (on many cores, with a disk faster than sha256,
that hash becomes the bound). The pool against the executor, and the whole-model export against
the machine's limit: benchmarks/bench_model_weights.py, figures in benchmarks/README.md.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import math
import mmap
import os
import pickle
import signal
import socket
import struct
import threading
from collections import deque
from pathlib import Path

import numpy as np

from common.cli import interrupts_deferred
from common.files import csv_format

DROP_BEHIND_BYTES = 512 << 20  # written output kept in the page cache; writeback starts at half
DROP_BEHIND_FILES = 64  # files held open for dropping, at most
_SYNC_WRITE, _SYNC_WAIT = 2, 1 | 2 | 4  # sync_file_range: start writeback; wait, write, wait


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _sync_file_range(fd: int, offset: int, nbytes: int, flags: int) -> None:
    """Linux: start (or finish) writeback of a byte range; elsewhere nothing."""
    fn = getattr(_libc(), "sync_file_range", None)
    if fn is not None:
        fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        fn(fd, offset, nbytes, flags)


class _DropBehind:
    """Keeps the export's footprint in the page cache to DROP_BEHIND_BYTES: output older than the
    newest half of that starts its writeback, and output older than all of it is waited for and
    dropped from the cache, oldest chunk first.

    Why: pages the kernel takes fresh from free memory cost far more to fill than recycled ones
    (benchmarks/README.md has the measurement), and buffered writes into one file hold the inode's
    lock, so that copy does not scale with workers. Dropped pages are reused at once by the next
    chunks. The files themselves are complete and unchanged: only their cached copy goes. An export smaller than half the window
    is left alone, and a deleted file is let go without being written back.
    """

    def __init__(self):
        self.ranges: deque[tuple[list[int], int, int]] = deque()  # (file, offset, nbytes), oldest first
        # file: [fd (a dup), its ranges still held, bytes written]
        self.files: deque[list[int]] = deque()  # files with ranges, oldest first
        self.started = 0  # leftmost ranges whose writeback has started
        self.pending = 0  # bytes in ranges
        self.fresh = 0  # bytes in ranges not started

    def start(self, fd: int) -> None:
        if self.files and not self.files[-1][1]:  # the previous file, already all dropped
            os.close(self.files.pop()[0])
        self.files.append([os.dup(fd), 0, 0])

    def written(self, nbytes: int) -> None:
        """The newest file grew by nbytes (in order, from its start)."""
        f = self.files[-1]
        self.ranges.append((f, f[2], nbytes))
        f[1] += 1
        f[2] += nbytes
        self.pending += nbytes
        self.fresh += nbytes
        while self.fresh > DROP_BEHIND_BYTES // 2:
            g, offset, n = self.ranges[self.started]
            if os.fstat(g[0]).st_nlink:
                _sync_file_range(g[0], offset, n, _SYNC_WRITE)
            self.started += 1
            self.fresh -= n
        while self.ranges and (self.pending > DROP_BEHIND_BYTES or len(self.files) > DROP_BEHIND_FILES):
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        g, offset, n = self.ranges.popleft()
        if self.started:
            self.started -= 1
        else:
            self.fresh -= n
        self.pending -= n
        if os.fstat(g[0]).st_nlink:  # a deleted file's pages go when it is closed, unwritten
            _sync_file_range(g[0], offset, n, _SYNC_WAIT)
            os.posix_fadvise(g[0], offset, n, os.POSIX_FADV_DONTNEED)
        g[1] -= 1
        if not g[1] and g is not self.files[-1]:
            self.files.remove(g)
            os.close(g[0])

    def close(self) -> None:
        """Forget the rest (what is still cached stays cached)."""
        _close_all(f[0] for f in self.files)
        self.files.clear()
        self.ranges.clear()
        self.started = self.pending = self.fresh = 0


def _worker(fd: int, chunks: list, rank: int, nworkers: int, recv_fd: int, send_fd: int, done_fd: int) -> None:
    """Format chunks rank, rank+W, ...; chunk i's file offset comes from the worker of chunk i-1
    (around the ring), and (i, offset, nbytes) goes to the parent once chunk i is on disk."""
    for i in range(rank, len(chunks), nworkers):
        pieces = csv_format.format_block(*chunks[i])
        nbytes = sum(map(len, pieces))
        offset = 0
        if i > 0:
            msg = os.read(recv_fd, 8)
            if len(msg) != 8:
                raise OSError("a CSV worker stopped before passing on its file offset")
            (offset,) = struct.unpack("<q", msg)
        if i + 1 < len(chunks):
            os.write(send_fd, struct.pack("<q", offset + nbytes))
        csv_format.pwrite_all(fd, pieces, offset)
        os.write(done_fd, _DONE.pack(i, offset, nbytes))  # < PIPE_BUF: atomic among writers


def _set_up_worker(parent: int) -> None:
    """Linux/glibc: SIGKILL this worker when the parent dies (a killed export leaves no writer
    behind), and keep freed chunk buffers in the heap for the next chunk instead of handing them
    back to the kernel (each fresh ~14 MB buffer would cost thousands of page faults)."""
    try:
        libc = _libc()
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        libc.mallopt(-3, 1 << 28)  # M_MMAP_THRESHOLD: serve buffers up to 256 MB from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: and do not give the freed heap back
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def _close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _close_inherited(keep) -> None:
    """In a worker: close every descriptor but stdio and `keep`. The pool is forked while the
    caller has the first output file open: kept open by the workers for their whole life, a
    deleted or replaced output's page cache and disk space would not be freed."""
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def _hash_range(digest, fd: int, offset: int, nbytes: int) -> None:
    """Hash bytes of the file straight from the page cache (a mapping: no copy into this process)."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with mmap.mmap(fd, offset + nbytes - start, prot=mmap.PROT_READ, offset=start) as mm:
        with memoryview(mm) as view:
            digest.update(view[offset - start:])


_DONE = struct.Struct("<qqq")  # worker -> parent: (chunk, offset, nbytes); chunk -1: failed (errno, 0)
_TASK_DONE = -2  # worker -> parent: this task is over and its file descriptors are closed


def _serve(rank: int, nworkers: int, control: socket.socket, recv_fd: int, send_fd: int, done_fd: int) -> None:
    """A worker's life: take a task (the array's bytes in a file or memfd, the output file), write
    its chunks, repeat; a closed control socket means the parent is done with the pool."""
    while True:
        msg, fds, _, _ = socket.recv_fds(control, 1 << 16, 2)
        if not msg:
            return
        src_fd, out_fd = fds
        try:
            shape, dtype, offset, col_sep, chunk_values = pickle.loads(msg)
            start = offset - offset % mmap.ALLOCATIONGRANULARITY  # a mapping starts on a page
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            mm = mmap.mmap(src_fd, offset - start + nbytes, prot=mmap.PROT_READ, offset=start)
            a = np.frombuffer(mm, dtype, math.prod(shape), offset - start).reshape(shape)
            _worker(out_fd, csv_format.chunks(a, col_sep, chunk_values), rank, nworkers, recv_fd, send_fd, done_fd)
            del a
            mm.close()
        except OSError as e:
            os.write(done_fd, _DONE.pack(-1, e.errno or 0, 0))
            raise
        except BaseException:
            os.write(done_fd, _DONE.pack(-1, 0, 0))
            raise
        finally:
            _close_all([src_fd, out_fd])
        os.write(done_fd, _DONE.pack(_TASK_DONE, 0, 0))


class _Pool:
    """Formatting workers forked once per process and reused for every large write (a fork of a
    process that has torch loaded costs as much as formatting many values).

    They pass each other the next file offset around a ring of pipes, so each writes its own
    chunks with pwritev straight into the file; the parent hashes the file in order as it fills
    and hands what it hashed to _DropBehind.
    """

    def __init__(self, nworkers: int):
        self.owner, self.nworkers, self.pids = os.getpid(), nworkers, []
        ring = [os.pipe() for _ in range(nworkers)]  # ring[w]: offsets from worker w to worker w+1
        self.done_r, done_w = os.pipe()
        pairs = [socket.socketpair() for _ in range(nworkers)]
        gc.freeze()  # the workers' collector leaves the parent's objects alone: no copy-on-write
        try:
            for rank in range(nworkers):
                with interrupts_deferred():  # Ctrl-C reaches the whole process group: only the parent acts on it
                    pid = os.fork()  # (it stops the workers); a worker that died of it would read as a failure
                    if pid == 0:
                        signal.signal(signal.SIGINT, signal.SIG_IGN)
                if pid == 0:  # worker: keep only its own ends, never return into the caller
                    code = 1
                    try:
                        gc.disable()
                        _set_up_worker(self.owner)
                        keep = (ring[rank - 1][0], ring[rank][1], done_w, pairs[rank][1].fileno())
                        for r, (mine, theirs) in enumerate(pairs):
                            mine.close()
                            if r != rank:
                                theirs.close()
                        _close_inherited(keep)
                        _serve(rank, nworkers, pairs[rank][1], *keep[:3])
                        code = 0
                    finally:
                        os._exit(code)
                self.pids.append(pid)
        finally:
            gc.unfreeze()
            _close_all([e for p in ring for e in p] + [done_w])
            for _, theirs in pairs:
                theirs.close()
        self.controls = [mine for mine, _ in pairs]
        self.behind = _DropBehind()

    def write(self, out_fd: int, a: np.ndarray, col_sep: bytes, chunk_values: int, digest, on_chunk,
              file_slice: tuple[Path, int] | None = None) -> int:
        """Write the whole file for `a`; return its size. Any failure closes the pool.

        The workers map the array's bytes from `file_slice` (file, offset) when given, else from
        a memfd copy.
        """
        chunks = csv_format.chunks(a, col_sep, chunk_values)  # the same plan the workers compute
        if file_slice is not None:
            src, offset = os.open(file_slice[0], os.O_RDONLY | os.O_CLOEXEC), file_slice[1]
        else:
            src, offset = os.memfd_create("llama-xray-csv", os.MFD_CLOEXEC), 0
        try:
            if file_slice is None:
                os.ftruncate(src, a.nbytes)
                with mmap.mmap(src, a.nbytes) as mm:
                    np.frombuffer(mm, a.dtype, a.size).reshape(a.shape)[...] = a
            task = pickle.dumps((a.shape, a.dtype.str, offset, col_sep, chunk_values))
            for control in self.controls:
                socket.send_fds(control, [task], [src, out_fd])
            self.behind.start(out_fd)
            # Returns only once every worker is through with the task, so that none still holds
            # the file (a worker with no chunk of a small array may lag behind the others).
            finished, hashed, size, over = {}, 0, 0, 0
            while hashed < len(chunks) or over < self.nworkers:
                msg = os.read(self.done_r, _DONE.size)
                if len(msg) != _DONE.size:
                    raise OSError("a CSV worker died")
                i, offset, nbytes = _DONE.unpack(msg)
                if i == _TASK_DONE:
                    over += 1
                    continue
                if i < 0:
                    raise OSError(offset, f"a CSV worker failed: {os.strerror(offset) if offset else 'see above'}")
                finished[i] = (offset, nbytes)
                while hashed in finished:  # hash the finished prefix of the file, in order
                    offset, nbytes = finished.pop(hashed)
                    if digest is not None:
                        _hash_range(digest, out_fd, offset, nbytes)
                    self.behind.written(nbytes)
                    if on_chunk:
                        on_chunk(chunks[hashed][0].size)
                    size = offset + nbytes
                    hashed += 1
            return size
        except BaseException:
            self.close()
            raise
        finally:
            os.close(src)

    def close(self) -> None:
        for control in self.controls:
            control.close()  # a worker between tasks exits on this
        for pid in self.pids:  # one in the middle of a task is stopped
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ChildProcessError, ProcessLookupError):
                pass
        _close_all([self.done_r])
        self.behind.close()
        self.pids, self.controls = [], []


_pool: _Pool | None = None
_pool_lock = threading.Lock()


def close_pool() -> None:
    """Stop the formatting workers (they start again on the next large write)."""
    global _pool
    if _pool is not None and _pool.owner == os.getpid():
        _pool.close()
    _pool = None


def _get_pool(nworkers: int) -> _Pool:
    global _pool
    if _pool is None or _pool.owner != os.getpid() or _pool.nworkers != nworkers or not _pool.pids:
        close_pool()
        _pool = _Pool(nworkers)
    return _pool


def write(workers: int, out_fd: int, a: np.ndarray, col_sep: bytes, chunk_values: int, digest, on_chunk,
          file_slice: tuple[Path, int] | None) -> int:
    """csv_io.write_numbers' parallel path: the whole file for `a` written by `workers` processes."""
    with _pool_lock:
        return _get_pool(workers).write(out_fd, a, col_sep, chunk_values, digest, on_chunk, file_slice)
