"""``python -m longattn``: the same as the ``longattn`` console script."""

from longattn.cli import main

raise SystemExit(main())
