"""The public front door for decode: :func:`decode_attention`.

A call runs in four steps, and only the last two touch the cache:

1. checks that read no tensor data (types, shapes, dtypes, devices, options,
   the plan against the cache's shape, the sparse method);
2. checks that read data on the host (``cache_seqlens`` once, the used part
   of ``block_table``): lengths >= 0, overflow, block_table ranges, pages
   shared with a sequence that writes into them, a reused plan against the
   lengths; then the backend is selected (a forced backend that cannot serve
   raises here);
3. ``k_new, v_new`` are written into the cache in place;
4. the twin runs.

So a call that raises leaves ``k_cache``, ``v_cache`` and ``cache_seqlens``
bitwise unchanged. Step 2 runs when ``check`` says so (see
:func:`decode_attention`): free on a CPU, a host sync on a GPU.

flash-attn's extras map onto the same steps: ``cache_batch_idx`` and
``cache_leftpad`` become a block table over the same cache memory (whole rows
as pages, or one token per page with a leftpad; see
:func:`longattn.kernels.decode.cache.row_view`), checked in steps 1-2 like
any argument; rotary embedding (:mod:`longattn.kernels.decode.rotary`) makes
rotated copies of q and ``k_new`` between steps 2 and 3.

Under ``torch.compile`` step 1 is traced and steps 2-4 are one
``torch.library`` custom op, so a step traces with ``fullgraph=True`` (with
a reused plan or none); the op performs the data checks when it runs, and a
call that raises there still writes nothing:

- ``longattn::decode_step`` (no new tokens; reads the caches) and
  ``longattn::decode_step_append`` (mutates ``k_cache``, ``v_cache``);
- with any of the extras (``cache_batch_idx``, ``cache_leftpad``, rotary):
  ``longattn::decode_step_extras`` and ``longattn::decode_step_extras_append``,
  which take them as optional tensors and run the same code as an eager call;
- ``sparse=HiP(...)``: ``longattn::hip_decode_step``, which also mutates the
  state, held as tensors (:meth:`~longattn.sparse.HiPDecodeState.as_tensors`:
  a graph cannot update a Python object from lengths it reads when it runs).
- Quest, DoubleSparsity and TidalDecode: ``longattn::token_sparse_step``,
  which mutates the caches and steps the caller's state object found through
  the integer handle it got at construction (states are Python objects
  sized by the lengths; the graph holds only the handle, so create states
  outside the compiled region). With ``return_selection`` the selection is
  -1 padded to the method's widest (Quest ``(budget // page_size + 1) *
  page_size``, the others ``token_budget``).

The plan crosses the op boundary as ints
(:func:`~longattn.kernels.decode.plan.plan_spec`), ``check`` as -1 (None), 0, 1.
"""

from __future__ import annotations

import functools

import torch

from longattn.errors import ArgumentError, UnsupportedFeatureError
from longattn.kernels.decode import CPP, DECODE_BACKENDS, DecodeCall
from longattn.kernels.decode.cache import (
    CacheArgs,
    append_new,
    attended_seqlens,
    check_cache_data,
    check_cache_layout,
    check_row_data,
    check_row_layout,
    row_view,
)
from longattn.kernels.decode.cpp import decode_forward_cpu, default_plan_for
from longattn.kernels.decode.plan import DecodePlan, plan_from_spec, plan_spec
from longattn.kernels.decode.rotary import check_rotary_data, check_rotary_layout, rotate_step
from longattn.validation import check_attention_options, check_tensor


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None = None,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    rotary_interleaved: bool = True,
    softmax_scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    sparse: object | None = None,
    state: object | None = None,
    plan: DecodePlan | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    check: bool | None = None,
    return_selection: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Attention of a few new queries over a KV cache; ``flash_attn_with_kvcache`` semantics.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``; seqlen_q is 1 for plain
            decode, more for speculative or chunked steps.
        k_cache, v_cache: contiguous ``(batch, max_seqlen, nheads_k, headdim)``,
            or paged ``(num_pages, page_size, nheads_k, headdim)`` with
            ``block_table``. Same dtype and device as q.
        cache_seqlens: ``(batch,)`` int32, tokens already in each sequence's
            cache. Read only: the caller advances it after appending. (This
            is what flash-attn's varlen kernel calls ``seqused_k``: keys past
            it are never read; varlen calls take ``seqused_k`` by that name.)
        block_table: ``(batch, max_pages)`` int32 page indices (paged cache);
            any page order, any page_size >= 1. Sequences may share pages
            they only read (a common prefix), but a page that receives one
            sequence's new tokens must appear in no other entry in use.
        k_new, v_new: ``(batch, seqlen_new, nheads_k, headdim)``, written into
            the cache **in place** at ``cache_seqlens[b] ...`` before attending
            (after every check passed: a call that raises writes nothing).
        cache_batch_idx: ``(batch,)`` int32, contiguous cache only: sequence
            ``b`` lives in cache row ``cache_batch_idx[b]`` (k_cache then has
            any number of rows ``batch_cache``). Rows may repeat only when no
            new tokens are appended (two writers of one row are refused).
        cache_leftpad: ``(batch,)`` int32, contiguous cache only: sequence
            ``b``'s tokens start at slot ``cache_leftpad[b]`` of its row; the
            slots before it are never read. ``cache_seqlens`` still counts
            from the row start (flash-attn's rule): the sequence holds slots
            ``cache_leftpad[b] .. cache_seqlens[b] - 1``, new tokens go to
            ``cache_seqlens[b] ...``, ``0 <= cache_leftpad[b] <= cache_seqlens[b]``
            and the attended length is ``L_b = cache_seqlens[b] -
            cache_leftpad[b] + seqlen_new``. Both map onto the paged kernels
            through a block table over the same memory (no copy).
        rotary_cos, rotary_sin: ``(seqlen_ro, rotary_dim / 2)`` (any float
            dtype, q's device; rotary_dim <= headdim, channels past it are
            left alone). Rotate ``k_new`` before it is written and q, as
            flash-attn does: new key ``i`` at position ``cache_seqlens[b] + i``
            (its slot in the row, leftpad included); query ``i`` at
            ``cache_seqlens[b] + i`` when the attention is causal or local
            (``window_size != (-1, -1)``), else every query at
            ``cache_seqlens[b]``. Needs ``k_new``; math in float32.
        rotary_interleaved: True (flash-attn's default, GPT-J) rotates channel
            pairs ``(0, 1), (2, 3), ...``; False (GPT-NeoX, Llama) pairs
            ``(i, i + rotary_dim / 2)``.
        causal: bottom-right within each sequence: with ``L_b = cache_seqlens[b]
            + seqlen_new`` (minus ``cache_leftpad[b]``), query ``i`` sits at key position ``L_b - seqlen_q + i``
            and sees keys up to it. seqlen_q=2, L_b=5::

                1 1 1 1 0
                1 1 1 1 1

        window_size, softcap, softmax_scale: as in :func:`longattn.attention`.
        sparse, state: a sparse decode method and the state object it keeps
            between steps of one layer (the caller holds it):

            - ``sparse=HiP(...)``, ``state=HiPDecodeState()`` (see
              :mod:`longattn.sparse.hip_decode`; ``state=None`` searches every
              step). Under ``torch.compile`` the state lives in tensors (see
              :class:`~longattn.sparse.HiPDecodeState`'s ``compiled``).
            - ``sparse=Quest(...)``, ``state=QuestState(config)`` (page min/max
              metadata, :mod:`longattn.sparse.quest`) and
              ``sparse=DoubleSparsity(channels, ...)``,
              ``state=DoubleSparsityState(config)`` (label cache,
              :mod:`longattn.sparse.double_sparsity`): the state is built once
              by ``state.prefill(k_cache, cache_seqlens, block_table)`` (or by
              the first step, from the cache) and updated by every step with
              the keys it appends; it must cover exactly ``cache_seqlens``
              tokens per sequence (else an ArgumentError, nothing written).
              ``state=None`` rebuilds it from the whole cache every step.
            - ``sparse=TidalDecode(...).layer(i)``, ``state=TidalState()``: one
              state per decode step shared by all layers of the step (see
              :mod:`longattn.sparse.tidal`); dense and selection layers run
              dense decode, reuse layers need the state their selection layer
              filled.

            Quest, DoubleSparsity and TidalDecode take ``seqlen_q == 1``
            (else UnsupportedFeatureError); per kv head they select token
            positions (each sequence over its own length; contiguous or
            paged cache) and attend exactly those through
            :func:`longattn.kernels.gather.gather_decode`. The order of a
            call: layout checks, data checks (lengths, block_table, the state
            against this batch and config), append ``k_new``, update the
            state, select, attend. Sparse decode takes no ``window_size``
            or ``plan``, ``backend`` "auto" or "eager", always checks (the
            selection reads the lengths on the host anyway); every method
            traces under ``torch.compile`` as one custom op (module docstring).
        plan: a stream-K :class:`~longattn.decode.DecodePlan` from
            :func:`~longattn.decode.plan_decode` over the lengths ``L_b``, to
            reuse one schedule across layers; None plans per call (on a GPU
            that reads the lengths on the host). A plan is the caller's
            promise that its ``seqlens`` are the ``L_b``: the kernels take the
            lengths from it, so a reused plan makes the step sync-free. Its
            batch, ``nheads_k`` and longest length against the cache's
            capacity are always checked (host values); the lengths
            themselves when ``check`` is on.
        backend: ``"auto"`` or a twin name (``longattn doctor`` lists them).
        return_lse: also return lse ``(batch, nheads, seqlen_q)`` float32.
        return_selection: (Quest, DoubleSparsity, TidalDecode only) also
            return the ``(batch, nheads_k, n)`` int32 token positions attended
            this step, one list per kv head shared by its query group:
            positions ascending, then ``-1`` padding (n is the longest list of
            the batch); a dense Tidal layer lists every position.
        check: the checks that read tensor data (``cache_seqlens >= 0``,
            overflow, ``block_table`` entries in range and no page written by
            one sequence and used by another entry, a plan's lengths).
            ``None`` (default): check when the tensors are on the CPU (where
            reading them is free), skip on a GPU (where it would be a host
            sync per call); ``True``: always (a sync on a GPU: use while
            debugging, or once per batch); ``False``: never (invalid data is
            then undefined behaviour, as in flash-attn).

    Returns:
        ``out`` like q, then ``lse`` if ``return_lse``, then ``selection`` if
        ``return_selection``: ``out``, ``(out, lse)``, ``(out, selection)`` or
        ``(out, lse, selection)``. A sequence with no visible key gets out 0
        and lse -inf.

    Raises:
        A :class:`~longattn.errors.LongAttnError` subclass naming the argument
        for any bad input, before anything is written.

    Example::

        out = longattn.decode_attention(q, k_cache, v_cache, cache_seqlens=lens,
                                        k_new=k_step, v_new=v_step)
        lens += 1
    """
    q = check_tensor("q", q, 4, "(batch, seqlen_q, nheads, headdim)")
    causal, return_lse, scale, window, softcap = check_attention_options(
        q.shape[-1], causal, return_lse, softmax_scale, window_size, softcap
    )
    if check is not None and check is not True and check is not False:
        raise ArgumentError(f"check must be None, True or False, got {check!r}")
    if return_selection is not True and return_selection is not False:
        raise ArgumentError(f"return_selection must be a bool, got {return_selection!r}")
    if sparse is not None:
        _check_sparse_decode(sparse, window, causal, plan, backend)
    elif state is not None:
        raise UnsupportedFeatureError(f"state={state!r}: decode state objects belong to sparse methods; pass None")
    token_sparse = sparse is not None and _is_token_sparse(sparse)
    if return_selection and not token_sparse:
        raise UnsupportedFeatureError(
            f"return_selection=True needs sparse=Quest(...), DoubleSparsity(...) or a TidalDecode layer, got "
            f"sparse={sparse!r}"
        )
    if (cache_batch_idx is not None or cache_leftpad is not None or rotary_cos is not None
            or rotary_sin is not None or rotary_interleaved is not True):
        return _decode_extras(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, cache_batch_idx,
                              cache_leftpad, rotary_cos, rotary_sin, rotary_interleaved, scale=scale, causal=causal,
                              window=window, softcap=softcap, sparse=sparse, plan=plan, backend=backend,
                              return_lse=return_lse, check=check)
    args = check_cache_layout(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new)
    if token_sparse:
        if torch.compiler.is_compiling():
            out, lse, selection = _traced_token_step(q, args, sparse, state, scale=scale, softcap=softcap,
                                                     backend=backend, return_selection=return_selection)
        else:
            out, lse, selection = _token_sparse_step(q, args, sparse, state, scale=scale, softcap=softcap,
                                                     backend=backend, return_selection=return_selection)
        result = (out, lse) if return_lse else (out,)
        if return_selection:
            result = (*result, selection)
        return result if len(result) > 1 else out
    if sparse is not None:
        if torch.compiler.is_compiling():
            out, lse = _traced_hip_step(q, args, sparse, state, scale=scale, softcap=softcap, causal=causal)
        else:
            out, lse = _sparse_decode(q, args, sparse, state, scale=scale, softcap=softcap, causal=causal)
        return (out, lse) if return_lse else out
    if plan is not None:
        _check_plan_layout(plan, q, args)
    if type(backend) is not str:
        raise ArgumentError(f"backend must be 'auto' or one of {DECODE_BACKENDS.names}, got {backend!r}")
    if torch.compiler.is_compiling():
        out, lse = _traced_step(q, args, scale, window, softcap, plan, backend, check)
    else:
        out, lse = run_decode(q, args, scale=scale, window=window, softcap=softcap, plan=plan, backend=backend,
                              check=check)
    return (out, lse) if return_lse else out


def run_decode(
    q: torch.Tensor,
    args: CacheArgs,
    *,
    scale: float,
    window: tuple[int, int],
    softcap: float,
    plan: DecodePlan | None,
    backend: str,
    check: bool | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-4 of the module docstring over layout-checked ``args``."""
    if check is None:
        check = q.device.type == "cpu"
    seqlen_new = args.seqlen_new
    lengths = None  # cache_seqlens as host ints, once read
    if check:
        lengths = args.cache_seqlens.tolist()
        check_cache_data(args, lengths)
        if plan is not None:
            _check_plan_lengths(plan, lengths, seqlen_new)
    # Selection reads q only (device, dtype, headdim): the view's lengths are filled in below.
    twin = DECODE_BACKENDS.select(DecodeCall(q, args.view(args.cache_seqlens), scale, window, softcap, plan), backend)
    if twin is CPP:
        if plan is None:
            # The C++ twin's default plan (cached by lengths), from the lengths
            # already read (on a CPU, where this twin runs, reading them is free).
            if lengths is None:
                lengths = args.cache_seqlens.tolist()
            plan = default_plan_for(tuple(n + seqlen_new for n in lengths), args.k_cache.shape[2])
        append_new(args, lengths)
        # Called directly (the hot CPU path): no second call object.
        return decode_forward_cpu(q, args.k_cache, args.v_cache, plan.as_tensors("cpu")["seqlens"], args.block_table,
                                  scale=scale, window=window, softcap=softcap, plan=plan)
    # A plan carries the lengths (the caller's promise, verified above when
    # checking): the kernels read them from its cached tensors, no device op.
    seqlens = plan.as_tensors(q.device)["seqlens"] if plan is not None else attended_seqlens(args, lengths)
    call = DecodeCall(q, args.view(seqlens), scale, window, softcap, plan)
    append_new(args, lengths)
    return twin.run(call)


def _check_plan_lengths(plan: DecodePlan, lengths: list[int], seqlen_new: int) -> None:
    totals = tuple(n + seqlen_new for n in lengths)
    if totals != plan.seqlens:
        raise ArgumentError(
            f"plan was made for seqlens {list(plan.seqlens)}, but this call attends seqlens "
            f"{list(totals)} (cache_seqlens + seqlen_new {seqlen_new}); plan with the lengths after appending"
        )


# --- cache_batch_idx, cache_leftpad, rotary -----------------------------------

def _decode_extras(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, cache_batch_idx, cache_leftpad,
                   rotary_cos, rotary_sin, rotary_interleaved, *, scale, causal, window, softcap, sparse, plan,
                   backend, return_lse, check):
    """flash-attn's extras mapped onto the plain step: every check (layout, then
    data), then rotary on q and k_new (new tensors), then run_decode over a
    paged view of the selected rows (same memory). Nothing is written before
    run_decode's append."""
    if sparse is not None:
        raise UnsupportedFeatureError("cache_batch_idx, cache_leftpad and rotary_cos/rotary_sin cannot be combined "
                                      "with sparse= yet")
    if type(backend) is not str:
        raise ArgumentError(f"backend must be 'auto' or one of {DECODE_BACKENDS.names}, got {backend!r}")
    check_rotary_layout(q, k_new, rotary_cos, rotary_sin, rotary_interleaved)
    rows = cache_batch_idx is not None or cache_leftpad is not None
    select = None
    if rows:
        select = check_row_layout(q, k_cache, v_cache, block_table, cache_batch_idx, cache_leftpad)
        # The rest of the layout (dtypes, devices, heads, k_new) on a stand-in view of row 0..batch-1.
        probe = check_cache_layout(q, k_cache, v_cache, cache_seqlens, k_cache.new_zeros((q.shape[0], 1),
                                   dtype=torch.int32), k_new, v_new)
    else:
        probe = check_cache_layout(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new)
    if plan is not None:
        _check_plan_layout(plan, q, probe)
    if torch.compiler.is_compiling():
        # The layout checks above ran while tracing; the rest (data checks,
        # rotary, the row view, the step) is one custom op that runs this
        # function again, eagerly.
        out, lse = _traced_extras(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, cache_batch_idx,
                                  cache_leftpad, rotary_cos, rotary_sin, rotary_interleaved, scale, window, softcap,
                                  plan, backend, check)
        return (out, lse) if return_lse else out
    seqlen_new = probe.seqlen_new
    if check is None:
        check = q.device.type == "cpu"
    lengths = None
    if check:
        lengths = probe.cache_seqlens.tolist()
        if rows:
            check_row_data(k_cache, select, lengths, seqlen_new)
            if plan is not None:
                pads = select.leftpad.tolist() if select.leftpad is not None else [0] * len(lengths)
                _check_plan_lengths(plan, [n - p for n, p in zip(lengths, pads)], seqlen_new)
        if rotary_cos is not None:
            check_rotary_data(rotary_cos, lengths, q.shape[1], seqlen_new, window != (-1, -1))
    if rotary_cos is not None:
        q, k_new = rotate_step(q, k_new, rotary_cos, rotary_sin, cache_seqlens, per_query=window != (-1, -1),
                               interleaved=rotary_interleaved)
    if rows:
        k_view, v_view, table, view_lens = row_view(k_cache, v_cache, cache_seqlens, select, lengths, seqlen_new)
        args = check_cache_layout(q, k_view, v_view, view_lens, table, k_new, v_new)
        # The row checks above cover the view's data checks (the table is in range
        # and no two sequences write one row by construction): skip the second pass.
        check = False
    else:
        args = check_cache_layout(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new)
    out, lse = run_decode(q, args, scale=scale, window=window, softcap=softcap, plan=plan, backend=backend,
                          check=check)
    return (out, lse) if return_lse else out


def _check_plan_layout(plan: object, q: torch.Tensor, args: CacheArgs) -> None:
    """What can be checked of a reused plan from host values alone."""
    if not isinstance(plan, DecodePlan):
        raise ArgumentError(f"plan must be a DecodePlan from longattn.decode.plan_decode, got {type(plan).__name__}")
    batch, nheads_k = q.shape[0], args.k_cache.shape[2]
    if len(plan.seqlens) != batch or plan.nheads_k != nheads_k:
        raise ArgumentError(
            f"plan was made for seqlens {list(plan.seqlens)} (batch {len(plan.seqlens)}) and nheads_k "
            f"{plan.nheads_k}, but this call has batch {batch} and nheads_k {nheads_k}"
        )
    longest = max(plan.seqlens) if plan.seqlens else 0  # (no default=: torch.compile traces this)
    if longest > args.capacity:
        raise ArgumentError(
            f"plan was made for seqlens {list(plan.seqlens)}, but the cache holds {args.capacity} tokens per "
            "sequence (cache overflow)"
        )


# --- sparse -------------------------------------------------------------------

def _check_sparse_decode(sparse, window, causal, plan, backend) -> None:
    from longattn.sparse import DoubleSparsity, HiP, Quest, TidalLayer

    if isinstance(sparse, HiP):
        name = "HiP"
        own = "it has its own sink_size and recent_size"
    elif isinstance(sparse, (Quest, DoubleSparsity, TidalLayer)):
        name = type(sparse).__name__
        own = "it selects its own tokens"
    else:
        extra = ""
        if type(sparse).__name__ == "TidalDecode":
            extra = "; pass one layer's config, tidal.layer(i)"
        raise UnsupportedFeatureError(
            f"sparse={sparse!r} is not a sparse decode method this version provides (longattn.sparse.HiP, Quest, "
            f"DoubleSparsity, TidalDecode(...).layer(i)){extra}"
        )
    if window != (-1, 0 if causal else -1):
        raise UnsupportedFeatureError(f"window_size cannot be combined with sparse={name}: {own}")
    if plan is not None:
        raise UnsupportedFeatureError(f"plan= schedules dense stream-K decode; it does not apply to sparse={name}")
    if backend not in ("auto", "eager"):
        raise UnsupportedFeatureError(f"backend={backend!r} cannot serve sparse={name} decode yet; use 'auto' or "
                                      "'eager'")


def _is_token_sparse(sparse) -> bool:
    """Quest, DoubleSparsity or a TidalDecode layer (the gather-decode methods)."""
    from longattn.sparse import DoubleSparsity, Quest, TidalLayer

    return isinstance(sparse, (Quest, DoubleSparsity, TidalLayer))


def _token_sparse_step(q, args: CacheArgs, config, state, *, scale: float, softcap: float, backend: str,
                       return_selection: bool):
    """:func:`_token_sparse_decode` outside torch.compile (which goes through
    ``_traced_token_step`` instead). Not wrapped in ``torch.compiler.disable``:
    no traced call reaches it, and the decorator imported torch._dynamo (~2 s)
    on every ``import longattn``."""
    return _token_sparse_decode(q, args, config, state, scale=scale, softcap=softcap, backend=backend,
                                return_selection=return_selection)


def _token_sparse_decode(q, args: CacheArgs, config, state, *, scale: float, softcap: float, backend: str,
                         return_selection: bool = True):
    """Quest / DoubleSparsity / TidalDecode step: ``(out, lse, selection)``
    (a dense Tidal layer's selection, every position, is made only when
    ``return_selection``; else None).

    Order (a call that raises changes nothing): layout checks (q's seqlen, the
    state's type), data checks (lengths, block_table; the state against this
    batch and config), then the append, the state's update with the appended
    keys, the selection, and exact attention over it through ``gather_decode``
    (``backend`` "auto" or "eager" both always serve). Selection scores use
    ``q * softmax_scale`` (so a negative scale ranks correctly; softcap is
    monotone and does not change the ranking)."""
    from longattn.kernels.gather import gather_decode
    from longattn.sparse import DoubleSparsity, DoubleSparsityState, Quest, QuestState, TidalState
    from longattn.sparse.tidal import all_positions, select_top_tokens

    name = type(config).__name__
    if q.shape[1] != 1:
        raise UnsupportedFeatureError(
            f"sparse={name} decodes one query per sequence (seqlen_q 1), got seqlen_q {q.shape[1]}; run longer "
            "chunks densely (sparse=None) or through longattn.attention"
        )
    if isinstance(config, Quest):
        state_type = QuestState
    elif isinstance(config, DoubleSparsity):
        state_type = DoubleSparsityState
        config.check_cache(args.k_cache.shape[2], args.k_cache.shape[3])
    else:
        state_type = TidalState
        if state is None and config.role == "reuse":
            raise ArgumentError(f"sparse=TidalLayer(role='reuse') for layer {config.index} needs state=, the "
                                "step's TidalState that its selection layer filled")
    if state is not None and not isinstance(state, state_type):
        raise ArgumentError(f"state for sparse={name} must be a longattn.sparse.{state_type.__name__}, got "
                            f"{type(state).__name__}")

    lengths = args.cache_seqlens.tolist()  # the selection is host-driven: it reads the lengths anyway
    check_cache_data(args, lengths)
    totals = [n + args.seqlen_new for n in lengths]
    nheads_k = args.k_cache.shape[2]
    q3 = q[:, 0]
    scaled = q3.float() * scale
    table = args.block_table

    if state_type is TidalState:
        if config.role == "reuse":
            selection = state.check_reuse(config, totals, nheads_k)  # reads only
            append_new(args, lengths)
        else:
            # Dense and selection layers: the engine's exact dense decode (which appends).
            out, lse = run_decode(q, args, scale=scale, window=(-1, -1), softcap=softcap, plan=None,
                                  backend=backend, check=False)
            if config.role == "selection":
                selection = select_top_tokens(scaled, args.k_cache, table, totals, config.token_budget)
                if state is not None:
                    state.record(config.index, selection, totals)
            else:
                selection = all_positions(totals, nheads_k, q.device) if return_selection else None
            return out, lse, selection
    else:
        holder = state if state is not None else state_type(config)  # None: a throwaway state per step
        holder.check_step(config, lengths, args.k_cache)  # reads only
        append_new(args, lengths)
        holder.extend(args.k_cache, table, totals)
        selection = holder.select(scaled, config.token_budget)
    out, lse = gather_decode(q3, args.k_cache, args.v_cache, selection, block_table=table, softmax_scale=scale,
                             softcap=softcap, backend=backend, check=False)
    return out[:, None], lse[..., None], selection


def _sparse_decode(q, args: CacheArgs, config, state, *, scale: float, softcap: float, causal: bool):
    """HiP decode: every check hip_decode would make, then the append, then the step."""
    from longattn.sparse.hip_decode import HiPDecodeState, hip_decode

    if state is not None and not isinstance(state, HiPDecodeState):
        raise ArgumentError(f"state for sparse=HiP must be a longattn.sparse.HiPDecodeState, got {type(state).__name__}")
    if state is not None and state.compiled is not None:
        # Compiled steps left the state in tensors (the truth from then on):
        # step from them and write the result back, as the op does.
        tensors, state.compiled = state.compiled, None
        try:
            state.load_tensors(*tensors)
            out, lse = _sparse_decode(q, args, config, state, scale=scale, softcap=softcap, causal=causal)
            state.store_tensors(*tensors)
        finally:
            state.compiled = tensors
        return out, lse
    if q.shape[1] > config.block_q:
        raise UnsupportedFeatureError(
            f"HiP decode takes seqlen_q <= block_q ({config.block_q}) queries per step, got {q.shape[1]}; "
            "run longer chunks through longattn.attention(..., sparse=HiP(...))"
        )
    lengths = args.cache_seqlens.tolist()  # the search is host-driven: it reads the lengths anyway
    check_cache_data(args, lengths)
    if state is not None:
        # Raises when the state belongs to another batch or config; reads only.
        state.refresh_due(config, tuple(n + args.seqlen_new for n in lengths), q.shape[2])
    seqlens = attended_seqlens(args, lengths)
    append_new(args, lengths)
    return hip_decode(q, args.view(seqlens), config, state, scale=scale, softcap=softcap, causal=causal)


# --- torch.compile ------------------------------------------------------------
# Steps 2-4 as custom ops: opaque to the tracer, with known output shapes.
# The plan crosses the op boundary as ints (plan_spec; the op rebuilds the same
# plan, cached); check crosses as -1 (None), 0, 1.

def _op_impl(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, scale, window_left, window_right,
             softcap, plan_spec, backend, check):
    args = check_cache_layout(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new)
    return run_decode(q, args, scale=scale, window=(window_left, window_right), softcap=softcap,
                      plan=plan_from_spec(tuple(plan_spec)), backend=backend,
                      check=None if check < 0 else bool(check))


@torch.library.custom_op("longattn::decode_step", mutates_args=())
def decode_step_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    plan_spec: list[int],
    backend: str,
    check: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of a decode step without new tokens (the cache is read only)."""
    return _op_impl(q, k_cache, v_cache, cache_seqlens, block_table, None, None, scale, window_left, window_right,
                    softcap, plan_spec, backend, check)


@torch.library.custom_op("longattn::decode_step_append", mutates_args=("k_cache", "v_cache"))
def decode_step_append_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    plan_spec: list[int],
    backend: str,
    check: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of a decode step that first writes ``k_new, v_new`` into the caches."""
    return _op_impl(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, scale, window_left, window_right,
                    softcap, plan_spec, backend, check)


def _fake_outputs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seqlen_q, nheads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, nheads, seqlen_q), dtype=torch.float32)


@decode_step_op.register_fake
def _decode_step_fake(q, k_cache, v_cache, cache_seqlens, block_table, scale, window_left, window_right, softcap,
                      plan_spec, backend, check):
    return _fake_outputs(q)


@decode_step_append_op.register_fake
def _decode_step_append_fake(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, scale, window_left,
                             window_right, softcap, plan_spec, backend, check):
    return _fake_outputs(q)


def _traced_step(q, args: CacheArgs, scale, window, softcap, plan, backend, check):
    check_code = -1 if check is None else int(check)
    common = (scale, window[0], window[1], softcap, plan_spec(plan), backend, check_code)
    if args.seqlen_new:
        return decode_step_append_op(q, args.k_cache, args.v_cache, args.cache_seqlens, args.block_table,
                                     args.k_new, args.v_new, *common)
    return decode_step_op(q, args.k_cache, args.v_cache, args.cache_seqlens, args.block_table, *common)


# The extras (cache_batch_idx, cache_leftpad, rotary) as their own pair of ops:
# optional tensors, so the plain step's ops keep their schema.

def _extras_impl(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, cache_batch_idx, cache_leftpad,
                 rotary_cos, rotary_sin, rotary_interleaved, scale, window_left, window_right, softcap, plan_spec,
                 backend, check):
    out, lse = _decode_extras(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, cache_batch_idx,
                              cache_leftpad, rotary_cos, rotary_sin, rotary_interleaved, scale=scale, causal=None,
                              window=(window_left, window_right), softcap=softcap, sparse=None,
                              plan=plan_from_spec(tuple(plan_spec)), backend=backend, return_lse=True,
                              check=None if check < 0 else bool(check))
    return out.contiguous(), lse.contiguous()


@torch.library.custom_op("longattn::decode_step_extras", mutates_args=())
def decode_step_extras_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None,
    cache_batch_idx: torch.Tensor | None,
    cache_leftpad: torch.Tensor | None,
    rotary_cos: torch.Tensor | None,
    rotary_sin: torch.Tensor | None,
    rotary_interleaved: bool,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    plan_spec: list[int],
    backend: str,
    check: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of a decode step with flash-attn's extras and no new tokens
    (the cache is read only; rotary needs new tokens, so it is refused here as in eager)."""
    return _extras_impl(q, k_cache, v_cache, cache_seqlens, block_table, None, None, cache_batch_idx, cache_leftpad,
                        rotary_cos, rotary_sin, rotary_interleaved, scale, window_left, window_right, softcap,
                        plan_spec, backend, check)


@torch.library.custom_op("longattn::decode_step_extras_append", mutates_args=("k_cache", "v_cache"))
def decode_step_extras_append_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cache_batch_idx: torch.Tensor | None,
    cache_leftpad: torch.Tensor | None,
    rotary_cos: torch.Tensor | None,
    rotary_sin: torch.Tensor | None,
    rotary_interleaved: bool,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    plan_spec: list[int],
    backend: str,
    check: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of a decode step with flash-attn's extras that first writes
    ``k_new, v_new`` (rotated, with rotary) into the selected cache rows."""
    return _extras_impl(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, cache_batch_idx,
                        cache_leftpad, rotary_cos, rotary_sin, rotary_interleaved, scale, window_left, window_right,
                        softcap, plan_spec, backend, check)


@decode_step_extras_op.register_fake
def _decode_step_extras_fake(q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx, cache_leftpad,
                             rotary_cos, rotary_sin, rotary_interleaved, scale, window_left, window_right, softcap,
                             plan_spec, backend, check):
    return _fake_outputs(q)


@decode_step_extras_append_op.register_fake
def _decode_step_extras_append_fake(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, cache_batch_idx,
                                    cache_leftpad, rotary_cos, rotary_sin, rotary_interleaved, scale, window_left,
                                    window_right, softcap, plan_spec, backend, check):
    return _fake_outputs(q)


def _traced_extras(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, cache_batch_idx, cache_leftpad,
                   rotary_cos, rotary_sin, rotary_interleaved, scale, window, softcap, plan, backend, check):
    extras = (cache_batch_idx, cache_leftpad, rotary_cos, rotary_sin, rotary_interleaved)
    common = (scale, window[0], window[1], softcap, plan_spec(plan), backend, -1 if check is None else int(check))
    if k_new is not None:
        return decode_step_extras_append_op(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, *extras,
                                            *common)
    return decode_step_extras_op(q, k_cache, v_cache, cache_seqlens, block_table, *extras, *common)


# HiP decode with a HiPDecodeState: the state as three tensors the op mutates
# (HiPDecodeState.as_tensors); the op loads them into a state object, runs
# the uncompiled step, and writes them back. state=None: fresh tensors (an
# empty state searches, as None does).

@torch.library.custom_op("longattn::hip_decode_step",
                         mutates_args=("k_cache", "v_cache", "state_blocks", "state_info", "state_counts"))
def hip_decode_step_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None,
    k_new: torch.Tensor | None,
    v_new: torch.Tensor | None,
    state_blocks: torch.Tensor,
    state_info: torch.Tensor,
    state_counts: torch.Tensor,
    config_spec: list[int],
    scale: float,
    softcap: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of a HiP decode step (``HiP(*config_spec)``) that appends
    ``k_new, v_new`` (if given) and advances the state held in ``state_*``."""
    from longattn.sparse.hip import HiP
    from longattn.sparse.hip_decode import HiPDecodeState

    state = HiPDecodeState()
    state.load_tensors(state_blocks, state_info, state_counts)
    args = check_cache_layout(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new)
    out, lse = _sparse_decode(q, args, HiP(*config_spec), state, scale=scale, softcap=softcap, causal=causal)
    state.store_tensors(state_blocks, state_info, state_counts)  # after the step succeeded
    return out.contiguous(), lse.contiguous()


@hip_decode_step_op.register_fake
def _hip_decode_step_fake(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, state_blocks, state_info,
                          state_counts, config_spec, scale, softcap, causal):
    return _fake_outputs(q)


def _traced_hip_step(q, args: CacheArgs, config, state, *, scale, softcap, causal):
    from longattn.sparse.hip_decode import HiPDecodeState

    if state is not None and not isinstance(state, HiPDecodeState):
        raise ArgumentError("state for sparse=HiP must be a longattn.sparse.HiPDecodeState, got "
                            f"{type(state).__name__}")
    if q.shape[1] > config.block_q:
        raise UnsupportedFeatureError(
            f"HiP decode takes seqlen_q <= block_q ({config.block_q}) queries per step, got {q.shape[1]}; "
            "run longer chunks through longattn.attention(..., sparse=HiP(...))"
        )
    batch, nheads = q.shape[0], q.shape[2]
    holder = HiPDecodeState() if state is None else state
    blocks, info, counts = holder.as_tensors(batch, nheads, config, q.device)
    spec = config.as_ints()
    k_new, v_new = (args.k_new, args.v_new) if args.seqlen_new else (None, None)
    return hip_decode_step_op(q, args.k_cache, args.v_cache, args.cache_seqlens, args.block_table, k_new, v_new,
                              blocks, info, counts, spec, scale, softcap, causal)


# --- Quest / Double Sparsity / TidalDecode under torch.compile -------------------
# The step is host-driven (lengths, growing states): traced, it is one custom op
# that mutates the caches and steps the caller's state object, found through the
# integer handle every state gets at construction (token_select.register_state;
# the graph holds the handle, the state stays a Python object). The config
# crosses as a method name and ints; the selection comes back -1 padded to the
# method's widest (a static shape).

_TIDAL_ROLES = ("dense", "selection", "reuse")


def _token_method_spec(config) -> tuple[str, list[int], int]:
    """``(name, ints, selection width)`` of a Quest / DoubleSparsity / TidalLayer config."""
    from longattn.sparse import DoubleSparsity, Quest

    if isinstance(config, Quest):
        width = (config.token_budget // config.page_size + 1) * config.page_size
        return "quest", [config.token_budget, config.page_size], width
    if isinstance(config, DoubleSparsity):
        rows = config.channels
        return "double_sparsity", [config.token_budget, len(rows), len(rows[0]), *[c for r in rows for c in r]], \
            config.token_budget
    source = -1 if config.source is None else config.source
    width = 0 if config.role == "dense" else config.token_budget
    return "tidal", [config.index, _TIDAL_ROLES.index(config.role), config.token_budget, source], width


@functools.lru_cache(maxsize=256)
def _token_method_from_spec(name: str, spec: tuple[int, ...]):
    from longattn.sparse import DoubleSparsity, Quest, TidalLayer

    if name == "quest":
        return Quest(token_budget=spec[0], page_size=spec[1])
    if name == "double_sparsity":
        budget, hk, r, *flat = spec
        return DoubleSparsity(tuple(tuple(flat[h * r:(h + 1) * r]) for h in range(hk)), token_budget=budget)
    index, role, budget, source = spec
    return TidalLayer(index, _TIDAL_ROLES[role], budget, None if source < 0 else source)


@torch.library.custom_op("longattn::token_sparse_step", mutates_args=("k_cache", "v_cache"))
def token_sparse_step_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_table: torch.Tensor | None,
    k_new: torch.Tensor | None,
    v_new: torch.Tensor | None,
    method: str,
    spec: list[int],
    state_handle: int,
    scale: float,
    softcap: float,
    backend: str,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, lse, selection)`` of a Quest / DoubleSparsity / TidalLayer step
    (the state found by its handle, -1 = none); selection ``(batch, nheads_k,
    width)`` int32, -1 padded (``width`` 0: not asked for)."""
    from longattn.sparse.token_select import state_of

    config = _token_method_from_spec(method, tuple(spec))
    args = check_cache_layout(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new)
    out, lse, selection = _token_sparse_decode(q, args, config, state_of(state_handle), scale=scale,
                                               softcap=softcap, backend=backend, return_selection=width > 0)
    padded = torch.full((q.shape[0], k_cache.shape[2], width), -1, dtype=torch.int32, device=q.device)
    if width and selection is not None:
        padded[..., :selection.shape[2]] = selection
    return out.contiguous(), lse.contiguous(), padded


@token_sparse_step_op.register_fake
def _token_sparse_step_fake(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, method, spec,
                            state_handle, scale, softcap, backend, width):
    out, lse = _fake_outputs(q)
    return out, lse, q.new_empty((q.shape[0], k_cache.shape[2], width), dtype=torch.int32)


def _traced_token_step(q, args: CacheArgs, config, state, *, scale, softcap, backend, return_selection):
    name, spec, width = _token_method_spec(config)
    if return_selection and width == 0:
        raise UnsupportedFeatureError("return_selection=True on a dense TidalDecode layer (every position) is not "
                                      "traceable by torch.compile; ask for it on selection or reuse layers")
    handle = -1 if state is None else state.handle
    out, lse, selection = token_sparse_step_op(q, args.k_cache, args.v_cache, args.cache_seqlens, args.block_table,
                                               args.k_new, args.v_new, name, spec, handle, scale, softcap, backend,
                                               width if return_selection else 0)
    return out, lse, (selection if return_selection else None)
