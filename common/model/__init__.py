"""The running model (torch/transformers): config, weights check, prompts, capture, the layer
loader, the hub, the demo model, checkpoints and their conversion."""
