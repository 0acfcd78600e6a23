"""megatron-klear: Klear-Reasoner's long-CoT SFT and GPPO RL on Megatron-Core."""

from megatron_klear import known_warnings

__version__ = "0.1.0"

known_warnings.install()  # the third-party warnings we accept, by message; every other one shows
