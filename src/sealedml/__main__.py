"""``python -m sealedml`` = the ``sealedml`` command."""

from sealedml.cli.main import main

raise SystemExit(main())
