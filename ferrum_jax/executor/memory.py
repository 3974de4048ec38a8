"""How much device memory the executor may use: free memory per device, and sizes in MiB."""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax

FREE_FRACTION = 0.9
"""Share of the memory a device reports free that the executor plans to use (the rest is
headroom for allocator fragmentation and other processes)."""


def host_available_bytes() -> int | None:
    """Memory the host can still give this process: MemAvailable, capped by a cgroup v2 limit."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            left = int(limit) - used
            available = left if available is None else min(available, left)
    except (OSError, ValueError):
        pass
    return available


def free_device_bytes(devices: Sequence[jax.Device]) -> int | None:
    """Bytes free on the least free of `devices`; CPU devices share the host's memory.

    None when no device reports its memory (then no size is refused on memory grounds).
    Only this process's own (addressable) devices are asked.
    """
    free = []
    for device in devices:
        if device.platform == "cpu" or device.process_index != jax.process_index():
            continue
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    cpus = sum(d.platform == "cpu" and d.process_index == jax.process_index() for d in devices)
    host = host_available_bytes() if cpus else None
    if host is not None:
        free.append(host // cpus)
    return min(free) if free else None


def budget(devices: Sequence[jax.Device]) -> int | None:
    """The bytes per device the executor plans to use, or None when nothing reports memory."""
    free = free_device_bytes(devices)
    return None if free is None else int(FREE_FRACTION * free)


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
