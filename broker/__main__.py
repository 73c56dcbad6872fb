"""`python -m broker` is the same as the `compute-broker` console script."""

from broker.cli import main

raise SystemExit(main())
