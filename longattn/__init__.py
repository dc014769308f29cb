"""longattn: long-context attention kernels with PyTorch twins.

Front doors::

    from longattn import attention, decode_attention, merge_states
    out = attention(q, k, v, causal=True)          # (batch, seqlen, nheads, headdim)
    out = decode_attention(q, k_cache, v_cache, cache_seqlens=lens, k_new=k, v_new=v)

Conventions (flash-attn's): bottom-right causal alignment, ``(left, right)``
windows with -1 = unbounded, natural-log float32 lse of shape
``(batch, nheads, seqlen_q)``, empty rows give ``out = 0`` and ``lse = -inf``.
"""

from longattn.api import attention
from longattn.decode_api import decode_attention
from longattn.errors import LongAttnError
from longattn.kernels.merge import merge_states
from longattn import sparse  # longattn.sparse.HiP, Streaming, Duo, ...

__version__ = "0.2.0.dev0"

__all__ = ["attention", "decode_attention", "merge_states", "sparse", "LongAttnError", "__version__"]
