"""qcompile: a declarative quantization recipe compiler."""

__version__ = "0.1.0"
