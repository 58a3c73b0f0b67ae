"""fuyou: fine-tune large language models on one GPU.

Pipeline: recipe -> hardware profile -> plan -> schedule -> engine -> trainer -> telemetry -> checkpoint.
"""

__version__ = "0.1.0"
