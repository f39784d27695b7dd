"""Memory as the process's container sees it: its cgroup's limit when one is set.

psutil reads the host's memory (``/proc/meminfo``). In a container or a
Kubernetes pod with a memory limit that is the wrong budget: the kernel's OOM
killer acts at the cgroup's limit, long before the host is full, so a worker
that waits for 90% of the host's memory (``MAAS_MEMORY_HIGH_WATER_PCT``) is
killed first. `read_memory` reads the cgroup (v2: ``memory.max``,
``memory.current``; v1: ``memory.limit_in_bytes``, ``memory.usage_in_bytes``)
and counts usage as the kubelet and ``docker stats`` do, less the inactive
page cache the kernel reclaims before it kills anything. Without a limit, or
one above the host's memory, the host's figures are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil

#: Where cgroup file systems are mounted.
CGROUP_ROOT = Path("/sys/fs/cgroup")
#: This process's cgroups.
PROC_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class Memory:
    """Memory available to this process: the container's (``scope`` "cgroup") or the
    host's ("host")."""

    total_bytes: int
    available_bytes: int
    used_percent: float
    scope: str


def read_memory(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> Memory:
    """This process's memory budget and use (see the module docstring)."""
    host = psutil.virtual_memory()
    cgroup = _cgroup(root, proc_cgroup)
    if cgroup is None or cgroup[0] >= host.total:
        return Memory(int(host.total), int(host.available), float(host.percent), "host")
    limit, used = cgroup
    return Memory(limit, max(0, limit - used), round(100.0 * used / limit, 1), "cgroup")


def _cgroup(root: Path, proc_cgroup: Path) -> tuple[int, int] | None:
    """(limit, working set) bytes of this process's memory cgroup; None without a limit."""
    v2, v1 = _paths(proc_cgroup)
    for base in _bases(root, v2):
        if (found := _v2(base)) is not None:
            return found
    for base in _bases(root / "memory", v1):
        if (found := _v1(base)) is not None:
            return found
    return None


def _bases(mount: Path, path: str | None) -> list[Path]:
    """Where to look: the process's own path under the mount (a host), then the mount's
    root (a container sees its own cgroup there, through a cgroup namespace)."""
    return [mount / path.lstrip("/"), mount] if path is not None else [mount]


def _paths(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """This process's cgroup v2 path and v1 memory controller path, if listed."""
    v2 = v1 = None
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "memory" in parts[1].split(","):
            v1 = parts[2]
    return v2, v1


def _v2(base: Path) -> tuple[int, int] | None:
    limit = _read(base / "memory.max")
    current = _read(base / "memory.current")
    if limit is None or current is None:
        return None
    return limit, max(0, current - _stat(base / "memory.stat", "inactive_file"))


def _v1(base: Path) -> tuple[int, int] | None:
    limit = _read(base / "memory.limit_in_bytes")
    usage = _read(base / "memory.usage_in_bytes")
    if limit is None or usage is None or limit >= 1 << 62:  # "no limit" is a huge number
        return None
    return limit, max(0, usage - _stat(base / "memory.stat", "total_inactive_file"))


def _read(path: Path) -> int | None:
    """An integer file's value; None if absent, unreadable or ``max`` (no limit)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat(path: Path, field: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == field and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0
