"""Quantization: primitives, observers, fake-quant modules and plan application."""
