"""Long-CoT SFT: its config (``config.py``) and its run (``trainer.py``); ``python -m megatron_klear.sft``."""
