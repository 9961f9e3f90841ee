"""Memory bookkeeping: a process's private and shared peaks, and the allocator settings that keep a long run flat."""

from __future__ import annotations

import os
import platform

import numpy as np
import pytest

from protopo_ray.training import memory


def test_memory_watch_reports_private_and_shared_peaks():
    watch = memory.MemoryWatch(interval_s=0.01)
    before = watch.peaks()
    block = np.ones(64 << 17)  # 64 MiB of private memory, touched
    after = watch.peaks()
    del block
    memory.trim()
    assert after.anon_bytes >= before.anon_bytes + (48 << 20)
    assert after.rss_bytes >= after.anon_bytes
    watch.stop()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator settings are glibc's")
def test_tame_allocator_applies_once_under_glibc_and_caps_onednn_before_its_first_primitive():
    assert memory.tame_allocator() is True and memory.tame_allocator() is True  # applied once, then a no-op
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(memory.ONEDNN_CACHE) == "8"
