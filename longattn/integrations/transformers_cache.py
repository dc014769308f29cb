"""``LongAttnCache``: a transformers ``Cache`` whose steps run through longattn's decode kernels.

One :class:`LongAttnLayer` per decoder layer. The layer does the attention of
its own steps: ``update`` stores nothing itself but hands the new keys and
values to the attention function (transformers passes one kwargs dict to
``cache.update(..., kwargs=kwargs)`` and then to ``attention(**kwargs)``),
which calls :meth:`LongAttnLayer.attend`. So a decode step is one
``decode_attention`` call that appends in place -- never a pass over the
whole cache. What a layer stores depends on the method it serves, chosen on
its first (prefill) step:

============================  ================================================
method (attn_implementation)  storage and decode step
============================  ================================================
dense ``"longattn"``          ``(batch, max_cache_len, nheads_k, headdim)``
                              buffers (or pages + block table with
                              ``page_size``); ``decode_attention``, left
                              padding as ``cache_leftpad``
HiP ``"longattn_hip"``        the same buffers and a
                              :class:`~longattn.sparse.HiPDecodeState`;
                              ``decode_attention(sparse=HiP, state=...)``
Streaming                     a :class:`~longattn.sparse.StreamingCache`:
                              sinks + window, constant memory; its ``step``
Duo                           a :class:`~longattn.sparse.DuoCache`: full
                              buffers for retrieval heads, sinks + window for
                              streaming heads; its ``step``
Quest, Double Sparsity        the dense buffers and the layer's
                              ``QuestState`` / ``DoubleSparsityState``;
                              ``decode_attention(sparse=..., state=...)``
TidalDecode                   the dense buffers; one ``TidalState`` per step
                              shared by the layers (a new one at layer 0)
============================  ================================================

A batch whose mask is not plain left padding (right padding), and a padded
batch under a sparse method (the sparse caches advance all rows together),
keep full buffers and run each step as append + ``longattn.attention`` over
the packed valid tokens: exact, but a pass over the cache.

Under ``torch.compile`` the mask is never read on the host (no graph break):
dense layers take a mask as left padding, the sparse variants as no padding,
each checked by an asynchronous assert that raises a ``RuntimeError`` when
the compiled step runs; right padding or padded sparse batches need an
uncompiled model. (A compiled dense model given an all-ones mask decodes
through ``cache_leftpad`` of zeros: correct, somewhat slower than no mask.)

Gemma-2 style models that mix sliding and full layers keep every token in
every layer: the sliding layers' window is applied by the kernel
(``window_size``), so results are exact; the memory is that of full layers.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from longattn.api import attention
from longattn.decode_api import decode_attention
from longattn.errors import ArgumentError, UnsupportedFeatureError
from longattn.integrations.transformers_names import is_decode_time, sparse_config
from longattn.integrations.transformers_unpad import (
    any_unpadded_attention,
    assert_left_padded,
    first_valid,
    left_padding,
    traced_unpadded_attention,
    unpadded_attention,
    valid_runs,
)

# The key under which LongAttnLayer.update hands a step's new tokens to the
# attention function.
HANDOFF = "_longattn_pending"

from transformers.cache_utils import Cache, CacheLayerMixin  # noqa: E402 - the module needs transformers

__all__ = ["LongAttnCache", "LongAttnLayer", "HANDOFF"]

_COMPILED_DENSE_RULE = ("a padded batch must be left-padded (pads, then valid tokens), with the same padding at "
                        "every step: the mask is not read on the host while compiled")
_COMPILED_SPARSE_RULE = ("the sparse variants take no padding while compiled (the mask is not read on the host); "
                         "run padded batches uncompiled")


class LongAttnLayer(CacheLayerMixin):
    """One layer of a :class:`LongAttnCache` (see the module docstring).

    Attributes (full-buffer storage):
        k_buf, v_buf: ``(batch, capacity, nheads_k, headdim)`` in longattn's
            layout; with ``page_size`` a view of the pages.
        k_pages, v_pages, block_table: with ``page_size``: ``(batch * pages,
            page_size, nheads_k, headdim)`` and ``(batch, pages)`` int32.
        lengths: ``(batch,)`` int32 slots filled per row (padding included:
            flash-attn's ``cache_seqlens`` rule).
        leftpad: ``(batch,)`` int32 leading pad slots, or None.
        store: the Streaming/Duo cache object for those methods.
        length: tokens held (a host int: positions of the next step start here).
    """

    is_compileable = False
    is_croppable = True

    def __init__(self, layer_idx: int, max_cache_len: int, page_size: int | None, impl_of: Callable[[], Any],
                 shared: dict | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.shared = {} if shared is None else shared  # state shared by a cache's layers (TidalDecode's selection)
        self.max_cache_len = max_cache_len
        self.page_size = page_size
        self._impl_of = impl_of
        self._clear()

    def _clear(self) -> None:
        self.length = 0
        self.mode: str | None = None  # "full", "fallback" (full buffers, unpadded passes), "store"
        self.k_buf = self.v_buf = self.k_pages = self.v_pages = self.block_table = None
        self.lengths = self.leftpad = self.store = self.hip_state = None
        # A decode-time method's state outlives a reset (emptied, it refills itself
        # at its next step): compiled steps hold it by handle.
        state = getattr(self, "selection_state", None)
        if state is not None:
            state.reset()
        self.selection_state = state
        self.keys = self.values = None
        self.is_initialized = False

    # -- transformers' side ---------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate yet: storage depends on the method and the mask (first ``attend``)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Hand ``(batch, nheads_k, n, headdim)`` new tokens to longattn's attention function.

        Returns them unchanged: the attention function takes keys and values
        from this layer, not from the return value. Called without the
        attention kwargs (outside a transformers attention module) the
        tokens are appended and the filled views returned.
        """
        impl = self._impl_of()
        if not (isinstance(impl, str) and impl.startswith("longattn")):
            raise UnsupportedFeatureError(
                f"LongAttnCache serves attn_implementation='longattn*' only, the model uses {impl!r}: "
                "its steps attend inside longattn's attention function")
        attn_kwargs = kwargs.get("kwargs")
        if not isinstance(attn_kwargs, dict):  # tokens stored without attending (e.g. a prompt's K/V loaded)
            k, v = key_states.transpose(1, 2), value_states.transpose(1, 2)
            self._check_room(k.shape[1])
            if self.mode is None:
                self._hold_prompt(k, v, None, 0.0, sparse_config(impl, self.layer_idx))
            elif self.mode == "store":
                self.store.append(k, v)
                self.length += k.shape[1]
            else:
                self._write(k, v)
            if self.mode == "store":
                return key_states, value_states  # evicted tokens are gone: only the new ones to return
            return self.keys[:, :, :self.length], self.values[:, :, :self.length]
        self._check_room(key_states.shape[2])
        attn_kwargs[HANDOFF] = self
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        """Forget every token (storage is reallocated by the next prefill)."""
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (transformers 5: a negative
        count); a positive value is the length to keep (transformers 4's
        ``max_length``); 0 does nothing. Sparse caches that evicted tokens
        (Streaming/Duo) cannot go back and raise."""
        n = int(tokens_to_remove)
        keep = self.length + n if n < 0 else (self.length if n == 0 else min(n, self.length))
        if keep < 0:
            raise ArgumentError(f"crop({tokens_to_remove}) removes more than the {self.length} tokens held")
        if keep == self.length:
            return
        if self.mode == "store":
            raise UnsupportedFeatureError("a Streaming/Duo LongAttnCache layer has evicted tokens and cannot be "
                                          "cropped; use the dense or HiP variant for assisted generation")
        self.length = keep
        self.lengths.fill_(keep)
        if self.leftpad is not None:
            self.leftpad.clamp_(max=keep)
        if self.hip_state is not None:
            self.hip_state.reset()  # its selection may list dropped keys
        if self.selection_state is not None:
            self.selection_state.reset()  # rebuilt from the cache at the next step

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep (or repeat) the rows ``indices`` (beam search, contrastive search)."""
        if self.mode is None:
            return
        if self.mode == "store":
            raise UnsupportedFeatureError("Streaming/Duo LongAttnCache layers do not support beam search yet")
        idx = indices.to(self.k_buf.device)
        k, v = self.k_buf.index_select(0, idx), self.v_buf.index_select(0, idx)
        leftpad = None if self.leftpad is None else self.leftpad.index_select(0, idx)
        length, mode = self.length, self.mode
        if self.selection_state is not None:
            self.selection_state.reset()
        if self.hip_state is not None:
            self.hip_state.reset()
        self._allocate_full(k, v, mode)
        self.k_buf.copy_(k)
        self.v_buf.copy_(v)
        self.length, self.leftpad = length, leftpad
        self.lengths.fill_(length)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.mode is not None and self.k_buf is not None:
            rows = torch.arange(self.k_buf.shape[0], device=self.k_buf.device).repeat_interleave(repeats)
            self.batch_select_indices(rows)

    # -- storage --------------------------------------------------------------

    def _check_room(self, n: int) -> None:
        if self.length + n > self.max_cache_len:
            raise ArgumentError(f"LongAttnCache max_cache_len={self.max_cache_len} is too small: "
                                f"{self.length} tokens held + {n} new")

    def _allocate_full(self, k: torch.Tensor, v: torch.Tensor, mode: str) -> None:
        """Full buffers for ``k, v (batch, n, nheads_k, headdim)``'s batch, heads, dtype, device."""
        b, _, hk, d = k.shape
        dv = v.shape[-1]
        opts = dict(dtype=k.dtype, device=k.device)
        if self.page_size is None:
            self.k_buf = torch.zeros(b, self.max_cache_len, hk, d, **opts)
            self.v_buf = torch.zeros(b, self.max_cache_len, hk, dv, **opts)
            self.k_pages = self.v_pages = self.block_table = None
        else:
            pages = math.ceil(self.max_cache_len / self.page_size)
            self.k_pages = torch.zeros(b * pages, self.page_size, hk, d, **opts)
            self.v_pages = torch.zeros(b * pages, self.page_size, hk, dv, **opts)
            # Row b owns pages b*pages .. (b+1)*pages - 1, in order: the rows are
            # also views of the same memory (used for padded batches' steps).
            self.block_table = torch.arange(b * pages, dtype=torch.int32, device=k.device).view(b, pages)
            self.k_buf = self.k_pages.view(b, pages * self.page_size, hk, d)
            self.v_buf = self.v_pages.view(b, pages * self.page_size, hk, dv)
        self.lengths = torch.zeros(b, dtype=torch.int32, device=k.device)
        self.keys, self.values = self.k_buf.transpose(1, 2), self.v_buf.transpose(1, 2)
        self.length, self.leftpad, self.mode = 0, None, mode
        self.is_initialized = True

    def _write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[1]
        self.k_buf[:, self.length:self.length + n].copy_(k)
        self.v_buf[:, self.length:self.length + n].copy_(v)
        self._advance(n)

    def _advance(self, n: int) -> None:
        self.length += n
        self.lengths.fill_(self.length)

    # -- attention ------------------------------------------------------------

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               opts: dict, sparse: object | None) -> torch.Tensor:
        """Attend ``q (batch, n, nheads, headdim)`` over the held tokens and the
        step's ``k, v (batch, n, nheads_k, headdim)``, then hold those too.

        ``mask``: the adapter's ``(batch, length + n)`` bool mask of valid
        keys, or None; ``opts``: ``causal``, ``softmax_scale``,
        ``window_size``, ``softcap`` for ``longattn.attention``.
        """
        if self.mode is None:
            return self._prefill(q, k, v, mask, opts, sparse)
        compiling = torch.compiler.is_compiling()
        if self.mode == "store":
            if mask is not None:
                if not compiling:
                    raise UnsupportedFeatureError("padding appeared after an unpadded prompt in a Streaming/Duo "
                                                  "LongAttnCache; pass the same attention_mask from the first step")
                assert_left_padded(mask, None, _COMPILED_SPARSE_RULE)
            return self._store_step(q, k, v, opts)
        if self.mode == "full":
            if mask is None:  # no padding, or the prompt's (known) left padding
                return self._decode(q, k, v, opts, sparse, leftpad=self.leftpad)
            if compiling:  # the mask is not read on the host: it must continue the prompt's padding
                assert_left_padded(mask, self.leftpad, _COMPILED_SPARSE_RULE if sparse is not None
                                   else _COMPILED_DENSE_RULE)
                return self._decode(q, k, v, opts, sparse, leftpad=self.leftpad)
            if mask is not None and sparse is None:
                # The step's mask must be the prompt's left padding followed by valid keys.
                pads = left_padding(mask)
                if pads is not None and (self.leftpad is None or torch.equal(pads, self.leftpad)):
                    self.leftpad = pads
                    return self._decode(q, k, v, opts, sparse, leftpad=pads)
            self.mode = "fallback"
        return self._fallback(q, k, v, mask, opts, sparse)

    def _prefill(self, q, k, v, mask, opts, sparse):
        if is_decode_time(sparse):  # Quest, Double Sparsity, TidalDecode: dense prefill, selection at decode
            if mask is not None:
                if not torch.compiler.is_compiling():
                    raise UnsupportedFeatureError(f"{type(sparse).__name__} decodes unpadded batches only; drop "
                                                  "the padding (batch size 1, or equal lengths)")
                assert_left_padded(mask, None, _COMPILED_SPARSE_RULE)
            self._hold_prompt(k, v, None, opts["softcap"], sparse)
            return attention(q, k, v, **opts)
        if mask is not None and torch.compiler.is_compiling():
            # Storage cannot depend on the mask's values (no host read): dense
            # layers take it as left padding, sparse ones as no padding, each
            # checked asynchronously.
            if sparse is None:
                pads = first_valid(mask)
                assert_left_padded(mask, pads, _COMPILED_DENSE_RULE)
                self._hold_prompt(k, v, None, opts["softcap"], sparse)
                self.leftpad = pads
                return traced_unpadded_attention(q, k, v, mask, sparse=sparse, **opts)
            assert_left_padded(mask, None, _COMPILED_SPARSE_RULE)
            mask = None
        if mask is not None:
            valid_runs(mask)  # raises on pads inside a row before anything is held
        self._hold_prompt(k, v, mask, opts["softcap"], sparse)
        if mask is None:
            return attention(q, k, v, sparse=sparse, **opts)
        return unpadded_attention(q, k, v, mask, sparse=sparse, **opts)

    def _hold_prompt(self, k, v, mask, softcap, sparse) -> None:
        """Choose this layer's storage for ``sparse`` (module docstring) and hold
        the prompt's ``k, v (batch, n, nheads_k, headdim)``."""
        from longattn.sparse import Duo, DuoCache, HiP, Streaming, StreamingCache

        if mask is None and (isinstance(sparse, Streaming) or (isinstance(sparse, Duo) and not softcap)):
            b, _, hk, d = k.shape
            if isinstance(sparse, Streaming):
                store = StreamingCache(sparse, b, hk, d, dtype=k.dtype, device=k.device)
            else:  # DuoCache's step has no softcap: Duo with softcap keeps full buffers
                store = DuoCache(sparse, b, self.max_cache_len, hk, d, dtype=k.dtype, device=k.device)
            store.append(k, v)
            self.store, self.mode, self.length, self.is_initialized = store, "store", k.shape[1], True
            return
        pads = None if mask is None else left_padding(mask)
        # Dense decodes with or without left padding; HiP only unpadded (its
        # search runs per row of equal length); anything else unpads each step.
        if sparse is None:
            mode = "full" if mask is None or pads is not None else "fallback"
        else:
            mode = "full" if mask is None and (isinstance(sparse, HiP) or is_decode_time(sparse)) else "fallback"
        self._allocate_full(k, v, mode)
        self._write(k, v)
        self.leftpad = pads if mode == "full" else None

    def _store_step(self, q, k, v, opts):
        from longattn.sparse import StreamingCache

        if isinstance(self.store, StreamingCache):
            out = self.store.step(q, k, v, softmax_scale=opts["softmax_scale"], softcap=opts["softcap"])
        else:
            out = self.store.step(q, k, v, softmax_scale=opts["softmax_scale"])
        self.length += k.shape[1]
        return out

    def _decode(self, q, k, v, opts, sparse, *, leftpad):
        from longattn.sparse import HiP

        extra: dict[str, Any] = {}
        if isinstance(sparse, HiP):
            if self.hip_state is None:
                from longattn.sparse import HiPDecodeState

                self.hip_state = HiPDecodeState()
            extra = dict(sparse=sparse, state=self.hip_state)
        elif is_decode_time(sparse):
            extra = dict(sparse=sparse, state=self._selection_state(sparse))
        elif sparse is not None:  # pragma: no cover - Streaming/Duo without padding use their stores
            raise AssertionError(f"unexpected sparse method {sparse!r} on a full LongAttnCache layer")
        if leftpad is not None:
            extra["cache_leftpad"] = leftpad
            kc, vc = self.k_buf, self.v_buf
        elif self.block_table is not None:
            extra["block_table"] = self.block_table
            kc, vc = self.k_pages, self.v_pages
        else:
            kc, vc = self.k_buf, self.v_buf
        out = decode_attention(q, kc, vc, cache_seqlens=self.lengths, k_new=k, v_new=v, **extra, **opts)
        self._advance(k.shape[1])
        return out

    def _selection_state(self, sparse):
        """The state ``sparse`` keeps: this layer's Quest/Double Sparsity state
        (it fills itself from the cache on its first step), or the TidalDecode
        selection shared by the layers of one step (a new one at layer 0)."""
        from longattn.sparse import DoubleSparsityState, QuestState, TidalLayer, TidalState

        if isinstance(sparse, TidalLayer):
            # One TidalState for every step: each step's selection layer overwrites it
            # before the layers after it read it.
            if "tidal" not in self.shared:
                self.shared["tidal"] = TidalState()
            return self.shared["tidal"]
        if self.selection_state is None or self.selection_state.config != sparse:
            kind = QuestState if type(sparse).__name__ == "Quest" else DoubleSparsityState
            self.selection_state = kind(sparse)
        return self.selection_state

    def make_states(self) -> None:
        """Create the decode-time method's state now (eagerly), if the model's
        attention implementation names one: under torch.compile a state must
        exist before the traced steps (it is stepped through its handle)."""
        impl = self._impl_of()
        if not (isinstance(impl, str) and impl.startswith("longattn")):
            return
        try:
            sparse = sparse_config(impl, self.layer_idx)
        except UnsupportedFeatureError:  # a name registered later: states are made at its first step
            return
        if is_decode_time(sparse):
            self._selection_state(sparse)

    def _fallback(self, q, k, v, mask, opts, sparse):
        if mask is not None and not torch.compiler.is_compiling():
            valid_runs(mask)  # raises on pads inside a row before anything is written
        self._write(k, v)
        kt, vt = self.k_buf[:, :self.length], self.v_buf[:, :self.length]
        if mask is None:
            return attention(q, kt, vt, sparse=sparse, **opts)
        return any_unpadded_attention(q, kt, vt, mask, sparse=sparse, **opts)


class LongAttnCache(Cache):
    """A transformers ``Cache`` whose steps run through :func:`longattn.decode_attention`.

    ``model.generate(..., past_key_values=LongAttnCache(model.config, max_cache_len=N))``
    (``cache=`` in transformers 5.x): each layer holds up to ``max_cache_len``
    tokens per sequence; a decode step is one ``decode_attention`` call that
    appends the new keys and values in place (dense, HiP), or the Streaming /
    Duo cache's step (constant memory for streaming heads). See the module
    docstring for what each method stores and the padded cases.

    Args:
        config: the model's config (``num_hidden_layers``).
        max_cache_len: tokens per sequence (prompt + generated); exceeding it raises.
        page_size: None (contiguous buffers) or tokens per page: the cache is
            then paged ``(num_pages, page_size, nheads_k, headdim)`` with a
            block table, read by the paged decode kernel.

    Used under an attention implementation that is not longattn's, ``update``
    raises :class:`~longattn.errors.UnsupportedFeatureError`.
    """

    def __init__(self, config, max_cache_len: int, *, page_size: int | None = None):
        if not isinstance(max_cache_len, int) or isinstance(max_cache_len, bool) or max_cache_len < 1:
            raise ArgumentError(f"max_cache_len must be a positive int, got {max_cache_len!r}")
        if page_size is not None and (not isinstance(page_size, int) or isinstance(page_size, bool)
                                      or page_size < 1):
            raise ArgumentError(f"page_size must be None or a positive int, got {page_size!r}")
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        impl_of = lambda: getattr(cfg, "_attn_implementation", None)  # noqa: E731 - read at each update
        shared: dict = {}
        layers = [LongAttnLayer(i, max_cache_len, page_size, impl_of, shared) for i in range(cfg.num_hidden_layers)]
        super().__init__(layers=layers)
        for layer in layers:  # (after the layers exist: states of decode-time methods, made eagerly)
            layer.make_states()
