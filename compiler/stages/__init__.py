"""The stages of one build, each a plain function over artifacts (validate, load, export, check, bench, report)."""
