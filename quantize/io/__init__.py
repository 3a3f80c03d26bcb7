"""Checkpoint I/O: lazy safetensors reading, sharded streaming writing, atomic publishing."""
