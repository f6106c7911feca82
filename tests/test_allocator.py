"""The trainer's allocator setting: freed blocks of 64 KiB and more go back to the kernel,
where glibc's default keeps them in the heap once it has raised its threshold."""

from __future__ import annotations

import subprocess
import sys

import train_fixtures as tf

PROBE = """
import ctypes, sys
from liquid_dist.train.allocator import fix_mmap_threshold
print(fix_mmap_threshold())
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
libc.free(libc.malloc(4 << 20))  # a mapped block freed: glibc's default raises its threshold
blocks = [libc.malloc(256 << 10) for _ in range(128)]  # 32 MiB
for b in blocks:
    ctypes.memset(b, 1, 256 << 10)
before = rss()
for b in blocks[::2]:  # every other one: holes the heap cannot trim
    libc.free(b)
print((before - rss()) >> 20)
"""


def _freed_mib(env: dict[str, str]) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=tf.REPO, check=True,
                         stdout=subprocess.PIPE, text=True).stdout.split()
    return out[0], int(out[1])


def test_the_fixed_threshold_returns_freed_blocks_and_the_environment_wins() -> None:
    fixed, freed = _freed_mib(tf.env())
    assert fixed == "True" and freed >= 15, freed  # 16 MiB freed in 256 KiB blocks
    left, kept = _freed_mib({**tf.env(), "MALLOC_MMAP_THRESHOLD_": "33554432"})
    assert left == "False" and kept <= 1, kept  # the user's setting: in the heap
