"""``python -m greenmail`` is the ``greenmail`` command."""

from greenmail.cli import entry

entry()
