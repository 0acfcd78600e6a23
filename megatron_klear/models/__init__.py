"""Qwen3 on Megatron-Core: the network's config, the one HF <-> Megatron mapping, stage weight I/O."""
