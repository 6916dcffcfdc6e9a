"""Two torchrun agents on one machine standing in for two nodes: ``--nnodes 2``, rendezvous on localhost, half of
the GPUs each (or gloo CPU ranks with ``--cpu``). Runs the given script on 2 × ``--nproc`` ranks; Lightning sees
torchrun's environment (TorchElasticEnvironment) and launches nothing itself, as on a real cluster.

    python benchmarks/two_nodes.py --nproc 2 -- benchmarks/multi_gpu.py parity --reference REF --out OUT
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nproc", type=int, default=2, help="processes per node")
    parser.add_argument("--cpu", action="store_true", help="no GPUs: do not set CUDA_VISIBLE_DEVICES")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- script and its arguments")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agents = []
    for node in range(2):
        env = dict(os.environ)
        if not args.cpu:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(node * args.nproc + i) for i in range(args.nproc))
        agents.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
             "--nproc-per-node", str(args.nproc), "--master-addr", "127.0.0.1", "--master-port", str(port),
             *command], env=env))
    codes = [agent.wait() for agent in agents]
    print(f"two_nodes: agents exited with {codes}", flush=True)
    sys.exit(max(abs(c) for c in codes))


if __name__ == "__main__":
    main()
