"""qcompile: an ahead-of-time quantization compiler for ONNX models."""

__version__ = "0.1.0"
