"""keep_freed_memory: freed memory stays for reuse inside a run task and is
given back when it ends, in a process started like a Dask worker."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from dask_manymodel import ExecutionOptions, InvalidArgumentError

CHILD = textwrap.dedent(
    """
    import ctypes, json
    from dask_manymodel._malloc import keep_freed_memory

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2

    def heap_after_churn():
        # 64 KiB blocks: below the mmap threshold, so they come from the heap
        blocks = [bytearray(64 * 1024) for _ in range(400)]
        del blocks
        return libc.mallinfo2().arena

    before = libc.mallinfo2().arena
    outside = heap_after_churn()
    with keep_freed_memory():
        inside = heap_after_churn()
    after = libc.mallinfo2().arena
    print(json.dumps({"outside": outside - before, "inside": inside - before, "after": after - before}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_memory_is_kept_inside_a_task_and_given_back_after():
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="65536")  # as Dask's nanny starts workers
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    sizes = __import__("json").loads(out.stdout)
    mib = 2**20
    # growth of the heap over the start, after 25 MiB were freed: trimmed at
    # once outside, kept inside, returned when the block ends
    assert sizes["outside"] < 5 * mib, sizes
    assert sizes["inside"] > 20 * mib, sizes
    assert sizes["after"] < 5 * mib, sizes


def test_the_option_is_a_bool():
    assert ExecutionOptions().reuse_freed_memory is True
    with pytest.raises(InvalidArgumentError, match="reuse_freed_memory must be True or False, got 'no'"):
        ExecutionOptions(reuse_freed_memory="no")
