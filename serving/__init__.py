"""BentoML services on ONNX Runtime (``serving.service``), behind one request guard (``serving.guard``).

Never imports torch.
"""
