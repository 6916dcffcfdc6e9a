"""Several machines through Lightning's cluster environments, with no launcher of ours: two torchrun agents
(``--nnodes 2``, 2 gloo ranks each, rendezvous on localhost) stand in for two nodes, and the strategies whose groups
cross the nodes (data axes of ``dp`` and ``zero3``, ``tp1d`` as tensor 2 x data 2, 1F1B as pipeline 2 x data 2)
match one process step by step. ``benchmarks/gpu_suite.sh two_nodes`` runs the same on 4 GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["--layers", "4", "--width", "32", "--heads", "4", "--seq", "16", "--vocab", "64", "--steps", "3"]
STRATEGIES = "dp,zero3,tp1d_2way,pipeline_1f1b_2stages"


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_two_torchrun_nodes_match_one_process(tmp_path):
    reference, out = tmp_path / "reference.json", tmp_path / "parity.json"
    made = _run(["benchmarks/multi_gpu.py", "reference", "--accelerator", "cpu", "--out", str(reference), *TINY])
    assert made.returncode == 0, made.stderr[-3000:]
    ran = _run(["benchmarks/two_nodes.py", "--nproc", "2", "--cpu", "--", "benchmarks/multi_gpu.py", "parity",
                "--accelerator", "cpu", "--reference", str(reference), "--out", str(out), "--only", STRATEGIES])
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert "agents exited with [0, 0]" in ran.stdout
    rows = {row["strategy"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"ddp", *STRATEGIES.split(",")}
    for name, row in rows.items():
        assert row["world"] == 4 and row["status"] == "PASS", (name, row)
    assert rows["tp1d_2way"]["data_parallel"] == 2 and rows["zero3"]["data_parallel"] == 4
