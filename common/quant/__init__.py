"""Integer arithmetic of quantized Llama: quantization schemes, integer matmuls, requantization, fixed point."""
