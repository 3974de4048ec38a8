"""The executor across processes: 2 processes x 4 CPU devices (gloo), `tests/multihost_worker.py`.

- one global (2, 4) mesh, the engine-loop replica driving the leader: 12 mixed requests
  (chunked prefill, prefix caching) give the same tokens as one process on one device;
- host-local replicas (one per process) give the same tokens as the global mesh;
- killing the follower mid-run fails the leader's call with a `FerrumError` within the
  follower timeout, and the leader exits cleanly.

One job serves all three (each mode compiles its programs once): bounded by a timeout, its
processes run in their own sessions and are killed (the whole group) whatever happens.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import multihost_worker as worker
from test_sharding import _env, _free_port, _kill

from ferrum_jax.errors import FerrumError
from ferrum_jax.executor import multihost

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multihost_worker.py"
JOB_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    """One 2-process job for the three tests: its `RESULT` (tokens of every mode) and its
    `KILLED` (the leader's failure after the follower was killed mid-run) lines."""
    port = _free_port()
    # The follower's output goes to a file: an undrained pipe would fill and block it.
    follower_log = tmp_path_factory.mktemp("multihost") / "follower.log"
    with open(follower_log, "w") as log:
        procs = [
            subprocess.Popen(
                [sys.executable, str(WORKER), "test", str(i), str(port)],
                cwd=ROOT,
                env=_env(),
                stdout=subprocess.PIPE if i == 0 else log,
                stderr=subprocess.PIPE if i == 0 else subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            for i in range(2)
        ]
    leader, follower = procs
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in leader.stdout], daemon=True).start()
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(leader.stderr), daemon=True).start()
    out: dict = {}
    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        while "SERVING" not in out:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                tail = "".join(stderr)[-3000:] + follower_log.read_text()[-3000:]
                pytest.fail(f"the leader was not serving within {JOB_TIMEOUT_S} s:\n{tail}")
            word, _, rest = line.partition(" ")
            out[word.strip()] = rest
        time.sleep(1.0)  # mid-run: steps are flowing
        os.killpg(follower.pid, signal.SIGKILL)
        out["killed_at"] = time.time()
        try:
            leader.wait(timeout=worker.TIMEOUT_S + 60)
        except subprocess.TimeoutExpired:
            pytest.fail("the leader hung after its follower died")
        time.sleep(0.2)  # the reader threads drain the pipes
        while not lines.empty():
            word, _, rest = lines.get().partition(" ")
            out[word.strip()] = rest
    finally:
        for proc in procs:
            _kill(proc)
    out["returncode"] = leader.returncode
    out["stderr"] = "".join(stderr)[-5000:]
    return out


@pytest.fixture(scope="module")
def result(job) -> dict:
    assert "RESULT" in job, job["stderr"]
    return json.loads(job["RESULT"])


def test_global_mesh_matches_one_process(result):
    assert (result["processes"], result["devices"]) == (2, 8)
    assert len(result["mesh"]) == worker.REQUESTS
    assert result["mesh"] == result["one"]
    cache = result["mesh_cache"]
    assert cache["prefill_tokens_reused"] > 0 and cache["hits"] > 0  # prefix caching ran
    assert result["mesh_plans"]["plans"] > worker.REQUESTS  # one plan per step, at least


def test_host_local_replicas_match_global_mesh(result):
    assert result["replicas"] == result["mesh"]
    assert all(c["steps"] > 0 for c in result["replica_cache"])  # both replicas served


def test_killed_follower_fails_the_leader_within_the_timeout(job):
    assert "KILLED" in job, job["stderr"]
    assert job["returncode"] == 0, job["stderr"]  # the leader shut down and exited cleanly
    killed = json.loads(job["KILLED"])
    assert "raised_at" in killed, killed
    assert killed["raised_at"] - job["killed_at"] <= worker.TIMEOUT_S + 2.0, killed
    assert killed["kind"] in ("DEVICE", "TIMEOUT", "BACKEND"), killed
    assert "restart the job" in killed["message"], killed
    assert killed["again_s"] < 1.0 and "lost its followers" in killed["again"], killed


# ---------------------------------------------------------------------------------------------
# In-process: the wire format and the config.


def test_plan_round_trip():
    arrays = (
        np.arange(8, dtype=np.int32),
        np.asarray([0, 3, 8], np.int32),
        np.full((2, 5), 7, np.int32),
    )
    words = multihost.encode(multihost.Op.STEP, 41, 3, arrays)
    assert words.dtype == np.int32 and words.size == multihost.plan_words(words)
    plan = multihost.decode(words)
    assert (plan.op, plan.serial, plan.aux) == (multihost.Op.STEP, 41, 3)
    for a, b in zip(plan.arrays, arrays, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FerrumError, match="not a ferrum-jax plan"):
        multihost.decode(np.zeros((multihost.HEADER_WORDS,), np.int32))


def test_multihost_config_is_checked():
    with pytest.raises(FerrumError, match="transport"):
        multihost.MultihostConfig(transport="pickle")
    with pytest.raises(FerrumError, match="timeout_s"):
        multihost.MultihostConfig(timeout_s=0)


def test_multihost_needs_a_multi_process_mesh():
    from ferrum_jax.executor import JaxModelExecutor

    with pytest.raises(FerrumError, match="mesh over the devices of every process") as e:
        JaxModelExecutor(worker.model(), multihost=multihost.MultihostConfig())
    assert e.value.kind.name == "CONFIG"
