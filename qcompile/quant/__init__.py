"""Quantization specs (what a tensor becomes) and the qparams math, in numpy."""
