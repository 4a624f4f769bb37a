"""The running model (torch/transformers): config, weights check, prompts, capture, the layer
loader, the hub, the demo model, checkpoints and their conversion.

Importing this package installs two logging filters first: transformers imports torchao whenever it
is installed, and torchao's import logs GPU-only noise (torchao_import.py); and Ctrl-C inside
transformers' from_pretrained unwinds through a `finally` that logs a load report of the half-loaded
model ("lm_head.weight | MISSING"), which would bury the one line an interrupted step prints.
"""
import logging
import sys

from common.model.torchao_import import silence_import_noise


class _DropWhileInterrupted(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not isinstance(sys.exc_info()[1], KeyboardInterrupt)


silence_import_noise()
logging.getLogger("transformers.modeling_utils").addFilter(_DropWhileInterrupted())  # a package runs this once
