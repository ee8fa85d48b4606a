"""`python -m perfml`: the same command as the `perfml` console script."""

from perfml.cli import main

raise SystemExit(main())
