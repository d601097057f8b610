"""ONNX graph passes run after export: standard-op lowering, weight folding, constant fix-ups."""
