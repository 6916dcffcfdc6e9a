"""The file store behind ``zero3_nvme``: round trips, concurrency, the directory checks, the cleaning of crashed runs'
files (and of nothing else), free-space checks and a disk that fills up mid-write. Single process, no GPU."""

from __future__ import annotations

import errno
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

from lightning_par.zero import nvme
from lightning_par.zero.nvme import NvmeDirectoryError, NvmeSpaceError, NvmeStore


@pytest.fixture
def store(tmp_path):
    s = NvmeStore(tmp_path, rank=0)
    yield s
    s.close()


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"exp_avg": torch.randn(1001, generator=g), "exp_avg_sq": torch.rand(7, generator=g),
            "half": torch.randn(333, generator=g).to(torch.bfloat16)}


def _fresh(like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, float("nan")) for k, v in like.items()}


def test_round_trip_and_overwrite(store, tmp_path):
    a, b = _tensors(0), _tensors(1)
    store.write("chunk0", a).result()
    store.write("chunk1", b).result()
    assert store.path.parent == tmp_path / "lightning_par_nvme"
    assert store.path.name == f"{socket.gethostname()}-{os.getpid()}-rank0"
    assert (store.path / "chunk0.exp_avg.bin").stat().st_size == 1001 * 4
    for key, want in (("chunk0", a), ("chunk1", b)):
        got = _fresh(want)
        store.read(key, got).result()
        assert all(torch.equal(got[k], want[k]) for k in want)
    store.write("chunk0", b).result()  # overwrite with other values, same sizes
    got = _fresh(b)
    store.read("chunk0", got).result()
    assert all(torch.equal(got[k], b[k]) for k in b)
    assert not [p for p in store.path.iterdir() if p.name.endswith(".tmp")]


def test_read_errors(store):
    store.write("chunk0", {"exp_avg": torch.ones(10)}).result()
    with pytest.raises(ValueError, match=r"holds 40 bytes.*needs 44"):
        store.read("chunk0", {"exp_avg": torch.empty(11)}).result()
    with pytest.raises(ValueError, match=r"holds 40 bytes.*needs 20"):
        store.read("chunk0", {"exp_avg": torch.empty(10, dtype=torch.bfloat16)}).result()
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        store.read("chunk9", {"exp_avg": torch.empty(10)}).result()
    with pytest.raises(ValueError, match="holds 40 bytes"):  # wait_all re-raises the first error of its futures
        store.wait_all()
    store.wait_all()  # and reports it once
    for bad in ("../x", "a.b", "", "chunk 1"):
        with pytest.raises(ValueError, match="letters, digits"):
            store.write(bad, {"exp_avg": torch.ones(1)})
    with pytest.raises(ValueError, match="contiguous"):
        store.write("chunk0", {"exp_avg": torch.ones(4, 4).t()})


def test_many_concurrent_writes_and_reads(tmp_path):
    store = NvmeStore(tmp_path, rank=3, threads=4)
    want = {f"chunk{i}": {"a": torch.randn(1000 + 37 * i), "b": torch.randn(5 + i).bfloat16()} for i in range(40)}
    futures = [store.write(key, ts) for key, ts in want.items()]
    store.wait_all()
    assert all(f.done() and f.exception() is None for f in futures)
    got = {key: _fresh(ts) for key, ts in want.items()}
    futures = [store.read(key, got[key]) for key in want]
    store.wait_all()
    for key in want:
        assert all(torch.equal(got[key][k], want[key][k]) for k in want[key])
    store.write("empty", {"a": torch.empty(0)}).result()  # zero bytes are a valid tensor too
    store.read("empty", {"a": torch.empty(0)}).result()
    store.close()


def test_directory_errors(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(NvmeDirectoryError, match=f"{a_file} exists but is not a directory.*nvme_dir="):
        NvmeStore(a_file, rank=0)
    with pytest.raises(NvmeDirectoryError, match="cannot be created"):
        NvmeStore(a_file / "sub", rank=0)
    deep = tmp_path / "new" / "deeper"
    store = NvmeStore(deep, rank=0)  # created
    assert store.path.is_dir() and store.path.parent.parent == deep
    store.close()
    assert isinstance(NvmeDirectoryError("x"), ValueError)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(NvmeDirectoryError, match=f"{ro} is not writable"):
            NvmeStore(ro, rank=0)
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_unwritable_directory_even_as_root(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(nvme.tempfile, "mkstemp", refuse)  # the probe file cannot be created
    with pytest.raises(NvmeDirectoryError, match=f"{tmp_path} is not writable.*Permission denied.*nvme_dir="):
        NvmeStore(tmp_path, rank=0)
    assert list(tmp_path.iterdir()) == []  # checked before anything was created


def _leftover(root, name: str, pid: int, hostname: str):
    d = root / name
    d.mkdir(parents=True)
    (d / "owner.json").write_text(json.dumps({"pid": pid, "hostname": hostname, "rank": 0, "started": 0.0}))
    (d / "chunk0.exp_avg.bin").write_bytes(b"\0" * 64)
    return d


def test_stale_cleanup_removes_only_dead_processes_of_this_host(tmp_path):
    host = socket.gethostname()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = proc.pid
    live = os.getppid()
    root = tmp_path / "lightning_par_nvme"
    stale = _leftover(root, f"{host}-{dead}-rank0", dead, host)
    alive = _leftover(root, f"{host}-{live}-rank0", live, host)
    other_host = _leftover(root, f"elsewhere-{dead}-rank0", dead, "elsewhere")
    no_owner = root / "something"
    no_owner.mkdir()
    outside = tmp_path / "outside"  # a dead run's directory, but reached only through a symlink
    _leftover(tmp_path, "outside", dead, host)
    (root / f"{host}-{dead}-rank1").symlink_to(outside, target_is_directory=True)
    (tmp_path / "user_file").write_text("keep")

    store = NvmeStore(tmp_path, rank=0)
    assert not stale.exists()
    assert alive.exists() and other_host.exists() and no_owner.exists()
    assert (root / f"{host}-{dead}-rank1").is_symlink() and (outside / "chunk0.exp_avg.bin").exists()
    assert (tmp_path / "user_file").read_text() == "keep"
    store.close()
    assert root.exists()  # other processes' directories keep it


def test_second_store_of_same_rank_is_refused(tmp_path):
    first = NvmeStore(tmp_path, rank=0)
    first.write("chunk0", {"a": torch.ones(3)}).result()
    with pytest.raises(ValueError, match="close it first"):
        NvmeStore(tmp_path, rank=0)
    assert (first.path / "chunk0.a.bin").exists()
    second = NvmeStore(tmp_path, rank=1)
    first.close()
    second.close()


def test_reserve(store):
    free = shutil.disk_usage(store.path).free
    with pytest.raises(NvmeSpaceError, match=rf"needs {free + 1} bytes.*has \d+ bytes free.*larger disk, more ranks"):
        store.reserve(free + 1)
    assert store.reserved == 0
    store.reserve(1000)
    store.reserve(1000)
    assert store.reserved == 2000
    # Each alone fits (with room to spare for other writers of this disk); together they do not.
    store.reserve(free // 2)
    with pytest.raises(NvmeSpaceError, match=rf"needs {2000 + free // 2 + free * 3 // 4} bytes"):
        store.reserve(free * 3 // 4)


def test_disk_full_during_write(store, monkeypatch):
    old = {"exp_avg": torch.arange(1000, dtype=torch.float32)}
    store.write("chunk0", old).result()

    def fill_up(f, view):
        f.write(view[: len(view) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nvme, "_write_all", fill_up)
    with pytest.raises(NvmeSpaceError, match="filled up while writing chunk1.exp_avg.bin"):
        store.write("chunk1", {"exp_avg": torch.ones(1000)}).result()
    with pytest.raises(NvmeSpaceError):
        store.write("chunk0", {"exp_avg": torch.ones(1000)}).result()
    assert not (store.path / "chunk1.exp_avg.bin").exists()
    assert not [p for p in store.path.iterdir() if p.name.endswith(".tmp")]
    got = {"exp_avg": torch.empty(1000)}
    store.read("chunk0", got).result()  # the previous complete version, untouched
    assert torch.equal(got["exp_avg"], old["exp_avg"])
    with pytest.raises(NvmeSpaceError):
        store.wait_all()


def test_close(tmp_path):
    store = NvmeStore(tmp_path, rank=0)
    store.write("chunk0", {"a": torch.ones(100)})
    path = store.path
    store.close()
    assert not path.exists() and not (tmp_path / "lightning_par_nvme").exists()
    store.close()  # no-op
    with pytest.raises(RuntimeError, match="closed"):
        store.write("chunk0", {"a": torch.ones(1)})
    assert list(tmp_path.iterdir()) == []

    dropped = NvmeStore(tmp_path, rank=0)  # a store that is garbage collected cleans up too
    path = dropped.path
    del dropped
    gc.collect()
    assert not path.exists()


def test_spilled_step_bounds_the_writes_in_flight(store, monkeypatch):
    """A slow disk: the first step, which reads nothing, must not queue every chunk's new state behind it (host
    memory would hold all of it); a chunk steps once all but WRITES_IN_FLIGHT earlier writes are done. The state
    written is the optimizer's own, as stepping in memory gives it."""
    from types import SimpleNamespace

    from lightning_par.zero.spill import WRITES_IN_FLIGHT, SpilledState

    write_one = store._write_one

    def slow_write(path, t):
        time.sleep(0.05)
        write_one(path, t)

    monkeypatch.setattr(store, "_write_one", slow_write)
    unfinished_at_submit = []
    writes: list = []
    write = store.write

    def counting_write(key, tensors):
        unfinished_at_submit.append(sum(not f.done() for f in writes))
        writes.append(write(key, tensors))
        return writes[-1]

    monkeypatch.setattr(store, "write", counting_write)
    n = 8
    params = [torch.nn.Parameter(torch.full((100,), float(i))) for i in range(n)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    chunks = [SimpleNamespace(index=i, nvme=True, shard_numel=100,
                              pieces=[(SimpleNamespace(shard_offset=0, numel=100), p)]) for i, p in enumerate(params)]
    spilled, opt, ref = SpilledState(store), torch.optim.Adam(params, lr=0.1), torch.optim.Adam(twins, lr=0.1)
    for step in range(2):
        for p, q in zip(params, twins):
            p.grad = torch.full_like(p, step + 1.0)
            q.grad = p.grad.clone()
        spilled.step(opt, 0, chunks, opt.step, lambda chunk, pieces: {})
        ref.step()
    assert len(unfinished_at_submit) == 2 * n
    assert max(unfinished_at_submit) <= WRITES_IN_FLIGHT, unfinished_at_submit
    store.wait_all()
    for i, (p, q) in enumerate(zip(params, twins)):
        assert torch.equal(p, q)
        got = {"exp_avg": torch.empty(100), "exp_avg_sq": torch.empty(100)}
        store.read(SpilledState.key(0, i), got).result()
        assert torch.equal(got["exp_avg"], ref.state[q]["exp_avg"])
        assert torch.equal(got["exp_avg_sq"], ref.state[q]["exp_avg_sq"])
