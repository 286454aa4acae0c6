"""Pure PyTorch: Multiway Transformer, heads, masking, VQ-KD, checkpoint I/O.

Never imports pipelines/, stages/, ray or dvc.
"""
