"""``torchrun --nproc-per-node N -m longattn.parallel.bench``: one rank of the sequence-parallel benchmark.

The code lives in :mod:`longattn.bench.parallel` (the bench layer, which
``longattn bench parallel`` also uses to launch the ranks itself); this module
is only the entry point under the name users type. Options: ``--tokens``,
``--repeats``, ``--methods``, ``--seed``, ``--out`` (rank 0 writes
``world<N>.json`` there).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from longattn.bench.parallel import rank_main  # the one import across layers (see pyproject's import-linter)

    sys.exit(rank_main())
