"""The files on disk: where each lives and its name (layout), the CSV format and its writer pool,
safetensors, manifests, atomic writes, step 1's export."""
