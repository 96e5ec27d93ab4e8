"""``python -m fastaphlict``: the same entry point as the console script."""

import sys

from fastaphlict.cli import main

sys.exit(main())
