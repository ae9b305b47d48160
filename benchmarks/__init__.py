"""Benchmarks: qcompile beside onnxruntime's quantizer and NNCF (``python benchmarks/run.py``)."""
