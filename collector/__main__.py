"""`python -m collector`: the same command line as `outbound-collector`."""

from .cli import main

raise SystemExit(main())
