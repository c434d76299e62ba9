"""`python -m qwenvl`: the `qwenvl` command."""

from .cli import main

raise SystemExit(main())
