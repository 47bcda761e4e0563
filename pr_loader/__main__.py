"""``python -m pr_loader``: the ``pr-loader`` command line."""

from pr_loader.cli import main

raise SystemExit(main())
