"""KV offload: a paged KV cache over three tiers (device, host memory, disk) with attention where the KV lives.

Work in progress (issue 14): see the modules for what exists.
"""
