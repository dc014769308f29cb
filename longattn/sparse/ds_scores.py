"""Double Sparsity's per-step scoring: the approximate score of every cached
position, max over each kv head's query group.

``group_max_scores(q_sel, label, n)``:

- ``q_sel (batch, nheads_k, group, r)`` float32: each query head's values at
  its kv head's ``r`` label channels (already scaled by the softmax scale);
- ``label (batch, nheads_k, r, capacity)`` float32, channel-major (the
  :class:`~longattn.sparse.DoubleSparsityState` label cache);
- returns ``(batch, nheads_k, n)`` float32: ``max_g sum_j q_sel[b, h, g, j] *
  label[b, h, j, t]`` for positions ``t < n`` (``n <= capacity``); a NaN
  product (NaN in q_sel or the label) is passed over (every product NaN:
  -inf), in both twins, as HiP's search does.

Two twins give the same sums up to float32 rounding: the C++ kernel
(``csrc/cpu/ds_scores.cpp``: one pass over the label rows, the group's
maxima in registers; every ISA path and thread count bitwise the same) when it
builds here and the tensors are on the CPU, else :func:`group_max_scores_torch`
(a batched matmul and a max). The step is memory-bound on the label cache:
the kernel reads it once, where the matmul writes and rereads a ``group``
times larger score tensor (and BLAS runs the thin ``r``-deep product slowly).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from longattn.errors import ArgumentError, ShapeError
from longattn.kernels.support.cpp_build import BuildError, kernel_threads, load_library

SOURCE = "ds_scores.cpp"

_I64, _INT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_ARGTYPES = [_PTR, _PTR, _PTR, _INT, _INT, _INT, _INT, _I64, _I64, _INT]


@functools.lru_cache(maxsize=None)
def _kernel(build_flags: tuple[str, ...] = ()):
    fn = load_library(SOURCE, build_flags).longattn_ds_scores_cpu
    fn.argtypes, fn.restype = _ARGTYPES, ctypes.c_int
    return fn


@functools.lru_cache(maxsize=None)
def cpp_unavailable_reason() -> str | None:
    """None when the C++ kernel builds and loads here, else why not (checked once)."""
    try:
        _kernel()
    except BuildError as exc:
        return str(exc)
    return None


def _check(q_sel: torch.Tensor, label: torch.Tensor, n: int) -> None:
    if q_sel.dim() != 4 or label.dim() != 4:
        raise ShapeError(f"q_sel must be (batch, nheads_k, group, r) and label (batch, nheads_k, r, capacity), got "
                         f"{tuple(q_sel.shape)} and {tuple(label.shape)}")
    batch, hk, _, r = q_sel.shape
    if tuple(label.shape[:3]) != (batch, hk, r):
        raise ShapeError(f"label must be (batch, nheads_k, r, capacity) = ({batch}, {hk}, {r}, capacity) to match "
                         f"q_sel {tuple(q_sel.shape)}, got {tuple(label.shape)}")
    if q_sel.dtype != torch.float32 or label.dtype != torch.float32:
        raise ArgumentError(f"q_sel and label must be float32, got {q_sel.dtype} and {label.dtype}")
    if not 0 <= n <= label.shape[3]:
        raise ArgumentError(f"n must be in 0 .. capacity = {label.shape[3]}, got {n}")


def group_max_scores_torch(q_sel: torch.Tensor, label: torch.Tensor, n: int) -> torch.Tensor:
    """The PyTorch twin (any device); arguments and result as the module docstring."""
    _check(q_sel, label, n)
    batch, hk, group, _ = q_sel.shape
    if group == 0 or n == 0:
        return q_sel.new_full((batch, hk, n), float("-inf"))
    scores = torch.matmul(q_sel, label[..., :n])
    # A NaN product (NaN in q_sel or the label) is passed over, as the C++ twin
    # does (amax would spread it); a position whose every product is NaN scores -inf.
    scores.nan_to_num_(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    return scores.amax(dim=2)


def group_max_scores_cpu(q_sel: torch.Tensor, label: torch.Tensor, n: int,
                         build_flags: tuple[str, ...] = ()) -> torch.Tensor:
    """The C++ twin (CPU tensors); ``build_flags``: extra compiler flags for a
    separate cached build, e.g. ``("-mno-avx512f",)`` for the AVX2 path.
    Raises :class:`~longattn.kernels.support.cpp_build.BuildError` when it
    cannot be built here."""
    _check(q_sel, label, n)
    batch, hk, group, r = q_sel.shape
    if group == 0 or n == 0:
        return q_sel.new_full((batch, hk, n), float("-inf"))
    q_sel = q_sel.contiguous()
    label = label.contiguous()  # the state's cache already is: no copy
    out = torch.empty((batch, hk, n), dtype=torch.float32)
    kernel = _kernel(tuple(build_flags))
    status = kernel(q_sel.data_ptr(), label.data_ptr(), out.data_ptr(), batch, hk, group, r, label.shape[3], n,
                    kernel_threads())
    if status != 0:  # unreachable after _check; never hand back unwritten memory
        raise ArgumentError(f"ds_scores kernel rejected q_sel {tuple(q_sel.shape)}, label {tuple(label.shape)}, "
                            f"n {n}")
    return out


def group_max_scores(q_sel: torch.Tensor, label: torch.Tensor, n: int) -> torch.Tensor:
    """The C++ kernel for CPU tensors when it builds here, else the PyTorch twin."""
    if q_sel.device.type == "cpu" and label.device.type == "cpu" and cpp_unavailable_reason() is None:
        return group_max_scores_cpu(q_sel, label, n)
    return group_max_scores_torch(q_sel, label, n)
