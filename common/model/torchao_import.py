"""torchao, imported in one place, and its import-time noise kept off the console.

torchao 0.18's import logs a warning for each GPU-only kernel library it cannot load on a CPU
machine (logger `torchao`: "Failed to load .../torchao/_C_....so") and torch logs a deprecation for
each Enum torchao registers with pytree (logger `torch.utils._pytree`: "... is an Enum subclass
...register_constant() ..."). transformers imports torchao itself whenever it is installed (its
torchao quantizer, from modeling_utils), so every step that loads a model would print them:
common/__init__.py therefore installs silence_import_noise() first thing. It drops exactly those
messages, nothing else: every other warning and every error still shows.
"""
from __future__ import annotations

import functools
import logging


class _DropImportNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not ((msg.startswith("Failed to load") and "torchao" in str(record.args or msg))
                    or "is an Enum subclass and is now natively supported" in msg)


_FILTER = _DropImportNoise()
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


def silence_import_noise() -> None:
    """Drop torchao's import-time messages (idempotent; imports neither torch nor torchao)."""
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


@functools.cache
def torchao_quantization():
    """The module torchao.quantization (quantize_, the configs, PerGroup, PerAxis)."""
    silence_import_noise()
    import torchao.quantization
    return torchao.quantization
