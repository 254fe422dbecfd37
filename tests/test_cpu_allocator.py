"""kromhc_vision.cpu_allocator: glibc keeps large freed tensors' memory in its heap instead of mmap'ing them."""
import platform
import subprocess
import sys
import textwrap

import pytest

from kromhc_vision.cpu_allocator import configure_cpu_malloc

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt/mallinfo2 are glibc's")

# In a fresh process (mallopt is process-wide): the bytes glibc holds in mmap'ed blocks (mallinfo2's hblkhd)
# while a 64 MiB tensor lives, before and after the call under test.
PROBE = textwrap.dedent("""
    import ctypes, sys, torch
    from kromhc_vision.cpu_allocator import configure_cpu_malloc

    class Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info
    print(configure_cpu_malloc(sys.argv[1], sys.argv[2]))
    base = libc.mallinfo2().hblkhd
    t = torch.empty(64 << 20, dtype=torch.uint8)
    print(libc.mallinfo2().hblkhd - base)
""")


def probe(choice, device="cpu"):
    out = subprocess.run([sys.executable, "-c", PROBE, choice, device], capture_output=True, text=True, check=True)
    retained, mmapped = out.stdout.split()
    return retained == "True", int(mmapped)


@glibc_only
def test_retain_serves_large_tensors_from_the_heap():
    assert probe("retain") == (True, 0)


@glibc_only
@pytest.mark.parametrize("choice, device", [("default", "cpu"), ("retain", "meta")])
def test_default_or_another_device_leaves_malloc_alone(choice, device):
    retained, mmapped = probe(choice, device)
    assert not retained and mmapped >= 64 << 20


def test_unknown_choice_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown cpu_malloc 'jemalloc'; valid choices: retain, default"):
        configure_cpu_malloc("jemalloc", "cpu")
