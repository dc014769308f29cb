"""Small ``@triton.jit`` helpers shared by the Triton twins.

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
