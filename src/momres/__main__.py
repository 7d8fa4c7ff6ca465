"""``python -m momres`` is the ``momres`` command."""

from .cli import main

raise SystemExit(main())
