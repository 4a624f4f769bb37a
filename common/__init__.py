"""llama-xray's shared package: everything the numbered scripts have in common.

One module per concept; nothing runs on import but one logging filter: transformers imports
torchao whenever it is installed, and torchao's import logs GPU-only noise (common/model/torchao_import.py).
"""
from common.model.torchao_import import silence_import_noise

silence_import_noise()
