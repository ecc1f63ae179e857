"""Reading safetensors checkpoints by header and byte range, and writing sharded output."""
