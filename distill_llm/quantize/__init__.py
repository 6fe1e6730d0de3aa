"""Post-training quantisation of the exported student into compressed-tensors folders vLLM serves."""
