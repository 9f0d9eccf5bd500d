"""BentoML services on ONNX Runtime (next milestone). Never imports torch."""
