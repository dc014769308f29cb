"""Gather decode: exact attention of each decode query over its own list of
cached token positions (the primitive Quest, Double Sparsity and TidalDecode
run on). Shapes and rules: :mod:`longattn.kernels.gather.eager`.

Entry point :func:`gather_decode` validates (layout always; the index
ranges when ``check`` says so) and runs the twin the registry selects.

Twins (priority order for ``backend="auto"``):

- ``cpp``: C++/OpenMP kernel (``csrc/cpu/gather_decode.cpp``), built on first
  use; reads the listed rows in place with the decode kernel's micro-kernels.
- ``triton``: Triton kernel (GPU; on CPU only under ``TRITON_INTERPRET=1``,
  for verification, never picked by auto there).
- ``cuda``: CUDA C++ (``csrc/cuda/gather_decode.cu``) compiled at first use
  with NVRTC through cupy; compile-checked with nvcc and run in a CPU emulation,
  not yet on a GPU, so auto does not pick it (force ``backend="cuda"``).
- ``eager``: PyTorch gather + matmul; serves every call (the specification).

Every twin takes the same arguments and returns ``(out, lse)``; the GPU twins
import lazily (triton and cupy are optional).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.dispatch import Backend, Registry
from longattn.errors import ArgumentError, DeviceError, DTypeError, ShapeError
from longattn.kernels.gather.cpp import cpu_unavailable_reason, gather_decode_cpu
from longattn.kernels.gather.cuda import MAX_HEADDIM as CUDA_MAX_HEADDIM  # imports no cupy
from longattn.kernels.gather.cuda import cuda_unavailable_reason
from longattn.kernels.gather.eager import gather_decode_eager
from longattn.kernels.support import triton_support
from longattn.validation import FLOAT_DTYPES, check_int, check_softcap, check_softmax_scale, check_tensor

INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass
class GatherCall:
    """One validated gather-decode request."""

    q: torch.Tensor  # (batch, nheads, headdim)
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    indices: torch.Tensor  # (batch, nheads_k or nheads, n)
    block_table: torch.Tensor | None
    scale: float
    softcap: float

    @property
    def per_query_head(self) -> bool:
        return self.indices.shape[1] == self.q.shape[1] and self.q.shape[1] != self.k_cache.shape[2]

    def args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.indices, self.block_table)

    def kwargs(self) -> dict:
        return {"scale": self.scale, "softcap": self.softcap}


def _cpu_call_reasons(call: GatherCall) -> list[str]:
    return [] if call.q.device.type == "cpu" else [f"tensors are on {call.q.device.type}; this twin runs on cpu"]


CPP = Backend[GatherCall](
    name="cpp",
    description="C++/OpenMP kernel (csrc/cpu/gather_decode.cpp): listed rows read in place, fp16/bf16 widened "
                "to fp32 in registers",
    run=lambda call: gather_decode_cpu(*call.args(), **call.kwargs()),
    machine_reasons=lambda: [r] if (r := cpu_unavailable_reason()) else [],
    call_reasons=_cpu_call_reasons,
    pure=True,  # the build probe is made once per process
)


def _triton_run(call: GatherCall) -> tuple[torch.Tensor, torch.Tensor]:
    from longattn.kernels.gather.triton import gather_decode_triton

    return gather_decode_triton(*call.args(), **call.kwargs())


TRITON = Backend[GatherCall](
    name="triton",
    description="Triton kernel, one program per (list, split) (GPU; CPU under TRITON_INTERPRET=1)",
    run=_triton_run,
    machine_reasons=triton_support.machine_reasons,
    call_reasons=lambda call: triton_support.call_reasons(call.q),
    auto_reasons=lambda call: triton_support.auto_reasons(call.q),
)


def _cuda_call_reasons(call: GatherCall) -> list[str]:
    reasons = []
    if call.q.device.type != "cuda":
        reasons.append(f"tensors are on {call.q.device.type}; the CUDA twin needs cuda tensors")
    if call.q.shape[-1] > CUDA_MAX_HEADDIM:
        reasons.append(f"headdim {call.q.shape[-1]} > {CUDA_MAX_HEADDIM}")
    return reasons


def _cuda_run(call: GatherCall) -> tuple[torch.Tensor, torch.Tensor]:
    from longattn.kernels.gather.cuda import gather_decode_cuda

    return gather_decode_cuda(*call.args(), **call.kwargs())


CUDA = Backend[GatherCall](
    name="cuda",
    description="CUDA C++ kernel (csrc/cuda/gather_decode.cu, NVRTC via cupy)",
    run=_cuda_run,
    machine_reasons=lambda: [r] if (r := cuda_unavailable_reason()) else [],
    call_reasons=_cuda_call_reasons,
    auto_reasons=lambda call: ["compile-checked with nvcc but not yet verified on a GPU; force backend='cuda' to use it"],
    pure=True,  # cupy/CUDA availability is probed once per process
)

EAGER = Backend[GatherCall](
    name="eager",
    description="PyTorch gather of the listed rows + matmul, float32 math; serves every call",
    run=lambda call: gather_decode_eager(*call.args(), **call.kwargs()),
    machine_reasons=lambda: [],
    call_reasons=lambda call: [],
    pure=True,
)


def call_signature(call: GatherCall):
    """What every pure twin's reasons read from ``call`` (the registry's memo
    key): q's device, dtype and headdim; None while torch.compile traces.
    Keep in step with ``_cpu_call_reasons`` and ``_cuda_call_reasons``."""
    if torch.compiler.is_compiling():
        return None
    q = call.q
    return (q.device, q.dtype, q.shape[-1])


# The Triton twin reads TRITON_INTERPRET at call time (not pure): selections that
# consult it are never memoised. On a CPU, auto stops at cpp before reaching it.
GATHER_BACKENDS = Registry[GatherCall]("gather decode (attention over listed token positions)",
                                       [CPP, TRITON, CUDA, EAGER], signature=call_signature)


def check_gather_layout(q, k_cache, v_cache, indices, block_table) -> tuple[torch.Tensor, ...]:
    """Every check that reads no tensor data; returns the tensors."""
    q = check_tensor("q", q, 3, "(batch, nheads, headdim)")
    paged = block_table is not None
    layout = "(num_pages, page_size, nheads_k, headdim)" if paged else "(batch, capacity, nheads_k, headdim)"
    k_cache = check_tensor("k_cache", k_cache, 4, layout)
    v_cache = check_tensor("v_cache", v_cache, 4, layout)
    indices = check_tensor("indices", indices, 3, "(batch, nheads_k or nheads, n)", INDEX_DTYPES)
    batch, nheads, headdim = q.shape
    nheads_k = k_cache.shape[2]
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise DTypeError(f"{name} is {t.dtype} but q is {q.dtype}")
        if t.device != q.device:
            raise DeviceError(f"{name} is on {t.device} but q is on {q.device}")
    if q.dtype not in FLOAT_DTYPES:
        raise DTypeError(f"q must be float32, float16 or bfloat16, got {q.dtype}")
    if k_cache.shape[3] != headdim:
        raise ShapeError(f"k_cache has headdim {k_cache.shape[3]} but q has {headdim}")
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ShapeError(f"v_cache has shape {tuple(v_cache.shape)}, k_cache {tuple(k_cache.shape)}: they must "
                         "agree except in the last dimension")
    if nheads % nheads_k:
        raise ShapeError(f"q has {nheads} heads, not a multiple of the cache's nheads_k {nheads_k}")
    if indices.device != q.device:
        raise DeviceError(f"indices is on {indices.device} but q is on {q.device}")
    if indices.shape[0] != batch or indices.shape[1] not in (nheads_k, nheads):
        raise ShapeError(f"indices must be (batch, nheads_k, n) = ({batch}, {nheads_k}, n) or one list per query "
                         f"head ({batch}, {nheads}, n), got {tuple(indices.shape)}")
    if paged:
        block_table = check_tensor("block_table", block_table, 2, "(batch, max_pages)", INDEX_DTYPES)
        if block_table.shape[0] != batch:
            raise ShapeError(f"block_table has {block_table.shape[0]} rows, q has batch {batch}")
        if block_table.device != q.device:
            raise DeviceError(f"block_table is on {block_table.device} but q is on {q.device}")
    elif k_cache.shape[0] != batch:
        raise ShapeError(f"k_cache has batch {k_cache.shape[0]}, q has {batch} (pass block_table for a paged cache)")
    return q, k_cache, v_cache, indices, block_table


def capacity_of(k_cache: torch.Tensor, block_table: torch.Tensor | None) -> int:
    """Token positions one sequence can address."""
    return k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)


def check_gather_data(k_cache: torch.Tensor, indices: torch.Tensor, block_table: torch.Tensor | None, *,
                      pages: bool = True) -> None:
    """The checks that read data: every index in ``-1 .. capacity - 1`` and
    (``pages``) every page a listed position falls in inside ``0 .. num_pages - 1``."""
    capacity = capacity_of(k_cache, block_table)
    if indices.numel():
        low, high = int(indices.min()), int(indices.max())
        if low < -1 or high >= capacity:
            raise ArgumentError(f"indices must be token positions in -1 .. {capacity - 1} (-1 = no token), got "
                                f"values from {low} to {high}")
        if pages and block_table is not None:
            # One gather of each entry's page (no boolean indexing: ~20x faster at 16k
            # entries); -1 entries look up page 0 of their row and are then ignored.
            batch = indices.shape[0]
            listed = (indices >= 0).reshape(batch, -1)
            slots = (indices.clamp(min=0).to(torch.long) // k_cache.shape[1]).reshape(batch, -1)
            pages = block_table.to(torch.long).gather(1, slots)
            low, high = (int(x) for x in torch.aminmax(torch.where(listed, pages, 0)))
            if low < 0 or high >= k_cache.shape[0]:
                raise ArgumentError(f"block_table maps listed positions to pages outside 0 .. {k_cache.shape[0] - 1} "
                                    f"(got pages from {low} to {high})")


def expand_pages(pages: torch.Tensor, page_size: int, seqlens: torch.Tensor) -> torch.Tensor:
    """Logical page lists ``(batch, lists, n)`` (-1 = none) -> token lists
    ``(batch, lists, n * page_size)`` int32, positions at or past ``seqlens[b]``
    as -1."""
    check_int("pages_of", page_size, minimum=1)
    pages = check_tensor("indices", pages, 3, "(batch, nheads_k or nheads, n) page numbers", INDEX_DTYPES)
    seqlens = check_tensor("seqlens", seqlens, 1, "(batch,)", INDEX_DTYPES)
    if seqlens.shape[0] != pages.shape[0] or seqlens.device != pages.device:
        raise ShapeError(f"seqlens must be ({pages.shape[0]},) on {pages.device}, got {tuple(seqlens.shape)} on "
                         f"{seqlens.device}")
    offsets = torch.arange(page_size, device=pages.device)
    positions = pages.to(torch.long)[..., None] * page_size + offsets  # (batch, lists, n, page_size)
    inside = (pages[..., None] >= 0) & (positions < seqlens.to(torch.long)[:, None, None, None])
    positions = torch.where(inside, positions, torch.full_like(positions, -1))
    return positions.flatten(2).to(torch.int32)


def gather_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    indices: torch.Tensor,
    *,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    softcap: float = 0.0,
    backend: str = "auto",
    check: bool | None = None,
    pages_of: int | None = None,
    seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each decode query over the token positions listed for it.

    Args:
        q: ``(batch, nheads, headdim)``, float32/float16/bfloat16.
        k_cache, v_cache: contiguous ``(batch, capacity, nheads_k, headdim)``
            or paged ``(num_pages, page_size, nheads_k, headdim)`` with
            ``block_table``; same dtype and device as q. Read in place.
        indices: ``(batch, nheads_k, n)`` (one list per kv head, shared by its
            query group) or ``(batch, nheads, n)`` (one per query head) int32
            token positions of each sequence; ``-1`` = no token (lists may be
            padded with -1 at any place). Positions must be distinct within
            a list (not checked: a repeat counts twice).
        block_table: ``(batch, max_pages)`` int32 for a paged cache.
        softmax_scale: defaults to ``headdim ** -0.5``. softcap: as in
            :func:`longattn.attention`.
        backend: ``"auto"`` or a twin name (``GATHER_BACKENDS.names``).
        check: read ``indices`` (and ``block_table``) to check their ranges:
            None = on CPU tensors only (free there), True, False.
        pages_of: None (``indices`` are token positions), or a page size P:
            ``indices`` are then logical page numbers, page ``p`` standing
            for positions ``p * P .. p * P + P - 1`` (Quest's selection unit;
            independent of a paged cache's own page size), clipped to each
            sequence's length ``seqlens (batch,)`` int (required with it).
            Expanded to the token lists the twins read (``n * P`` entries).

    Returns:
        ``(out, lse)``: out like q, lse ``(batch, nheads)`` float32, natural
        log, over exactly the listed tokens (an empty list: 0 and -inf) --
        ready for :func:`longattn.kernels.merge.merge_states` with another part.
    """
    if pages_of is not None:
        indices = expand_pages(indices, pages_of, seqlens)
    elif seqlens is not None:
        raise ArgumentError("seqlens clips page lists: pass it with pages_of (token lists are exact already)")
    q, k_cache, v_cache, indices, block_table = check_gather_layout(q, k_cache, v_cache, indices, block_table)
    scale = check_softmax_scale(softmax_scale, q.shape[-1])
    softcap = check_softcap(softcap)
    if check is not None and not isinstance(check, bool):
        raise ArgumentError(f"check must be None, True or False, got {check!r}")
    if type(backend) is not str:
        raise ArgumentError(f"backend must be 'auto' or one of {GATHER_BACKENDS.names}, got {backend!r}")
    call = GatherCall(q, k_cache, v_cache, indices, block_table, scale, softcap)
    twin = GATHER_BACKENDS.select(call, backend)
    if check or (check is None and q.device.type == "cpu"):
        # The C++ twin checks every entry's page as it reads it (and then raises
        # the same error as here), so the page lookup of all entries is left to it.
        check_gather_data(k_cache, indices, block_table, pages=twin is not CPP)
    return twin.run(call)


__all__ = ["GATHER_BACKENDS", "GatherCall", "capacity_of", "expand_pages", "check_gather_data", "check_gather_layout",
           "gather_decode", "gather_decode_eager"]
