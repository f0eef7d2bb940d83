"""`python -m fastunlearn`: the same command line as the `fastunlearn` script."""

from fastunlearn.cli import main

raise SystemExit(main())
