import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import mmpo.module
from mmpo.allocator import _glibc, keep_freed_memory
from mmpo.backbones import VisionLanguageBackbone
from mmpo.losses import DPOLoss
from mmpo.module import PreferenceModule

glibc_only = pytest.mark.skipif(_glibc() is None, reason="mallopt tuning is glibc-only")


_REFILL = """
import ctypes, resource, sys
from mmpo.allocator import _glibc, keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc = _glibc()
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = 48 << 20  # above glibc's largest dynamic mmap threshold (32 MiB): mmapped and unmapped every time by default
def refill():
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
refill()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    refill()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _refill_faults(mode: str) -> int:
    """Minor page faults of four malloc-touch-free rounds of 48 MiB in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", _REFILL, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@glibc_only
def test_freed_blocks_stay_mapped_and_are_reused_without_page_faults():
    pages = 4 * (48 << 20) // 4096  # 49,152 page faults if every round maps fresh memory
    assert _refill_faults("default") > 0.9 * pages  # the cost being removed
    assert _refill_faults("keep") < 0.01 * pages


def test_a_nonpositive_block_size_is_refused():
    with pytest.raises(ValueError, match="must be positive"):
        keep_freed_memory(0)


@pytest.mark.parametrize(
    ("device", "enabled", "called"), [("cpu", True, True), ("cpu", False, False), ("cuda", True, False)]
)
def test_the_module_tunes_the_allocator_on_cpu_runs_only(tiny_llava, monkeypatch, device, enabled, called):
    calls = []
    monkeypatch.setattr(mmpo.module, "keep_freed_memory", lambda: calls.append(1) or True)
    module = PreferenceModule(VisionLanguageBackbone(str(tiny_llava)), DPOLoss(), keep_host_memory=enabled)
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
    module.setup("fit")
    assert bool(calls) is called
