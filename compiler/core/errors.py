"""The three ways a build can stop, each with its own exit code (documented in docs/bad-input.md)."""

from __future__ import annotations

import difflib

from compiler.core.logs import strip_ansi
from compiler.core.status import EXIT_CODES, Status


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

    @property
    def status(self) -> str:
        """How a sweep counts this outcome (compiler.core.status.Status); the kind unless a subclass says."""
        return self.kind


class RecipeError(QcompileError):
    """The recipe cannot work: found at validation, before any model is loaded. Exit 2."""

    kind = Status.RECIPE_ERROR
    exit_code = EXIT_CODES[kind]

    def __init__(self, key: str, message: str, fix: str | None = None):
        text = f"{key}: {message}" if key else message
        if fix:
            text += f" -- {fix}"
        super().__init__(text)
        self.key = key
        self.fix = fix


class NotRunnableError(RecipeError):
    """A step the step x target capability table rules out on the chosen target: a recipe error for one
    build (exit 2), a hole in a sweep's matrix that does not fail the sweep."""

    @property
    def status(self) -> str:
        return Status.NOT_RUNNABLE


class BuildError(QcompileError):
    """A stage failed on real input (model, data, export, lowering, a guard rail). Exit 1."""

    kind = Status.BUILD_FAILED
    exit_code = EXIT_CODES[kind]


class GateError(QcompileError):
    """The build finished but its accuracy gate failed. Exit 3."""

    kind = Status.GATE_FAILED
    exit_code = EXIT_CODES[kind]


class InterruptedBuild(QcompileError):
    """Ctrl-C during a build. Exit 130, like a shell."""

    kind = Status.INTERRUPTED
    exit_code = EXIT_CODES[kind]


def did_you_mean(word: str, options) -> str:
    """The fix for an unknown name: the closest of options ("did you mean 'x'?"), else every option."""
    match = difflib.get_close_matches(str(word), [str(o) for o in options], n=1)
    return f"did you mean {match[0]!r}?" if match else f"valid: {', '.join(sorted(map(str, options)))}"
