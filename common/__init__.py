"""llama-xray's shared package: everything the numbered scripts have in common.

    cli.py, paths.py  the door: one-line errors and exit codes, the flags; where things live
    llama/   the Llama decoder in float32 numpy (norm, rope, attention, mlp, the layer, KV cache)
    quant/   integer and quantized math
    files/   the files on disk: names (layout), CSV, safetensors, manifests, atomic writes, step 1's export
    model/   the running model (torch/transformers): config, capture, layer loader, hub, checkpoints
    check/   checking: opening an offline run, comparisons, reports, golden vectors, grading

Each floor imports only those below it (tests/test_architecture.py): llama nothing of the project
but itself. One module per concept; nothing runs on import (but
common/model/'s logging filter for torchao's import noise).
"""
