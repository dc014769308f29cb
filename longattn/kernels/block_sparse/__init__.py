"""Block-sparse attention: per query block, a list of key blocks, plus
attention sinks and a local window. The primitive HiP (and later Streaming
and Duo) run on.

Who sees what (positions bottom-right aligned, ``p_i = i + seqlen_k -
seqlen_q``; query block ``i // block_q``, key block ``j // block_k``): query
``i`` of head ``h`` sees key ``j`` iff, with ``causal``, ``j <= p_i``, and

- ``j < sink_size`` (a sink), or
- ``j`` is in the window: causal ``p_i - recent_size < j <= p_i``,
  non-causal ``|j - p_i| < recent_size``, or
- ``j >= sink_size`` and its key block is listed in
  ``key_blocks[b, h, i // block_q]``.

The three sets are a union: a key in two of them counts once. A row that
sees nothing gets ``out = 0``, ``lse = -inf``. :meth:`BlockSparseLayout.dense_mask`
writes this rule out as the boolean mask the float64 oracle takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.dispatch import Backend, Registry
from longattn.errors import ArgumentError, DTypeError, ShapeError
from longattn.kernels.support import triton_support
from longattn.validation import check_attention_options, check_int, check_qkv


@dataclass(frozen=True)
class BlockSparseLayout:
    """The geometry of one block-sparse call (see the module docstring)."""

    seqlen_q: int
    seqlen_k: int
    block_q: int
    block_k: int
    sink_size: int
    recent_size: int
    causal: bool

    @property
    def offset(self) -> int:
        """``p_i - i``: query ``i`` sits at key position ``i + offset``."""
        return self.seqlen_k - self.seqlen_q

    @property
    def num_q_blocks(self) -> int:
        return -(-self.seqlen_q // self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return -(-self.seqlen_k // self.block_k)

    def in_window(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        """Window membership, broadcasting query positions against key positions."""
        if self.causal:
            return (kpos > qpos - self.recent_size) & (kpos <= qpos)
        return (kpos - qpos).abs() < self.recent_size

    def selected_mask(self, key_blocks: torch.Tensor) -> torch.Tensor:
        """``(batch, nheads, num_q_blocks, num_k_blocks)`` bool: which key blocks are listed."""
        batch, nheads, nqb, _ = key_blocks.shape
        listed = torch.zeros(batch, nheads, nqb, self.num_k_blocks + 1, dtype=torch.bool, device=key_blocks.device)
        # -1 (padding) lands in the extra last column, which is dropped.
        index = torch.where(key_blocks < 0, self.num_k_blocks, key_blocks).long()
        listed.scatter_(-1, index, True)
        return listed[..., : self.num_k_blocks]

    def dense_mask(self, key_blocks: torch.Tensor, query_rows: torch.Tensor | None = None) -> torch.Tensor:
        """``(batch, nheads, seqlen_q, seqlen_k)`` bool: the visibility rule, for the
        oracle; with ``query_rows`` (1-D query indices) only those rows."""
        device = key_blocks.device
        rows = torch.arange(self.seqlen_q, device=device) if query_rows is None else query_rows.to(device)
        i = rows[:, None]
        j = torch.arange(self.seqlen_k, device=device)[None, :]
        qpos = i + self.offset
        fixed = (j < self.sink_size) | self.in_window(qpos, j)
        listed = self.selected_mask(key_blocks)[:, :, i // self.block_q, j // self.block_k]
        mask = fixed | (listed & (j >= self.sink_size))
        if self.causal:
            mask = mask & (j <= qpos)
        return mask


def check_key_blocks(key_blocks: object, batch: int, nheads: int, layout: BlockSparseLayout) -> torch.Tensor:
    """``key_blocks`` is an integer ``(batch, nheads, num_q_blocks, n)`` tensor of key
    block indices in ``[0, num_k_blocks)`` or -1 (padding), none repeated in a row."""
    if not isinstance(key_blocks, torch.Tensor):
        raise DTypeError(f"key_blocks must be a torch.Tensor, got {type(key_blocks).__name__}")
    if key_blocks.dtype.is_floating_point or key_blocks.dtype.is_complex or key_blocks.dtype == torch.bool:
        raise DTypeError(f"key_blocks must be an integer tensor, got {key_blocks.dtype}")
    expected = (batch, nheads, layout.num_q_blocks)
    if key_blocks.dim() != 4 or tuple(key_blocks.shape[:3]) != expected:
        raise ShapeError(
            f"key_blocks must be (batch, nheads, num_q_blocks, n) = ({batch}, {nheads}, "
            f"{layout.num_q_blocks}, n), got {tuple(key_blocks.shape)}"
        )
    if key_blocks.numel():
        low, high = int(key_blocks.min()), int(key_blocks.max())
        if low < -1 or high >= layout.num_k_blocks:
            raise ArgumentError(
                f"key_blocks entries must be in [0, {layout.num_k_blocks}) (key blocks of {layout.block_k} "
                f"keys over seqlen_k={layout.seqlen_k}) or -1, got values in [{low}, {high}]"
            )
        ordered = key_blocks.sort(dim=-1).values
        if bool(((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any()):
            raise ArgumentError("key_blocks lists a key block twice for one query block and head")
    return key_blocks


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_blocks: torch.Tensor,
    *,
    block_q: int,
    block_k: int,
    sink_size: int = 0,
    recent_size: int = 0,
    causal: bool = True,
    softmax_scale: float | None = None,
    softcap: float = 0.0,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over listed key blocks plus sinks and a window (rule in the module docstring).

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``; k, v ``(batch, seqlen_k,
            nheads_k, headdim)`` (GQA: head ``h`` reads kv head ``h // (nheads // nheads_k)``).
        key_blocks: ``(batch, nheads, ceil(seqlen_q / block_q), n)`` integer
            key block indices, -1 for "none"; any order, no repeats.
        block_q, block_k: queries per query block, keys per key block (>= 1).
        sink_size, recent_size: >= 0.
        causal, softmax_scale, softcap, return_lse: as in :func:`longattn.attention`.
        backend: ``"auto"`` (the first of these that can serve), ``"cpp"`` (the
            C++ flash kernel, CPU, recent_size >= 1), ``"triton"`` (CUDA, or CPU
            under ``TRITON_INTERPRET=1`` for verification), ``"sdpa"`` (PyTorch's
            fused CPU kernel, no softcap) or ``"eager"`` (PyTorch ops, the
            specification). A forced twin that cannot serve raises
            :class:`~longattn.errors.BackendUnavailableError` listing every twin's reasons.

    Returns:
        ``out`` like q, or ``(out, lse)`` with ``lse (batch, nheads, seqlen_q)`` float32.
    """
    q, k, v = check_qkv(q, k, v)
    causal, return_lse, scale, _, softcap = check_attention_options(
        q.shape[-1], causal, return_lse, softmax_scale, (-1, -1), softcap
    )
    for name, value, minimum in (("block_q", block_q, 1), ("block_k", block_k, 1), ("sink_size", sink_size, 0),
                                 ("recent_size", recent_size, 0)):
        check_int(name, value, minimum)
    layout = BlockSparseLayout(q.shape[1], k.shape[1], block_q, block_k, sink_size, recent_size, causal)
    key_blocks = check_key_blocks(key_blocks, q.shape[0], q.shape[2], layout)
    out, lse = block_sparse_forward(q, k, v, key_blocks, layout, scale=scale, softcap=softcap, backend=backend)
    return (out, lse) if return_lse else out


@dataclass(frozen=True)
class BlockSparseCall:
    """One validated block-sparse request: what every twin takes."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_blocks: torch.Tensor
    layout: BlockSparseLayout
    scale: float
    softcap: float


def _cpp_machine_reasons() -> list[str]:
    from longattn.kernels.dense.cpp import flash_unavailable_reason

    why = flash_unavailable_reason()
    return [] if why is None else [why]


def _cpp_call_reasons(call: BlockSparseCall) -> list[str]:
    reasons = [] if call.q.device.type == "cpu" else [f"CPU only, q is on {call.q.device.type}"]
    if call.layout.recent_size < 1:
        reasons.append("recent_size 0 (no window) is served by the eager twin")
    return reasons


def _run_cpp(call: BlockSparseCall) -> tuple[torch.Tensor, torch.Tensor]:
    from longattn.kernels.block_sparse.cpp import block_sparse_forward_cpp

    return block_sparse_forward_cpp(call.q, call.k, call.v, call.key_blocks, call.layout, scale=call.scale,
                                    softcap=call.softcap)


def _run_triton(call: BlockSparseCall) -> tuple[torch.Tensor, torch.Tensor]:
    from longattn.kernels.block_sparse.triton import block_sparse_forward_triton

    return block_sparse_forward_triton(call.q, call.k, call.v, call.key_blocks, call.layout, scale=call.scale,
                                       softcap=call.softcap)


def _run_eager(call: BlockSparseCall) -> tuple[torch.Tensor, torch.Tensor]:
    from longattn.kernels.block_sparse.eager import block_sparse_forward_eager

    return block_sparse_forward_eager(call.q, call.k, call.v, call.key_blocks, call.layout, scale=call.scale,
                                      softcap=call.softcap)


CPP = Backend[BlockSparseCall](
    name="cpp",
    description="the C++ CPU flash kernel with listed key positions, sinks and a window (csrc/cpu/flash_cpu.cpp)",
    run=_run_cpp,
    machine_reasons=_cpp_machine_reasons,
    call_reasons=_cpp_call_reasons,
)

TRITON = Backend[BlockSparseCall](
    name="triton",
    description="block-sparse flash forward in Triton (GPU; CPU under TRITON_INTERPRET=1)",
    run=_run_triton,
    machine_reasons=triton_support.machine_reasons,
    call_reasons=lambda call: triton_support.call_reasons(call.q),
    auto_reasons=lambda call: triton_support.auto_reasons(call.q),
)

def _sdpa_machine_reasons() -> list[str]:
    from longattn.kernels.dense.sdpa import lse_op_available

    return [] if lse_op_available() else ["this torch has no lse-returning fused CPU attention op"]


def _sdpa_call_reasons(call: BlockSparseCall) -> list[str]:
    reasons = [] if call.q.device.type == "cpu" else [f"CPU only, q is on {call.q.device.type}"]
    if call.softcap > 0:
        reasons.append("softcap is not supported by the fused kernel")
    return reasons


def _run_sdpa(call: BlockSparseCall) -> tuple[torch.Tensor, torch.Tensor]:
    from longattn.kernels.block_sparse.sdpa import block_sparse_forward_sdpa

    return block_sparse_forward_sdpa(call.q, call.k, call.v, call.key_blocks, call.layout, scale=call.scale,
                                     softcap=call.softcap)


SDPA = Backend[BlockSparseCall](
    name="sdpa",
    description="PyTorch's fused CPU attention over each query block's candidates (a window span per chunk "
                "for sinks + window)",
    run=_run_sdpa,
    machine_reasons=_sdpa_machine_reasons,
    call_reasons=_sdpa_call_reasons,
)

EAGER = Backend[BlockSparseCall](
    name="eager",
    description="PyTorch over each query block's candidate keys, float32 math; serves every call",
    run=_run_eager,
    machine_reasons=lambda: [],
    call_reasons=lambda call: [],
)

BLOCK_SPARSE_BACKENDS = Registry[BlockSparseCall]("block-sparse attention", [CPP, TRITON, SDPA, EAGER])


def block_sparse_forward(q, k, v, key_blocks, layout: BlockSparseLayout, *, scale: float, softcap: float,
                         backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The twin ``backend`` names (validated inputs): ``(out, lse)``. ``auto``:
    the C++ flash kernel on a CPU where it builds, Triton on CUDA, the fused
    CPU kernel (``sdpa``), else eager."""
    call = BlockSparseCall(q, k, v, key_blocks, layout, scale, softcap)
    return BLOCK_SPARSE_BACKENDS.select(call, backend).run(call)
