"""HF <-> Megatron mapping, HF safetensors I/O and Megatron distributed checkpoints."""
