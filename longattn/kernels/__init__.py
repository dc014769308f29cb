"""Primitives: how to compute attention over a given key set.

Each primitive has one signature and several twins (eager PyTorch, SDPA,
Triton, later C++ and CUDA); :mod:`longattn.dispatch` picks one per call.
"""
