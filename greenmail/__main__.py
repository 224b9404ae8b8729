"""``python -m greenmail`` is the ``greenmail`` command."""

from greenmail.entry import main

main()
