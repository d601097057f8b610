"""`python -m compiler` is the `qcompile` command."""

from compiler.commands.cli import main

main()
