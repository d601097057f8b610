"""The three ways a build can stop, each with its own exit code (documented in the README)."""

from __future__ import annotations

from compiler.core.logs import strip_ansi


class QcompileError(Exception):
    """Base of qcompile's expected errors: printed as one line, never as a traceback."""

    exit_code = 1
    kind = "error"

    def __init__(self, message: str):
        # the one place every qcompile error's text is made: library text (torch.export, rich) may carry
        # terminal colour codes that would end up in FAILED.md, the sweep summary and the one-line error
        message = strip_ansi(message)
        super().__init__(message)
        self.message = message


class RecipeError(QcompileError):
    """The recipe cannot work: found at validation, before any model is loaded. Exit 2."""

    exit_code = 2
    kind = "recipe error"

    def __init__(self, key: str, message: str, fix: str | None = None):
        text = f"{key}: {message}" if key else message
        if fix:
            text += f" -- {fix}"
        super().__init__(text)
        self.key = key
        self.fix = fix


class BuildError(QcompileError):
    """A stage failed on real input (model, data, export, lowering, a guard rail). Exit 1."""

    exit_code = 1
    kind = "build failed"


class GateError(QcompileError):
    """The build finished but its accuracy gate failed. Exit 3."""

    exit_code = 3
    kind = "gate failed"


class InterruptedBuild(QcompileError):
    """Ctrl-C during a build. Exit 130, like a shell."""

    exit_code = 130
    kind = "interrupted"
