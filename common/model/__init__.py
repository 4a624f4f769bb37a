"""The running model (torch/transformers): config, weights check, prompts, capture, the layer
loader, the hub, the demo model, checkpoints and their conversion.

Importing this package installs one logging filter first: transformers imports torchao whenever it is
installed, and torchao's import logs GPU-only noise (torchao_import.py).
"""
from common.model.torchao_import import silence_import_noise

silence_import_noise()
