"""Repair: per-layer mixed precision that meets an accuracy budget and the gate (budget.py: the settings; search.py:
the search over measure(fallback_layers); torch_measure.py / onnx_measure.py: the two measurers; run.py: the
stage; outputs.py: what it writes)."""
