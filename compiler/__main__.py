"""`python -m compiler` is the `qcompile` command."""

from compiler.commands.cli import main

if __name__ == "__main__":  # importing the module (a tool walking the package) runs nothing
    main()
