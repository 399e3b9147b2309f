"""``python -m cllora.plan``: see :mod:`cllora.plan.cli`.

Usage::

    python -m cllora.plan --model llama-3.1-8b --contexts 4096,32768 --gpu rtx4090
"""

from cllora.plan.cli import main

raise SystemExit(main())
