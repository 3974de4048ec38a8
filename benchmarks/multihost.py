"""Global (2, 4) mesh vs host-local replicas on 2 processes x 4 CPU devices (gloo), per transport.

Runs `tests/multihost_worker.py bench` (the test's 12 requests, after `warmup()`, so nothing
compiles while measured) once per plan transport and prints tokens/s of the global mesh, of
the replicas and of one device alone, and the leader's per-plan costs (`send_ms`: posting the
plan; `ack_ms`: waiting for the follower's ack, which includes the follower finishing the
step). Run: `python benchmarks/multihost.py`. A correctness vehicle: 8 virtual devices on a
shared 2-core machine say nothing about a pod's speed; the figures are in the README.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multihost_worker.py"
TIMEOUT_S = 900


def port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run(transport: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    p = str(port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "bench", str(i), p, transport],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        for i in range(2)
    ]
    try:
        out, _ = procs[0].communicate(timeout=TIMEOUT_S)
        procs[1].wait(timeout=60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    for transport in ("broadcast", "kv"):
        r = run(transport)
        mesh, replica = r["mesh_plans"], r["replica_plans"]
        print(
            f"{transport}: tok/s mesh {r['mesh_tok_s']:.1f}, replicas {r['replicas_tok_s']:.1f}, "
            f"one device {r['one_tok_s']:.1f}; mesh plans {mesh['plans']}: send "
            f"{mesh['send_ms']:.2f} ms, ack {mesh['ack_ms']:.2f} ms; replica plans "
            f"{replica['plans']}: send {replica['send_ms']:.2f} ms, ack {replica['ack_ms']:.2f} "
            f"ms; same tokens: {r['mesh'] == r['one'] == r['replicas']}"
        )


if __name__ == "__main__":
    main()
