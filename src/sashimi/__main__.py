"""`python -m sashimi`: the `sashimi` command."""

from sashimi.cli import main

raise SystemExit(main())
