"""The qcompile command line: the Hydra build app and the plain subcommands."""
