"""Build and loading helpers shared by the primitives' twins.

- :mod:`.cpp_build`: compile ``csrc/cpu`` sources on first use, cache and load them.
- :mod:`.huge_pages`: large host buffers advised onto transparent huge pages.
- :mod:`.triton_support`: the one Triton import guard, and when a Triton twin can run.
- :mod:`.triton_tile`: ``@triton.jit`` helpers the Triton kernels share.
"""
