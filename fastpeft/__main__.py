"""``python -m fastpeft``: the ``fastpeft`` command."""

from .cli import main

raise SystemExit(main())
