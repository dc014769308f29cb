"""Build hook for longattn's optional compiled extensions.

Metadata lives in pyproject.toml. This file is where C++/CUDA extensions from
``csrc/`` are declared as they arrive; every one of them must be optional: a
failed or impossible build (no compiler, no CUDA) must still install the
package, which then falls back to its PyTorch twins. There are none yet.
"""

from setuptools import setup

setup()
