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


def available_host_memory(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes the process can still allocate on the host: the kernel's MemAvailable, lowered to what the
    process's cgroup (v2) limit leaves, as in a container. None where neither can be read (not Linux).
    The cgroup's usage counts its page cache, which the kernel reclaims as needed (MemAvailable counts
    it as available): its inactive part is left out of the usage, as docker and the kubelet do."""
    available = None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024  # the file counts kB
                break
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text().strip()) - _inactive_file(cgroup)
            left = max(0, int(limit) - used)
            available = left if available is None else min(available, left)
    except (OSError, ValueError):
        pass
    return available


def _inactive_file(cgroup: Path) -> int:
    """The cgroup's inactive page cache (memory.stat), reclaimable; 0 where it cannot be read."""
    try:
        for line in (cgroup / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "inactive_file":
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


def check_slots_fit(slots: int, per_slot: SlotBytes, device, host_available: int | None, device_available: int | None) -> None:
    """Raise CapacityError if `slots` slots of state cannot fit in the memory available: on CPU device
    and host state share the host's memory."""
    if device.type == "cpu":
        needs = [("host memory", slots * per_slot.total(), host_available)]
    else:
        device = device_name(device)
        needs = [(f"{device} memory", slots * per_slot.device, device_available), ("host memory", slots * per_slot.host, host_available)]
    for where, need, have in needs:
        if have is not None and need > have:
            fit = have // max(1, need // slots)
            raise CapacityError(
                f"EngineConfig(max_streams={slots}) needs {need / GiB:.1f} GiB of {where} for stream state "
                f"({per_slot.device / 2**20:.2f} MiB per stream of encoder, decoder and VAD state on {device}, "
                f"{per_slot.host / 2**20:.2f} MiB of audio buffer on the host, set by max_buffered_seconds), "
                f"but {have / GiB:.1f} GiB is available: lower max_streams (about {fit} fit, before the "
                f"model's own memory) or max_buffered_seconds"
            )
