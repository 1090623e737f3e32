"""``python -m lamina``: the same as the ``lamina`` command."""

from lamina.frontends.cli import main

raise SystemExit(main())
