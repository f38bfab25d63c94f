"""fp32 linear layers on the CPU through oneDNN with weights packed once, for inference.

A linear layer calls MKL's sgemm, which packs its weight matrix into a blocked layout on every
call. With many rows (a prompt) that cost is spread over much work; with 16 rows (a decode step)
it is most of the work (docs/benchmarks.md has the measurements). This is the packing PyTorch's
own compiler applies to frozen CPU linears (`torch.ops.mkldnn._reorder_linear_weight` /
`_linear_pointwise`), done here once at load so that eager transformers code runs it.

The arithmetic is still fp32; only the order of the additions differs, so outputs differ from
sgemm's in the last bits (about 1e-6 relative) and are deterministic and the same for a row
whatever its batch companions. Inference only: the packed weight has no gradient.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch

KERNEL = "onednn-prepacked"
"""The name recorded in a backend's identity when its linears run here."""

MADV_DONTNEED = 4


def available() -> bool:
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PrepackedLinear(torch.nn.Module):
    """A `torch.nn.Linear`'s forward with its weight in oneDNN's packed layout."""

    def __init__(self, linear: torch.nn.Linear, rows: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # The layout is chosen for `rows` rows; other row counts run on it as well.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


@torch.no_grad()
def prepack_linears(model: torch.nn.Module, rows: int) -> int:
    """Replace every fp32 CPU `nn.Linear` of `model` (exactly that class, so quantised and
    adapter layers stay) by a PrepackedLinear, in place; the number replaced. A weight that
    another module shares (a tied LM head and embedding) stays for that module, so tying costs
    one packed copy of the matrix.

    transformers leaves the weights in the checkpoint's memory map, where every page packing
    reads stays resident while the map lives, so the process would hold both copies. As soon as
    a weight that no other module shares is packed, its pages are dropped from this process (they
    stay in the page cache for the next load)."""
    targets = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.Linear
        and child.weight.device.type == "cpu"
        and child.weight.dtype == torch.float32
    ]
    replaced = {id(getattr(parent, name)) for parent, name in targets}
    shared = {id(p) for m in model.modules() if id(m) not in replaced for p in m.parameters(recurse=False)}
    mapped = _file_mappings()
    for parent, name in targets:
        linear = getattr(parent, name)
        setattr(parent, name, PrepackedLinear(linear, rows))
        if id(linear.weight) not in shared:
            _drop_pages(linear.weight, mapped)
    return len(targets)


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges this process has mapped from files (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = (int(a, 16) for a in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def _drop_pages(tensor: torch.Tensor, mapped: list[tuple[int, int]]) -> bool:
    """Unmap the whole pages of `tensor` from this process when they come from a file mapping
    (madvise MADV_DONTNEED); whether that was done. Only for a tensor nothing reads any more:
    the whole pages inside it belong to no other tensor, and a later read of them would see the
    file's bytes, not ones written since."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if not sys.platform.startswith("linux") or not any(a <= start and end <= z for a, z in mapped):
        return False
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last <= first:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED) == 0
