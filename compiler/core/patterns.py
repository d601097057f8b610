"""Module-name patterns of a recipe (fnmatch globs such as `*.attention.output.dense`)."""

from __future__ import annotations

import fnmatch


def matches_any(name: str, patterns) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)
