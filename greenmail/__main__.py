"""``python -m greenmail`` is the ``greenmail`` command."""

from greenmail.cli import main

main(prog_name="greenmail")
