"""Sparse attention methods: configs passed as ``attention(..., sparse=...)``.

- :class:`HiP` -- hierarchically pruned attention (tree-searched top-k key
  blocks + sinks + window); :func:`hip_select_blocks` returns its selection;
  :class:`HiPDecodeState` carries it across decode steps
  (``decode_attention(..., sparse=HiP(), state=HiPDecodeState())``).
- :class:`Streaming` -- StreamingLLM's attention sinks + sliding window;
  :class:`StreamingCache` is its constant-size decode cache.
- :class:`HeadPattern`, :class:`Duo` -- DuoAttention: per kv head, full
  (retrieval) or sinks + window (streaming) attention; :class:`DuoCache` is
  its two-part decode cache.
- :class:`Quest` / :class:`QuestState`, :class:`DoubleSparsity` /
  :class:`DoubleSparsityState`, :class:`TidalDecode` (``.layer(i)`` ->
  :class:`TidalLayer`) / :class:`TidalState` -- decode-time token selection
  (``decode_attention(..., sparse=..., state=...)``) over the gather-decode
  primitive.
- :func:`block_sparse_attention` -- the primitive they run on: attention over
  listed key blocks plus sinks and a window, for callers with their own masks.
"""

from longattn.kernels.block_sparse import block_sparse_attention
from longattn.sparse.double_sparsity import DoubleSparsity, DoubleSparsityState
from longattn.sparse.duo import Duo, DuoCache, HeadPattern
from longattn.sparse.hip import HiP
from longattn.sparse.hip_decode import HiPDecodeState
from longattn.sparse.hip_mask import hip_select_blocks
from longattn.sparse.quest import Quest, QuestState
from longattn.sparse.streaming import Streaming
from longattn.sparse.streaming_cache import StreamingCache
from longattn.sparse.tidal import TidalDecode, TidalLayer, TidalState
from longattn.sparse.channels import ChannelConfig, calibrate_channels

__all__ = ["DoubleSparsity", "DoubleSparsityState", "Duo", "DuoCache", "HeadPattern", "HiP", "HiPDecodeState", "Quest",
           "QuestState", "Streaming", "StreamingCache", "TidalDecode", "TidalLayer", "TidalState",
           "block_sparse_attention", "hip_select_blocks",
           "ChannelConfig", "calibrate_channels"]
