"""Does the engine's per-stream state fit? Checked before the slots are allocated.

Every slot's state is preallocated at engine creation: an audio ring on the host, and encoder caches,
decoder and VAD state on the model's device. Too many slots for the memory would otherwise end in an
allocator traceback naming no setting (CUDA), a MemoryError for one array (CPU), or, on Linux with
overcommit, the kernel's OOM killer some time after start. Here it is a CapacityError that says how much
the configuration needs, how much there is, and which settings to lower.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import CapacityError

GiB = float(2**30)


@dataclass(frozen=True)
class SlotBytes:
    """Memory one stream slot holds for the engine's lifetime."""

    device: int  # encoder caches, decoder state, VAD state, on the model's device
    host: int  # audio ring (sized by EngineConfig.max_buffered_seconds) in host memory

    def total(self) -> int:
        return self.device + self.host


def available_host_memory(
    meminfo: Path = Path("/proc/meminfo"),
    cgroup: Path = Path("/sys/fs/cgroup"),
    self_cgroup: Path = Path("/proc/self/cgroup"),
) -> int | None:
    """Bytes the process can still allocate on the host: the kernel's MemAvailable, lowered to what the
    memory limits of the process's cgroup and of every cgroup above it leave (a container's, a systemd
    unit's `MemoryMax`, a slice's), cgroup v2 or v1. None where nothing can be read (not Linux).

    `cgroup` is where the hierarchies are mounted; `self_cgroup` names the process's cgroups in them.
    A cgroup's usage counts its page cache, which the kernel reclaims as needed (MemAvailable counts it
    as available): its inactive part is left out of the usage, as docker and the kubelet do."""
    available = None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024  # the file counts kB
                break
    except (OSError, ValueError, IndexError):
        pass
    for left in _cgroup_room(cgroup, self_cgroup):
        available = left if available is None else min(available, left)
    return available


# Memory files of a cgroup: (limit, usage, the usage's reclaimable page cache in memory.stat, "no limit").
_V2_FILES = ("memory.max", "memory.current", "inactive_file", "max")
_V1_FILES = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file", None)


def _cgroup_room(root: Path, self_cgroup: Path) -> list[int]:
    """Bytes left under each memory limit on the process's cgroup path, innermost first.

    /proc/self/cgroup names the process's cgroup: "0::/path" in the unified (v2) hierarchy, "N:...memory...:/path"
    where the memory controller is a v1 hierarchy (mounted at root/memory; it then holds the limits).
    Limits can sit on any ancestor (a unit's slice), so every level that exists is read. Inside a
    container the path may be the host's while the mount shows only the container's own cgroup: the
    levels not found are skipped, and the mount's root is always read."""
    v2 = v1 = None
    try:
        for line in self_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                v2 = path
            elif "memory" in controllers.split(","):
                v1 = path
    except (OSError, ValueError):
        pass
    if v1 is not None and (root / "memory").is_dir():
        base, path, files = root / "memory", v1, _V1_FILES
    else:
        base, path, files = root, v2 or "/", _V2_FILES
    parts = [part for part in path.split("/") if part and part not in (".", "..")]
    levels = [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]  # innermost first
    room = []
    for level in levels:
        left = _room(level, *files)
        if left is not None:
            room.append(left)
    return room


def _room(level: Path, limit_file: str, usage_file: str, cache_key: str, unlimited: str | None) -> int | None:
    """What one cgroup's limit leaves (None: no limit, or not readable)."""
    try:
        limit = (level / limit_file).read_text().strip()
        if limit == unlimited:
            return None
        used = int((level / usage_file).read_text().strip()) - _stat(level, cache_key)
        return max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


def _stat(level: Path, key: str) -> int:
    """One figure of the cgroup's memory.stat (its reclaimable page cache); 0 where it cannot be read."""
    try:
        for line in (level / "memory.stat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def available_device_memory(device) -> int | None:
    """Free bytes on a CUDA device (None on CPU: its state is in host memory)."""
    if device.type != "cuda":
        return None
    import torch

    return torch.cuda.mem_get_info(device)[0]


def device_name(device) -> str:
    """The device as a message names it: a model on plain 'cuda' runs on the current GPU, and on a
    machine of several GPUs the user needs to know which one is full."""
    if device.type == "cuda" and device.index is None:
        import torch

        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def check_slots_fit(
    slots: int, per_slot: SlotBytes, device, host_available: int | None, device_available: int | None, scratch: int = 0
) -> None:
    """Raise CapacityError if `slots` slots of state cannot fit in the memory available: on CPU device
    and host state share the host's memory. `scratch` is device state allocated beside the slots (the
    runner's padding row of encoder caches), counted with them: the check is of what is allocated."""
    if device.type == "cpu":
        needs = [("host memory", per_slot.total(), scratch, host_available)]
    else:
        device = device_name(device)
        needs = [(f"{device} memory", per_slot.device, scratch, device_available), ("host memory", per_slot.host, 0, host_available)]
    for where, each, extra, have in needs:
        need = slots * each + extra
        if have is not None and need > have:
            fit = max(0, have - extra) // max(1, each)
            raise CapacityError(
                f"EngineConfig(max_streams={slots}) needs {need / GiB:.1f} GiB of {where} for stream state "
                f"({per_slot.device / 2**20:.2f} MiB per stream of encoder, decoder and VAD state on {device}, "
                f"{per_slot.host / 2**20:.2f} MiB of audio buffer on the host, set by max_buffered_seconds), "
                f"but {have / GiB:.1f} GiB is available: lower max_streams (about {fit} fit, before the "
                f"model's own memory) or max_buffered_seconds"
            )
