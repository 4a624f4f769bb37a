"""The Llama decoder in float32 numpy, one small function per equation: RMSNorm, RoPE (and torch's
pow that its frequencies need), attention, the MLP, the layer and its decode cache.
Imports numpy and its own pieces only."""
