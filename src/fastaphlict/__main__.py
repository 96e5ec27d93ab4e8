"""``python -m fastaphlict``: the same entry point as the console script."""

from fastaphlict.cli import entry

entry()
