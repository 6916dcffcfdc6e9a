"""Flat tensors in files, read and written asynchronously: the store behind ``zero3_nvme`` (ZeRO-Infinity's spill of
optimizer state to a local NVMe disk).

Layout: every process keeps its files in its own subdirectory of the user's ``nvme_dir``::

    <nvme_dir>/lightning_par_nvme/<hostname>-<pid>-rank<rank>/
        owner.json               {"pid", "hostname", "rank", "started"}
        <key>.<name>.bin         the raw bytes of one tensor, e.g. chunk12.exp_avg.bin
        .<key>.<name>.bin.<n>.tmp  a write in flight; renamed over the final name only once complete

[Note: cleaning after crashed runs]
A run that crashed leaves its subdirectory behind, and optimizer state is large, so a new store removes stale ones
first, under rules that keep it from ever removing what it should not:
  - only direct subdirectories of ``lightning_par_nvme/``, never anything else in ``nvme_dir``;
  - never a symlink (nor through one: ``shutil.rmtree`` does not follow the links it finds inside);
  - only when ``owner.json`` names *this* host (``nvme_dir`` may be a filesystem other hosts share, and their pids
    mean nothing here) and a positive pid that no longer exists (``os.kill(pid, 0)`` raises ProcessLookupError).
    A pid that was reused by an unrelated process only keeps a stale directory: the mistake goes the safe way.

Plain Python file I/O in a thread pool gives the overlap: the GIL is released while a thread reads or writes, and
the bytes go straight between the file and the tensor's memory (a ctypes view of ``data_ptr()``, no copy).
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

import torch

ROOT = "lightning_par_nvme"
OWNER = "owner.json"
MARGIN = 64 * 2**20  # bytes kept free beyond what is reserved: owner files, metadata, the filesystem's own needs
_SAFE = re.compile(r"[A-Za-z0-9_-]+")
# Subdirectories of open stores in this process: a second store for the same rank must not take over the first's files.
_OPEN: set[str] = set()
_OPEN_LOCK = threading.Lock()
_SUGGEST = "pass an existing, writable directory on a local NVMe disk as nvme_dir=..."


class NvmeDirectoryError(ValueError):
    """``nvme_dir`` cannot hold the store: missing and not creatable, not a directory, or not writable."""


class NvmeSpaceError(RuntimeError):
    """The disk under ``nvme_dir`` has (or had, during a write) too little free space."""


def _view(t: torch.Tensor) -> memoryview:
    """The tensor's bytes, in place (writable: reads fill the tensor through it)."""
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B") if n else memoryview(b"")


def _write_all(f, view: memoryview) -> None:
    done = 0
    while done < len(view):  # a single write(2) moves at most ~2 GiB on Linux
        done += f.write(view[done:])


def _drop_cache(fd: int, written: bool) -> None:
    # The point of spilling is that host memory is short: keep the page cache from holding a second copy. Dirty pages
    # are not dropped, so a write is flushed first (in this pool thread, off the training thread).
    if not hasattr(os, "posix_fadvise"):
        return
    if written:
        os.fdatasync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # pid > 0 checked by the caller: 0 and negatives address process groups
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process, alive
        pass
    return True


def _clean_stale(root: Path, hostname: str) -> None:
    """Remove subdirectories of ``root`` left by dead processes of this host; see [Note: cleaning after crashed runs]."""
    if root.is_symlink() or not root.is_dir():
        return
    for entry in os.scandir(root):
        if entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
            continue
        owner_file = Path(entry.path, OWNER)
        try:
            if owner_file.is_symlink():
                continue
            owner = json.loads(owner_file.read_text())
            pid, host = owner["pid"], owner["hostname"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # no readable owner: not provably ours to remove
        if (host == hostname and type(pid) is int and pid > 0 and pid != os.getpid()
                and entry.name.startswith(f"{_host_label(hostname)}-{pid}-rank") and not _alive(pid)):
            shutil.rmtree(entry.path, ignore_errors=True)  # another rank of this host may be removing it too


def _host_label(hostname: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", hostname)


def _check_directory(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise NvmeDirectoryError(f"nvme_dir {directory} exists but is not a directory; {_SUGGEST}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NvmeDirectoryError(f"nvme_dir {directory} does not exist and cannot be created ({e}); {_SUGGEST}") from e
    try:
        fd, probe = tempfile.mkstemp(prefix=".lightning_par_probe", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise NvmeDirectoryError(f"nvme_dir {directory} is not writable ({e}); {_SUGGEST}") from e


def _close(pool: ThreadPoolExecutor, path: Path, root: Path) -> None:
    pool.shutdown(wait=True)  # errors stay with their futures (and wait_all): closing always removes the files
    shutil.rmtree(path, ignore_errors=True)
    with _OPEN_LOCK:
        _OPEN.discard(str(path))
    try:
        root.rmdir()  # only when empty: other processes' subdirectories keep it
    except OSError:
        pass


class NvmeStore:
    """Flat tensors in files under ``directory``, read and written asynchronously by a small thread pool.

    Each ``write``/``read`` returns one Future for all its tensors (one pool task per tensor). Until it is done the
    caller must neither change written tensors nor use the ones being read into, and must not write a key while
    another write or a read of the same key is in flight.
    """

    def __init__(self, directory: str | os.PathLike, rank: int, threads: int = 4) -> None:
        if type(rank) is not int or rank < 0 or type(threads) is not int or threads < 1:
            raise ValueError(f"rank must be an int >= 0 and threads an int >= 1; got rank={rank!r}, threads={threads!r}.")
        directory = Path(directory).expanduser().absolute()
        _check_directory(directory)  # before anything is created or removed
        hostname = socket.gethostname()
        root = directory / ROOT
        root.mkdir(exist_ok=True)
        _clean_stale(root, hostname)
        self._path = root / f"{_host_label(hostname)}-{os.getpid()}-rank{rank}"
        with _OPEN_LOCK:
            if str(self._path) in _OPEN:
                raise ValueError(f"Another NvmeStore of this process uses {self._path} (rank {rank}); close it first.")
            _OPEN.add(str(self._path))
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="lightning_par_nvme")
        self._finalizer = weakref.finalize(self, _close, self._pool, self._path, root)
        self._pending: list[Future] = []
        self._lock = threading.Lock()
        self._serial = itertools.count()
        self._reserved = 0
        try:
            # Ours by name and not open here: left by a dead process whose pid this one got again.
            shutil.rmtree(self._path, ignore_errors=True)
            self._path.mkdir()
            owner = {"pid": os.getpid(), "hostname": hostname, "rank": rank, "started": time.time()}
            (self._path / OWNER).write_text(json.dumps(owner))
        except BaseException:
            self._finalizer()
            raise

    @property
    def path(self) -> Path:
        return self._path

    @property
    def reserved(self) -> int:
        return self._reserved

    def reserve(self, nbytes: int) -> None:
        """Refuse, before anything is written, ``nbytes`` more than the disk can hold beside what is reserved."""
        ours = sum(f.stat().st_size for f in self._path.iterdir() if f.is_file())  # already counted as used
        free = shutil.disk_usage(self._path).free
        if self._reserved + nbytes + MARGIN > free + ours:
            raise NvmeSpaceError(
                f"Spilling optimizer state to {self._path} needs {self._reserved + nbytes} bytes "
                f"({nbytes} more than the {self._reserved} reserved, plus a {MARGIN}-byte margin), but its filesystem "
                f"has {free} bytes free. Nothing was written. Use a larger disk, more ranks (each holds 1/N), or "
                "spill less (keep more chunks in host or device memory)."
            )
        self._reserved += nbytes

    def write(self, key: str, tensors: dict[str, torch.Tensor]) -> Future:
        return self._submit(key, tensors, self._write_one)

    def read(self, key: str, into: dict[str, torch.Tensor]) -> Future:
        return self._submit(key, into, self._read_one)

    def wait_all(self) -> None:
        """Wait for every operation submitted so far; re-raise the first error among them."""
        with self._lock:
            pending, self._pending = self._pending, []
        wait(pending)
        for f in pending:
            if f.exception() is not None:
                raise f.exception()

    def close(self) -> None:
        """Wait for pending operations, then remove this process's files (idempotent; also runs at exit)."""
        self._finalizer()

    def _file(self, key: str, name: str) -> Path:
        for part in (key, name):
            if not isinstance(part, str) or not _SAFE.fullmatch(part):
                raise ValueError(f"NvmeStore keys and tensor names use letters, digits, '_' and '-'; got {part!r}.")
        return self._path / f"{key}.{name}.bin"

    def _submit(self, key: str, tensors: dict[str, torch.Tensor], op: Callable[[Path, torch.Tensor], None]) -> Future:
        if not self._finalizer.alive:
            raise RuntimeError(f"NvmeStore at {self._path} is closed.")
        jobs = []
        for name, t in tensors.items():
            if t.device.type != "cpu" or not t.is_contiguous() or t.layout != torch.strided:
                raise ValueError(f"NvmeStore needs contiguous dense CPU tensors; {key}.{name} is {t.device}, "
                                 f"{t.layout}, contiguous={t.is_contiguous()}.")
            jobs.append((self._file(key, name), t))
        # The tasks hold the tensors, so they stay alive until their bytes are moved.
        out = _all([self._pool.submit(op, path, t) for path, t in jobs])
        with self._lock:
            self._pending = [f for f in self._pending if not f.done() or f.exception() is not None]
            self._pending.append(out)
        return out

    def _write_one(self, path: Path, t: torch.Tensor) -> None:
        tmp = path.with_name(f".{path.name}.{next(self._serial)}.tmp")
        try:
            with open(tmp, "wb", buffering=0) as f:
                _write_all(f, _view(t))
                _drop_cache(f.fileno(), written=True)
            os.replace(tmp, path)  # a reader sees the old file or the complete new one, never half of one
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NvmeSpaceError(
                    f"The disk under {self._path} filled up while writing {path.name} ({t.numel() * t.element_size()} "
                    f"bytes): {e}. The previous version of the file, if any, is unchanged. Use a larger disk, more "
                    "ranks, or spill less; other processes writing to the same disk count too."
                ) from e
            raise

    def _read_one(self, path: Path, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        try:
            f = open(path, "rb", buffering=0)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"NvmeStore has no file {path}: nothing was written under that key and "
                                    "name (or the write failed).") from e
        with f:
            size = os.fstat(f.fileno()).st_size
            if size != nbytes:
                raise ValueError(f"{path} holds {size} bytes, but the tensor to read it into needs {nbytes} "
                                 f"({t.numel()} x {t.dtype}): it was written with another size or dtype.")
            view, done = _view(t), 0
            while done < nbytes:
                n = f.readinto(view[done:])
                if not n:
                    raise ValueError(f"{path} ended after {done} of {nbytes} bytes while being read.")
                done += n
            _drop_cache(f.fileno(), written=False)


def _all(futures: list[Future]) -> Future:
    """One Future for several: done when all are, with the first error (in submission order) if any failed."""
    out: Future = Future()
    out.set_running_or_notify_cancel()
    remaining, lock = [len(futures)], threading.Lock()

    def one_done(_: Future | None) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0] > 0:
                return
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            out.set_exception(errors[0])
        else:
            out.set_result(None)

    for f in futures:
        f.add_done_callback(one_done)
    if not futures:
        one_done(None)
    return out
