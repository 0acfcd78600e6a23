"""Storage only: HF safetensors I/O, Megatron-Core distributed checkpoints, offline conversion."""
