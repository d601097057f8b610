"""Foundations every layer may use: errors, config schemas, hashing, paths."""
