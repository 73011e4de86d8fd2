"""Pausing Python's cyclic garbage collector while thodb builds many objects at once.

A load parses thousands of resources into dicts and records, and a large expansion
builds a member per code: hundreds of thousands of objects that reference counting
frees and that form no reference cycles. The cyclic collector still walks them, again
and again as they pile up: about a quarter of the time of a load's read phase, and of
an expansion of 100,000 codes. :func:`paused` turns it off for such a block and back on
after it, unless something else had turned it off already; objects freed by reference
counting are freed at once either way, and any cycles made meanwhile are collected once
the collector runs again.

The collector is one per process: while a block runs, no thread's cycles are
collected. Blocks may nest and run in several threads; the collector resumes when the
last one ends.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_blocks = 0
_resume = False


@contextmanager
def paused() -> Iterator[None]:
    """Run the block with the cyclic garbage collector off."""
    global _blocks, _resume
    with _lock:
        if _blocks == 0:
            _resume = gc.isenabled()
            gc.disable()
        _blocks += 1
    try:
        yield
    finally:
        with _lock:
            _blocks -= 1
            if _blocks == 0 and _resume:
                gc.enable()
