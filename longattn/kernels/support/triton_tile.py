"""Small ``@triton.jit`` helpers shared by the Triton twins.

:func:`online_softmax_step` is the one key-tile step of flash attention used by
the dense, block-sparse and decode kernels, and :func:`online_softmax_finish`
turns its running state into ``(out, lse)``. The state is kept in log2 units:
scores are multiplied by ``log2(e)`` once, so every exponential is an ``exp2``
(one instruction on GPUs); ``lse`` is converted back to natural log at the end.

Defined only when triton imports (see :func:`longattn.kernels.support.triton_support.import_triton`);
the kernels that call them live in modules that check the same thing.
"""

from __future__ import annotations

from longattn.kernels.support.triton_support import import_triton

triton, tl, _IMPORT_ERROR = import_triton()

if triton is not None:

    @triton.jit
    def softcap_tanh(s, softcap):
        """``softcap * tanh(s / softcap)``; tl has no tanh. exp of -2|x| <= 0 never
        overflows, so large logits saturate cleanly at +-softcap."""
        x = s / softcap
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return softcap * tl.where(x < 0, -t, t)

    @triton.jit
    def online_softmax_step(q, k_ptrs, v_ptrs, kv_ok, d_ok, visible, m_i, l_i, acc, scale, softcap,
                            HAS_SOFTCAP: tl.constexpr):
        """Fold one tile of ``BLOCK_N`` keys into the running softmax state of ``BLOCK_M`` rows.

        Args (shapes):
            q: ``(BLOCK_M, BLOCK_D)`` queries (unscaled), padded rows/columns zero.
            k_ptrs: ``(BLOCK_D, BLOCK_N)`` pointers to the tile's keys, transposed
                (``k_ptrs[d, j]`` is element ``d`` of key ``j``); v_ptrs ``(BLOCK_N,
                BLOCK_D)`` pointers to its values. Callers compute the row offsets in
                int64: ``key * stride`` passes 2**31 elements in long contexts.
            kv_ok: ``(BLOCK_N,)`` keys that may be loaded (others read as 0; never
                dereferenced); d_ok ``(BLOCK_D,)`` the columns below headdim.
            visible: ``(BLOCK_M, BLOCK_N)`` which (row, key) scores count; must
                imply ``kv_ok``.
            m_i: ``(BLOCK_M,)`` running max of the visible scores, log2 units
                (-inf before any visible key); l_i ``(BLOCK_M,)`` running sum of
                ``exp2(score - m_i)``; acc ``(BLOCK_M, BLOCK_D)`` float32, the
                unnormalised output at max ``m_i``.

        Returns the updated ``(m_i, l_i, acc)``. Scores are ``scale * q.k`` (then
        softcapped with ``HAS_SOFTCAP``), the products are full fp32 ("ieee": no
        TF32 on GPU, as the interpreter computes), and ``p`` is cast to V's dtype
        for ``p @ v`` (fp16 on the tensor cores), accumulated in fp32, as flash-attn does.
        """
        kt = tl.load(k_ptrs, mask=kv_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision="ieee") * scale
        if HAS_SOFTCAP:
            s = softcap_tanh(s, softcap)
        s = tl.where(visible, s * 1.4426950408889634, float("-inf"))  # * log2(e): log2 units
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet has max -inf; subtract 0 there so exp2
        # gives exact zeros instead of NaN (-inf - -inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)  # rescales the old state to the new max
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs, mask=kv_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        return m_new, l_i, acc

    @triton.jit
    def online_softmax_finish(m_i, l_i, acc):
        """``(out, lse)`` of the state of :func:`online_softmax_step`: ``out = acc / l``
        (float32), ``lse`` in natural log. Rows that saw no key (``l == 0``) get
        out 0 (acc is 0 there) and lse -inf, never NaN."""
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        # Back to natural log: lse = ln(2) * (m + log2(l)).
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
        return out, lse
