"""Build hook for longattn: ship the C++/CUDA sources of ``csrc/`` inside the package.

Metadata lives in pyproject.toml. The kernels in ``csrc/`` are compiled at
first use (``longattn/kernels/support/cpp_build.py`` for the CPU ones, NVRTC through
cupy for the CUDA ones), never at install: a machine without a compiler or
CUDA installs the same package and falls back to the PyTorch twins. So the
only build step here copies ``csrc/`` into ``longattn/_csrc`` of the built
package, where the loaders find it.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithSources(build_py):
    def run(self):
        super().run()
        source = Path(__file__).resolve().parent / "csrc"
        if source.is_dir():
            shutil.copytree(source, Path(self.build_lib) / "longattn" / "_csrc", dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithSources})
