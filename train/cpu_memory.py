"""glibc's malloc settings and heap trims for a training process on a CPU (recipe key
`training.cpu_allocator`); why, and what each setting costs, is in docs/training.md ("Memory")."""

from __future__ import annotations

import ctypes
import os

from transformers import TrainerCallback


class CpuAllocator:
    """glibc's malloc settings for a training process on a CPU.

    Activation blocks of a few MB come and go with every batch; below glibc's mmap threshold
    they come from the heap, which keeps what it cannot trim, and glibc raises that threshold as
    mapped blocks are freed, so loading the model can leave its temporaries in the heap.

    - Both policies load the model with the threshold at 2 MB, and after every pass (and every
      evaluation) `malloc_trim` gives the heap's free pages back.
    - `compact` keeps the 2 MB threshold while training, with PyTorch's huge-page allocation
      (THP_MEM_ALLOC_ENABLE) so that mapping blocks again costs fewer page faults.
    - `glibc` then sets the threshold to 32 MB (the ceiling of glibc's own adaptive threshold),
      the trim threshold at twice that: faster, more memory.

    Thresholds a user exported (MALLOC_MMAP_THRESHOLD_) are kept; with a C library other than
    glibc this does nothing."""

    M_TRIM_THRESHOLD = -1
    M_MMAP_THRESHOLD = -3
    LOAD_THRESHOLD = 2 << 20
    HEAP_THRESHOLD = 32 << 20

    def __init__(self, policy: str):
        self.policy = policy
        self.libc = None
        try:
            libc = ctypes.CDLL("libc.so.6")
            if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim"):
                self.libc = libc
        except OSError:
            pass
        self.tune = self.libc is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ
        if policy == "compact":
            os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read at PyTorch's first large allocation

    def before_load(self) -> None:
        if self.tune:
            self.libc.mallopt(self.M_MMAP_THRESHOLD, self.LOAD_THRESHOLD)

    def after_load(self) -> None:
        if self.tune and self.policy == "glibc":
            self.libc.mallopt(self.M_MMAP_THRESHOLD, self.HEAP_THRESHOLD)
            self.libc.mallopt(self.M_TRIM_THRESHOLD, 2 * self.HEAP_THRESHOLD)
        self.trim()

    def trim(self) -> None:
        if self.libc is not None:
            self.libc.malloc_trim(0)

    def callback(self) -> TrimHeap:
        return TrimHeap(self)


class TrimHeap(TrainerCallback):
    """The heap's free pages back to the system after every pass and evaluation."""

    def __init__(self, allocator: CpuAllocator):
        self.allocator = allocator

    def on_substep_end(self, args, state, control, **kwargs):
        self.allocator.trim()

    def on_step_end(self, args, state, control, **kwargs):
        self.allocator.trim()

    def on_evaluate(self, args, state, control, **kwargs):
        self.allocator.trim()
