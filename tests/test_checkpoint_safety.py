"""Checkpoints are safe to open and safe to write: a pickle payload planted in a checkpoint is refused before it runs
(unless the caller passes ``weights_only=False``), and a save killed mid-write leaves the previous checkpoint
loadable. See [Note: safe loading] and [Note: atomic writes] in ``lightning_par/checkpoint.py``."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_par  # noqa: F401
from lightning_par import checkpoint
from lightning_par.checkpoint import META_FILE, HeldTensor, Holdings, load_full, model_pieces
from lightning_par.pieces import Holding


class Payload:
    """Unpickling this creates ``marker``: proof that the checkpoint ran code when it was opened."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _linear(value: float) -> torch.nn.Linear:
    layer = torch.nn.Linear(4, 3)
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(value)
    return layer


def _save(path, value: float, extra=None) -> None:
    """A sharded checkpoint of one process: each parameter whole, as one box."""
    layer = _linear(value)
    named = list(layer.named_parameters())
    holdings = Holdings([HeldTensor(Holding(n, tuple(p.shape)), p.detach()) for n, p in named], [n for n, _ in named])
    ckpt = {"state_dict": model_pieces(holdings), "optimizer_states": [], "epoch": 0, "global_step": int(value),
            **(extra or {})}
    checkpoint.save(ckpt, path, holdings=holdings, is_global_zero=True, barrier=lambda: None)


def test_a_planted_payload_is_refused_before_it_runs(tmp_path):
    path = tmp_path / "ckpt"
    _save(path, 2.0)
    assert load_full(path)["state_dict"]["weight"].eq(2.0).all()  # the untouched checkpoint reads back

    # In meta.pt (Lightning's metadata): refused, nothing ran; read only when the caller says it trusts the file.
    marker = tmp_path / "ran_meta"
    meta = torch.load(path / META_FILE, weights_only=True)
    torch.save({**meta, "hyper_parameters": {"x": Payload(marker)}}, path / META_FILE)
    with pytest.raises(pickle.UnpicklingError, match=r"(?s)Refused to load .*meta\.pt.*weights_only=False"):
        load_full(path)
    with pytest.raises(pickle.UnpicklingError, match="Refused"):
        checkpoint.load_any(path)
    assert not marker.exists()
    assert load_full(path, weights_only=False)["global_step"] == 2
    assert marker.exists()  # the payload was real: it runs when loading is told to trust the file

    # In DCP's own .metadata, which torch unpickles without restriction: refused by our reader, nothing ran.
    marker = tmp_path / "ran_dcp"
    _save(path, 3.0)
    with open(path / ".metadata", "wb") as f:
        pickle.dump(Payload(marker), f)
    with pytest.raises(pickle.UnpicklingError, match=r"(?s)Refused to load .*\.metadata.*open is not allowed"):
        load_full(path)
    assert not marker.exists()


def test_save_warns_when_its_metadata_would_be_refused(tmp_path):
    with pytest.warns(UserWarning, match="load only with weights_only=False"):
        _save(tmp_path / "ckpt", 1.0, extra={"hyper_parameters": {"x": Payload(tmp_path / "never")}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _save(tmp_path / "plain", 1.0, extra={"hyper_parameters": {"lr": 0.1, "betas": (0.9, 0.99)}})
    assert not [w for w in caught if "weights_only" in str(w.message)]


def test_resume_refuses_a_payload_unless_told_otherwise(tmp_path):
    """Through Lightning: resuming a ZeRO run opens the checkpoint with ``weights_only=True`` unless the strategy is
    told otherwise (Lightning 2.6 drops ``Trainer.fit(..., weights_only=False)`` for strategies that restore after
    setup, so the strategy takes it as an argument)."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lightning_par import ZeroStrategy

    def trainer(steps, **strategy_kwargs):
        return Trainer(strategy=ZeroStrategy(stage=2, **strategy_kwargs), accelerator="cpu", devices=1,
                       max_steps=steps, logger=False,
                       enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                       callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=2)])

    environ = dict(os.environ)
    try:
        trainer(2).fit(BoringModel())
        (saved,) = list((tmp_path / "ckpts").iterdir())
        meta = torch.load(saved / META_FILE, weights_only=True)
        marker = tmp_path / "ran"
        torch.save({**meta, "hyper_parameters": {"x": Payload(marker)}}, saved / META_FILE)
        with pytest.raises(pickle.UnpicklingError, match="Refused"):
            trainer(4).fit(BoringModel(), ckpt_path=saved)
        assert not marker.exists()
        resumed = trainer(4, weights_only=False)
        resumed.fit(BoringModel(), ckpt_path=saved)
        assert marker.exists() and resumed.global_step == 4
    finally:  # Lightning leaves its one-process group and environment behind: later tests expect neither
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)


KILLED_SAVE = """
import os, signal, sys, torch
sys.path.insert(0, sys.argv[4])
from test_checkpoint_safety import _save
path, value, kill_at = sys.argv[1], float(sys.argv[2]), sys.argv[3]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if kill_at == "between_moves":  # the previous checkpoint has moved aside, the new one is not in place yet
    real_replace = os.replace
    def replace(src, dst):
        real_replace(src, dst)
        if str(src) == path:
            die()
    os.replace = replace
elif kill_at == "before_meta":  # every shard written, the metadata not yet
    torch.save = lambda *args, **kwargs: die()
_save(path, value)
"""


def _killed_save(path, value: float, kill_at: str) -> int:
    tests_dir = str(__import__("pathlib").Path(__file__).parent)
    return subprocess.run([sys.executable, "-c", KILLED_SAVE, str(path), str(value), kill_at, tests_dir],
                          timeout=120).returncode


def test_a_save_killed_mid_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "ckpt"
    assert _killed_save(path, 1.0, "never") == 0

    assert _killed_save(path, 2.0, "between_moves") == -signal.SIGKILL
    assert not path.exists()  # the worst moment: only the previous checkpoint, moved aside, is on disk
    assert load_full(path)["state_dict"]["weight"].eq(1.0).all()

    assert _killed_save(path, 3.0, "before_meta") == -signal.SIGKILL
    assert path.exists()  # this save first put the previous checkpoint back
    assert load_full(path)["state_dict"]["weight"].eq(1.0).all()

    assert _killed_save(path, 4.0, "never") == 0
    assert load_full(path)["state_dict"]["weight"].eq(4.0).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no debris of the killed saves
