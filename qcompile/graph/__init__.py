"""Helpers over onnx_ir: io (load, atomic save), queries, notes."""
