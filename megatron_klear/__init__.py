"""megatron-klear: Klear-Reasoner's long-CoT SFT and GPPO RL on Megatron-Core."""

__version__ = "0.1.0"
