"""Adapters that let existing model code use longattn with one changed line.

- :mod:`longattn.integrations.flash_attn`: flash-attn 2.8.3's Python API
  (``flash_attn_func``, the packed and varlen variants,
  ``flash_attn_with_kvcache``) with its exact signatures, on longattn's
  front doors: ``from longattn.integrations.flash_attn import flash_attn_func``.
- :mod:`longattn.integrations.transformers`: Hugging Face transformers
  attention implementations (``register()``; ``attn_implementation="longattn"``
  and the sparse variants) with their mask functions, and ``LongAttnCache``,
  whose decode steps run through ``longattn.decode_attention``.

This package sits above the front doors (``longattn.attention``,
``longattn.decode_attention``) in the layer contract: it calls them, nothing
below imports it.
"""
