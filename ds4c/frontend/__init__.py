"""Frontends: a model (preset, Hugging Face checkpoint, ONNX file, in-memory module) traced into ds4c IR."""
