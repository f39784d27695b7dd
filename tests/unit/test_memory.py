"""Memory as a container sees it (maas_worker/monitoring/memory.py), on cgroup trees
laid out as the kernel lays them out, v2 and v1, host and container views."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from maas_worker.monitoring.memory import read_memory

MIB = 1 << 20


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def proc_cgroup(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "proc-self-cgroup"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_v2_container_limit_counts_the_working_set(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    # Inside a container (cgroup namespace): its own cgroup at the mount's root.
    write(root / "memory.max", "536870912\n")
    write(root / "memory.current", f"{400 * MIB}\n")
    write(root / "memory.stat", f"anon {300 * MIB}\ninactive_file {144 * MIB}\nactive_file 0\n")
    mem = read_memory(root, proc_cgroup(tmp_path, "0::/"))
    assert (mem.scope, mem.total_bytes) == ("cgroup", 512 * MIB)
    assert mem.available_bytes == 256 * MIB  # 400 used less 144 reclaimable cache
    assert mem.used_percent == 50.0


def test_v2_host_view_follows_the_process_path(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "memory.max", "max\n")  # the root: no limit
    pod = root / "kubepods.slice" / "pod1" / "ctr"
    write(pod / "memory.max", f"{1024 * MIB}\n")
    write(pod / "memory.current", f"{256 * MIB}\n")
    mem = read_memory(root, proc_cgroup(tmp_path, "0::/kubepods.slice/pod1/ctr"))
    assert (mem.scope, mem.total_bytes, mem.used_percent) == ("cgroup", 1024 * MIB, 25.0)


def test_v1_limit(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    memory = root / "memory" / "docker" / "abc"
    write(memory / "memory.limit_in_bytes", f"{2048 * MIB}\n")
    write(memory / "memory.usage_in_bytes", f"{1100 * MIB}\n")
    write(memory / "memory.stat", f"cache 0\ntotal_inactive_file {76 * MIB}\n")
    mem = read_memory(root, proc_cgroup(tmp_path, "4:memory:/docker/abc", "1:cpu:/"))
    assert (mem.scope, mem.total_bytes, mem.used_percent) == ("cgroup", 2048 * MIB, 50.0)


@pytest.mark.parametrize(
    "files",
    [
        {},  # no cgroup file system at all
        {"memory.max": "max\n", "memory.current": "1000\n"},  # v2, no limit
        {
            "memory/memory.limit_in_bytes": "9223372036854771712\n",  # v1, no limit
            "memory/memory.usage_in_bytes": "1000\n",
        },
        {"memory.max": f"{1 << 62}\n", "memory.current": "1000\n"},  # above the host
        {"memory.max": "garbled\n", "memory.current": "1000\n"},
    ],
)
def test_without_a_limit_below_the_host_the_host_figures(
    tmp_path: Path, files: dict[str, str]
) -> None:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        write(root / name, text)
    mem = read_memory(root, proc_cgroup(tmp_path, "0::/"))
    assert mem.scope == "host"
    assert mem.total_bytes == psutil.virtual_memory().total


def test_this_process_reads_without_error() -> None:
    mem = read_memory()
    assert mem.scope in ("host", "cgroup")
    assert 0 < mem.total_bytes <= psutil.virtual_memory().total
    assert 0.0 <= mem.used_percent <= 100.0
