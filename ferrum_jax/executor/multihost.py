"""The leader/follower link of a multi-host executor (processes joined by `jax.distributed`).

Under `jax.distributed` every process must run the same jitted programs with the same inputs.
The engine talks to one `JaxModelExecutor`, on process 0 (the leader); it decides everything
on the host (pages, prefix cache, records) and, before each device program, sends the
program's host inputs as one small *plan* to the followers, which run the same program on
their devices (`ferrum_jax.serve_follower`). Followers decide nothing, so they never disagree.

A plan is a fixed header of int32 words then its int32 arrays (packed tokens, item
boundaries, KV lengths, page table, logits rows; page-copy lists): no Python objects cross
hosts. Two transports carry it:

- `"broadcast"`: `multihost_utils.broadcast_one_to_all` over every process's devices, in a
  fixed `FIRST_WORDS` buffer (a plan that does not fit spills into a second, power-of-two
  buffer), so only a few broadcast programs ever compile;
- `"kv"`: the bytes of the plan as a value in the `jax.distributed` coordination service's
  key-value store (what host-local replicas use: a plan goes to one follower only).

Either way the leader first posts a wake-up key, so an idle follower waits in the key-value
store, never inside a collective (whose transport may time out), and notices a dead leader.
After each plan every follower posts an ack (and, for a remote replica, the step's logits);
the leader collects the acks of plan n before sending plan n + 1, each within
`MultihostConfig.timeout_s`. A follower that died or stopped answering therefore fails the
leader's next call with a `FerrumError` in bounded time, and the link stays broken: the
processes may be out of step, so every later call fails fast with the same cause.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import time
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from ferrum_jax import engine
from ferrum_jax.errors import FerrumError

MAGIC = 0x46455252
"""First word of every plan ("FERR"): a follower reading anything else stops."""
MAX_ARRAYS = 5
HEADER_WORDS = 6 + 2 * MAX_ARRAYS
"""`[magic, op, serial, aux, n_arrays, (rows, cols) x MAX_ARRAYS, payload words]`."""
FIRST_WORDS = 4096
"""Words of the first broadcast buffer (16 KiB): decode steps and small chunks fit in it;
measured on gloo, a 4096-word broadcast costs the same as a 64-word one."""
_POLL_MS = 10_000
"""A follower's wait for the next plan, between checks that the leader is still there."""
TRANSPORTS = ("broadcast", "kv")


class Op(enum.IntEnum):
    """What a plan asks the followers to do."""

    HELLO = 1
    """Compare the executor's fingerprint (array 0) with the follower's own."""
    STEP = 2
    """A ragged step: tokens, cu_q_lens, kv_lens, page_table, logits_at."""
    COPY = 3
    """Copy pages src -> dst (copy-on-write of shared prefix pages)."""
    POOL = 4
    """Replace the page pool by a fresh one (a rebuild after a failed step)."""
    PARAMS = 5
    """Swap in params version `aux` (the follower's `params_for_version` provides them)."""
    SHUTDOWN = 6
    """Free everything and return from `serve_follower`."""


@dataclasses.dataclass(frozen=True)
class MultihostConfig:
    """How a multi-host executor's leader and followers talk."""

    timeout_s: float = 60.0
    """Longest the leader waits for a follower to join or to finish a plan before the call
    fails with a `FerrumError` (it must exceed the slowest step, compiles included)."""
    transport: str = "broadcast"
    """`"broadcast"` (a device collective) or `"kv"` (the coordination service) for plans of
    one global mesh; host-local replicas always use `"kv"`."""
    namespace: str = "ferrum"
    """Key prefix in the coordination service: one per executor sharing a job."""

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise FerrumError.config(
                f"multihost transport must be one of {TRANSPORTS}, got {self.transport!r}"
            )
        if isinstance(self.timeout_s, bool) or not self.timeout_s > 0:
            raise FerrumError.config(f"multihost timeout_s must be > 0, got {self.timeout_s!r}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """One decoded plan."""

    op: Op
    serial: int
    """Plans count up from 1 on each link."""
    aux: int
    """Op-specific scalar (the params version of `PARAMS`)."""
    arrays: tuple[np.ndarray, ...]
    """int32 arrays, 1-D or 2-D."""


def encode(op: Op, serial: int, aux: int, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """A plan as int32 words: header then every array's words in order."""
    if len(arrays) > MAX_ARRAYS:
        raise FerrumError.internal(f"a plan holds at most {MAX_ARRAYS} arrays, got {len(arrays)}")
    header = np.zeros((HEADER_WORDS,), np.int32)
    header[:5] = (MAGIC, op, serial, aux, len(arrays))
    for i, a in enumerate(arrays):
        if a.ndim not in (1, 2):
            raise FerrumError.internal(f"plan arrays are 1-D or 2-D, got shape {a.shape}")
        header[5 + 2 * i : 7 + 2 * i] = (a.shape[0], a.shape[1] if a.ndim == 2 else -1)
    payload = [np.asarray(a, np.int32).ravel() for a in arrays]
    header[-1] = sum(p.size for p in payload)
    return np.concatenate([header, *payload])


def decode(words: np.ndarray) -> Plan:
    if words.size < HEADER_WORDS or int(words[0]) != MAGIC:
        raise FerrumError.serialization(
            f"not a ferrum-jax plan (first word {int(words[0]) if words.size else None})"
        )
    op, serial, aux, n = (int(x) for x in words[1:5])
    arrays, offset = [], HEADER_WORDS
    for i in range(n):
        rows, cols = int(words[5 + 2 * i]), int(words[6 + 2 * i])
        size = rows * max(cols, 1)
        chunk = words[offset : offset + size]
        arrays.append(chunk.reshape(rows, cols) if cols >= 0 else chunk)
        offset += size
    return Plan(Op(op), serial, aux, tuple(arrays))


def plan_words(first: np.ndarray) -> int:
    """Total words of a plan whose first words are `first`."""
    return HEADER_WORDS + int(first[HEADER_WORDS - 1])


def _client():
    from jax._src.distributed import global_state

    if global_state.client is None:
        raise FerrumError.config(
            "a multi-host executor needs jax.distributed: call ferrum_jax.sharding.initialize "
            "on every process first"
        )
    return global_state.client


def _deadline_exceeded(error: Exception) -> bool:
    return "DEADLINE_EXCEEDED" in str(error)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """The sharding of a value every device of `mesh` holds whole (every process can read it)."""
    return NamedSharding(mesh, PartitionSpec())


@functools.cache
def ragged_forward_replicated(mesh: jax.sharding.Mesh):
    """`engine.ragged_forward` whose logits come out replicated on `mesh`, so the leader reads
    them from its own devices: a vocab-sharded result would span devices it cannot address."""
    sharding = replicated(mesh)

    def step(graphdef, params, pages, tokens, cu_q_lens, kv_lens, page_table, logits_at, impl):
        logits, hidden, pages = engine.ragged_forward(
            graphdef, params, pages, tokens, cu_q_lens, kv_lens, page_table, logits_at, impl
        )
        return jax.lax.with_sharding_constraint(logits, sharding), hidden, pages

    return jax.jit(step, static_argnums=(0, 8), donate_argnums=2)


class Leader:
    """The leader's end of a link to `followers` (process ids) on `channel`."""

    def __init__(
        self,
        config: MultihostConfig,
        followers: Sequence[int],
        channel: str,
        *,
        transport: str | None = None,
    ) -> None:
        self.config = config
        self.followers = list(followers)
        self.transport = transport or config.transport
        self._prefix = f"{config.namespace}/{channel}"
        self._client = _client()
        self._serial = 0
        self._acked = 0
        self._op = Op.HELLO
        self._lost: str | None = None
        self.stats = {"plans": 0, "send_s": 0.0, "ack_s": 0.0}
        """Plans sent, and seconds spent sending them and waiting for acks."""

    @property
    def lost(self) -> str | None:
        """Why the link is broken (None while it works)."""
        return self._lost

    def fail(self, reason: str) -> None:
        """Marks the link broken: the processes may be out of step for good."""
        if self._lost is None:
            self._lost = reason

    def _check(self) -> None:
        if self._lost is not None:
            raise FerrumError.backend(
                f"the multi-host executor lost its followers ({self._lost}); restart the job"
            )

    def send(self, op: Op, arrays: Sequence[np.ndarray] = (), aux: int = 0) -> int:
        """Sends a plan after the previous one was acked by every follower; its serial."""
        self._check()
        self.collect()
        start = time.perf_counter()
        self._serial += 1
        self._op = op
        words = encode(op, self._serial, aux, arrays)
        key = f"{self._prefix}/plan/{self._serial}"
        try:
            if self.transport == "kv":
                self._client.key_value_set_bytes(key, words.tobytes())
            else:
                self._client.key_value_set_bytes(key, b"")
                first = np.zeros((FIRST_WORDS,), np.int32)
                first[: min(words.size, FIRST_WORDS)] = words[:FIRST_WORDS]
                multihost_utils.broadcast_one_to_all(first)
                if words.size > FIRST_WORDS:
                    spill = np.zeros((engine.bucket(words.size - FIRST_WORDS),), np.int32)
                    spill[: words.size - FIRST_WORDS] = words[FIRST_WORDS:]
                    multihost_utils.broadcast_one_to_all(spill)
        except Exception as e:
            self.fail(f"sending plan {self._serial} ({op.name}) failed: {e}")
            raise FerrumError.device(
                f"sending plan {self._serial} ({op.name}) to the followers failed: {e}; "
                "restart the job"
            ) from e
        self.stats["plans"] += 1
        self.stats["send_s"] += time.perf_counter() - start
        return self._serial

    def collect(self) -> list[bytes]:
        """Waits (at most `timeout_s` in all) for every follower's ack of the last plan; their
        replies, in follower order ([] when already collected)."""
        if self._acked == self._serial:
            return []
        self._check()
        start = time.perf_counter()
        deadline = time.monotonic() + self.config.timeout_s
        serial, replies = self._serial, []
        for pid in self.followers:
            key = f"{self._prefix}/ack/{serial}/{pid}"
            left_ms = max(int((deadline - time.monotonic()) * 1000), 1)
            try:
                value = self._client.blocking_key_value_get_bytes(key, left_ms)
            except Exception as e:
                what = "did not answer" if _deadline_exceeded(e) else f"is unreachable ({e})"
                reason = (
                    f"follower process {pid} {what} within {self.config.timeout_s:g} s of plan "
                    f"{serial} ({self._op.name}): it died or stopped answering"
                )
                self.fail(reason)
                raise FerrumError.timeout(f"{reason}; restart the job") from e
            self._client.key_value_delete(key)
            if value[:1] != b"+":
                reason = f"follower process {pid} failed plan {serial} ({self._op.name}): " + (
                    value[1:].decode(errors="replace")
                )
                self.fail(reason)
                raise FerrumError.device(reason)
            replies.append(value[1:])
        self._client.key_value_delete(f"{self._prefix}/plan/{serial}")
        self._acked = serial
        self.stats["ack_s"] += time.perf_counter() - start
        return replies

    def close(self) -> None:
        """Stops every follower (waits for their acks); a broken link has none to stop."""
        if self._lost is None:
            self.send(Op.SHUTDOWN)
            self.collect()
        self._lost = self._lost or "the executor was shut down"


class FollowerLink:
    """A follower's end of a link on `channel`."""

    def __init__(
        self, config: MultihostConfig, channel: str, *, transport: str | None = None
    ) -> None:
        self.config = config
        self.transport = transport or config.transport
        self._prefix = f"{config.namespace}/{channel}"
        self._client = _client()
        self._pid = jax.process_index()
        self._serial = 0

    def receive(self) -> Plan:
        """The next plan; waits as long as the leader is there."""
        self._serial += 1
        key = f"{self._prefix}/plan/{self._serial}"
        while True:
            try:
                value = self._client.blocking_key_value_get_bytes(key, _POLL_MS)
                break
            except Exception as e:
                if not _deadline_exceeded(e):
                    raise FerrumError.backend(f"lost the leader waiting for a plan: {e}") from e
        if self.transport == "kv":
            words = np.frombuffer(value, np.int32)
        else:
            first = multihost_utils.broadcast_one_to_all(np.zeros((FIRST_WORDS,), np.int32))
            words = np.asarray(first, np.int32)
            total = plan_words(words)
            if total > FIRST_WORDS:
                spill = np.zeros((engine.bucket(total - FIRST_WORDS),), np.int32)
                words = np.concatenate([words, multihost_utils.broadcast_one_to_all(spill)])
            words = words[:total]
        plan = decode(words)
        if plan.serial != self._serial:
            raise FerrumError.serialization(
                f"expected plan {self._serial}, the leader sent {plan.serial}"
            )
        return plan

    def ack(self, serial: int, reply: bytes = b"") -> None:
        self._client.key_value_set_bytes(f"{self._prefix}/ack/{serial}/{self._pid}", b"+" + reply)

    def refuse(self, serial: int, reason: str) -> None:
        """Tells the leader this follower failed plan `serial` (then it stops)."""
        key = f"{self._prefix}/ack/{serial}/{self._pid}"
        self._client.key_value_set_bytes(key, b"!" + reason.encode())
