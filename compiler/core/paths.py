"""Where qcompile's own files live: the Hydra recipe tree and the built-in data sets."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # compiler/
REPO_ROOT = PACKAGE_ROOT.parent
RECIPES_DIR = Path(os.environ.get("QCOMPILE_RECIPES", REPO_ROOT / "recipes"))
BUILTIN_DATA_DIR = PACKAGE_ROOT / "datasets"
