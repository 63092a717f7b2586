"""``python -m pipeline``: the same as the ``pipeline`` command."""

import sys

from pipeline.cli.app import main

sys.exit(main())
