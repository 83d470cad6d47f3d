"""Stream slots that cannot fit in memory fail at engine creation with the sizes, before any allocation;
the per-slot figure the check (and the bench) uses is what the runner really allocates per slot."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monosemantic import CapacityError, Engine, EngineConfig
from monosemantic.engine import memory
from monosemantic.engine.memory import SlotBytes, available_host_memory, check_slots_fit
from monosemantic.engine.runner import state_bytes


def test_too_many_streams_for_memory_is_a_clear_error_before_allocating(ms_model, monkeypatch):
    model = ms_model("nemotron_rnnt")
    allocated = []
    real_zeros = np.zeros
    monkeypatch.setattr(np, "zeros", lambda shape, *a, **k: allocated.append(shape) or real_zeros(shape, *a, **k))
    # A million slots of ten seconds' audio ring alone is hundreds of GiB: more than any test machine has.
    with pytest.raises(CapacityError, match=r"max_streams=1000000\) needs .* GiB of host memory") as info:
        Engine(model, EngineConfig(max_streams=1_000_000))
    message = str(info.value)
    assert "lower max_streams" in message and "max_buffered_seconds" in message
    assert not [shape for shape in allocated if shape and shape[0] >= 1_000_000]  # nothing that size tried


def test_the_memory_check_comes_before_any_per_slot_bookkeeping(ms_model):
    """The scheduler's slot lists (one entry per slot) used to be built before the check: ten million
    slots took about 1 GB of Python objects before the CapacityError, a billion exhausted the memory."""
    import tracemalloc

    model = ms_model("nemotron_rnnt")
    tracemalloc.start()
    try:
        with pytest.raises(CapacityError, match="max_streams=10000000"):
            Engine(model, EngineConfig(max_streams=10_000_000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20


@pytest.mark.parametrize("vad", [True, False])
def test_slot_bytes_are_the_runners_allocation_per_slot(ms_model, vad):
    model = ms_model("nemotron_tdt")
    slots = 5
    config = EngineConfig(max_streams=slots) if vad else EngineConfig(max_streams=slots, vad=None)
    runner = Engine(model, config).core.runner
    # Device state: slot caches (with one scratch row past the slots), decoder, VAD.
    cache_rows = runner.cache.keys[0].shape[0]
    assert cache_rows == slots + 1
    allocated = state_bytes(runner.cache) / cache_rows + state_bytes(runner.decoder) / slots
    if vad:
        allocated += state_bytes(runner.vad_state) / slots
    assert runner.slot_bytes.device == pytest.approx(allocated)
    assert runner.slot_bytes.host * slots == runner.ring.nbytes
    assert (runner.vad_state is not None) == vad


def test_state_bytes_counts_tensors_and_lists_of_them():
    class State:
        def __init__(self):
            self.a = torch.zeros(3, 4)  # 48 bytes
            self.b = [torch.zeros(2, dtype=torch.long), torch.zeros(5, dtype=torch.float16)]  # 16 + 10
            self.c = 7  # not a tensor

    assert state_bytes(State()) == 48 + 16 + 10


def test_cpu_state_shares_host_memory():
    per_slot = SlotBytes(device=3 << 20, host=1 << 20)
    cpu = torch.device("cpu")
    check_slots_fit(100, per_slot, cpu, host_available=400 << 20, device_available=None)  # exactly fits
    with pytest.raises(CapacityError, match=r"about 99 fit"):
        check_slots_fit(100, per_slot, cpu, host_available=(400 << 20) - 1, device_available=None)
    check_slots_fit(10**9, per_slot, cpu, host_available=None, device_available=None)  # unknown: no check


def test_gpu_state_is_checked_against_the_device_and_the_ring_against_the_host():
    per_slot = SlotBytes(device=10 << 20, host=1 << 20)
    gpu = torch.device("cuda", 0)
    check_slots_fit(100, per_slot, gpu, host_available=100 << 20, device_available=1000 << 20)
    with pytest.raises(CapacityError, match=r"of cuda:0 memory.*about 99 fit"):
        check_slots_fit(100, per_slot, gpu, host_available=10**12, device_available=(1000 << 20) - 1)
    with pytest.raises(CapacityError, match=r"of host memory.*about 50 fit"):
        check_slots_fit(100, per_slot, gpu, host_available=50 << 20, device_available=10**12)


def test_a_model_on_plain_cuda_is_named_by_its_current_gpu(monkeypatch):
    # load_model(device="cuda") leaves the index unset; on a machine of several GPUs the message must
    # say which one is full (the H100 run found "of cuda memory").
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    per_slot = SlotBytes(device=10 << 20, host=1 << 20)
    with pytest.raises(CapacityError, match=r"of cuda:1 memory .* state on cuda:1,"):
        check_slots_fit(100, per_slot, torch.device("cuda"), host_available=None, device_available=1 << 20)


def test_available_host_memory_reads_meminfo_and_the_cgroup_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert available_host_memory(meminfo, cgroup, tmp_path / 'self') == 20000000 * 1024  # no cgroup files: meminfo alone
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "memory.current").write_text("123\n")
    assert available_host_memory(meminfo, cgroup, tmp_path / 'self') == 20000000 * 1024  # no limit
    (cgroup / "memory.max").write_text(f"{8 << 30}\n")
    (cgroup / "memory.current").write_text(f"{3 << 30}\n")
    assert available_host_memory(meminfo, cgroup, tmp_path / 'self') == 5 << 30  # a container's limit is lower
    assert available_host_memory(tmp_path / "missing", cgroup, tmp_path / 'self') == 5 << 30
    assert available_host_memory(tmp_path / "missing", tmp_path / "none", tmp_path / 'self') is None


def test_this_machine_reports_host_memory():
    if not memory.Path("/proc/meminfo").exists():
        pytest.skip("Linux only")
    assert available_host_memory() > 0


def test_a_containers_reclaimable_page_cache_counts_as_available(tmp_path):
    """memory.current counts the page cache the cgroup's reads filled (the model file, a download), which
    the kernel reclaims when the process needs memory; MemAvailable counts it as available, and so must
    the cgroup's figure. A container at its limit with a page cache (the steady state of one that read its
    checkpoint) was found to have nothing available, and every engine was refused."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemAvailable:   20000000 kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text(f"{8 << 30}\n")
    (cgroup / "memory.current").write_text(f"{(8 << 30) - (1 << 20)}\n")  # at its limit
    (cgroup / "memory.stat").write_text(f"anon {3 << 30}\nfile {5 << 30}\nactive_file {1 << 30}\ninactive_file {4 << 30}\n")
    assert available_host_memory(meminfo, cgroup, tmp_path / 'self') == (4 << 30) + (1 << 20)  # what is left, and the inactive cache
    (cgroup / "memory.stat").write_text("anon 1\n")  # no figure: the limit less what is used
    assert available_host_memory(meminfo, cgroup, tmp_path / 'self') == 1 << 20


def _limit(level, limit: int | str, used: int, v1: bool = False) -> None:
    level.mkdir(parents=True, exist_ok=True)
    (level / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(f"{limit}\n")
    (level / ("memory.usage_in_bytes" if v1 else "memory.current")).write_text(f"{used}\n")


def test_a_limit_on_the_processs_own_cgroup_or_an_ancestor_is_read(tmp_path):
    """A systemd unit's MemoryMax (or its slice's) sits on the process's cgroup below the hierarchy's root,
    named by /proc/self/cgroup; only the root's files were read, so such a process was checked against
    the host's MemAvailable and too many slots ended in the OOM killer instead of a CapacityError."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemAvailable:   20000000 kB\n")
    root, me = tmp_path / "cgroup", tmp_path / "self"
    me.write_text("0::/system.slice/agent.service\n")
    _limit(root, "max", 10 << 30)
    _limit(root / "system.slice" / "agent.service", 4 << 30, 1 << 30)  # the unit's MemoryMax
    assert available_host_memory(meminfo, root, me) == 3 << 30
    _limit(root / "system.slice", 2 << 30, 1536 << 20)  # the slice's is tighter
    assert available_host_memory(meminfo, root, me) == 512 << 20
    # Inside a container the path names the host's cgroup, which the container's mount does not show:
    # its root (the container's own cgroup) is still read.
    me.write_text("0::/kubepods/pod1/abc\n")
    _limit(root, 1 << 30, 256 << 20)
    assert available_host_memory(meminfo, root, me) == 768 << 20


def test_a_cgroup_v1_memory_limit_is_read(tmp_path):
    """Hosts still on cgroup v1 (or hybrid: a unified hierarchy without the memory controller) keep the
    limit in the memory hierarchy's memory.limit_in_bytes, its usage's page cache as total_inactive_file."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemAvailable:   20000000 kB\n")
    root, me = tmp_path / "cgroup", tmp_path / "self"
    me.write_text("4:memory:/docker/abc\n1:cpu,cpuacct:/docker/abc\n0::/\n")
    _limit(root, "max", 1)  # the unified hierarchy's root: no memory controller there, not read for limits
    _limit(root / "memory", 9223372036854771712, 6 << 30, v1=True)  # v1's "no limit" is a huge number
    _limit(root / "memory" / "docker" / "abc", 4 << 30, 3 << 30, v1=True)
    (root / "memory" / "docker" / "abc" / "memory.stat").write_text(f"inactive_file 1\ntotal_inactive_file {1 << 30}\n")
    assert available_host_memory(meminfo, root, me) == 2 << 30


def test_the_check_counts_the_scratch_cache_row_the_runner_allocates(ms_model, monkeypatch):
    """The runner allocates one encoder-cache row past the slots (the row CUDA graphs pad batches with),
    which the check left out: an engine sized to the memory passed it, then allocated more than there was."""
    from monosemantic.engine import runner as runner_module

    model = ms_model("nemotron_rnnt")
    config = EngineConfig(max_streams=3, vad=None)
    probe = Engine(model, config).core.runner
    allocated = probe.ring.nbytes + state_bytes(probe.cache) + state_bytes(probe.decoder)  # CPU: all host memory
    monkeypatch.setattr(runner_module, "available_host_memory", lambda: allocated - 1)
    with pytest.raises(CapacityError, match=r"max_streams=3\).*about 2 fit"):
        Engine(model, config)
    monkeypatch.setattr(runner_module, "available_host_memory", lambda: allocated)
    Engine(model, config)  # exactly what is allocated fits


def test_device_memory_outside_the_slots_counts_against_the_device():
    per_slot = SlotBytes(device=10 << 20, host=1 << 20)
    gpu = torch.device("cuda", 0)
    check_slots_fit(100, per_slot, gpu, host_available=10**12, device_available=1005 << 20, scratch=5 << 20)
    with pytest.raises(CapacityError, match=r"of cuda:0 memory.*about 99 fit"):
        check_slots_fit(100, per_slot, gpu, host_available=10**12, device_available=(1005 << 20) - 1, scratch=5 << 20)
    with pytest.raises(CapacityError, match=r"of host memory.*about 99 fit"):
        check_slots_fit(100, per_slot, torch.device("cpu"), host_available=(1105 << 20) - 1, device_available=None, scratch=5 << 20)
