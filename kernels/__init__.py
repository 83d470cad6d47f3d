"""Triton kernels, each beside a plain-torch reference twin (monosemantic.kernels).

Empty so far: the runtime runs on plain PyTorch; kernels land here with their reference tests.
"""
