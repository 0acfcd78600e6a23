"""Shared training machinery for the SFT and RL loops."""
