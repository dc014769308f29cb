"""Where the tests keep what an external tool built for them (nvcc checks,
the CUDA-emulation libraries): beside longattn's C++ builds, under a key of
everything the result depends on, so only an edit or another tool builds anew."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from longattn.kernels.support import cpp_build


def cache_path(kind: str, stem: str, suffix: str, tool: str, flags, texts: dict[str, str], directory: Path) -> Path:
    """``<cache_dir>/<kind>/<stem>-<key><suffix>``; the key hashes ``tool
    --version``, the flags, the generated ``texts`` (name -> text) and every
    file in ``directory`` (the sources and the headers they include)."""
    version = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256((version + "\0".join(flags)).encode())
    for name, text in texts.items():
        key.update(name.encode() + b"\0" + text.encode())
    for path in sorted(Path(directory).iterdir()):
        if path.is_file():
            key.update(path.name.encode() + b"\0" + path.read_bytes())
    return cpp_build.cache_dir() / kind / f"{stem}-{key.hexdigest()[:20]}{suffix}"
