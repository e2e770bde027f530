"""flbench: a benchmark for federated prompt learning of CLIP-style vision-language models.

Kept import-light on purpose: ``import flbench.kernels`` must work on machines that have only torch and triton.
"""

__version__ = "0.1.0"
