"""Ways to execute a model or graph: Polygraphy runners, ONNX Runtime sessions, the reference evaluator."""
