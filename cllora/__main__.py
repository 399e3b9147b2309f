"""``python -m cllora`` runs the CLI (the same as the ``cllora`` console script)."""

from cllora.cli import main

raise SystemExit(main())
