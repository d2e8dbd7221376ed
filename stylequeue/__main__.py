"""``python -m stylequeue`` is the same as the ``stylequeue`` console script."""

from stylequeue.cli import main

raise SystemExit(main())
