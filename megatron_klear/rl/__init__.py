"""GPPO reinforcement learning: ``python -m megatron_klear.rl --config X [key=value ...]``."""
