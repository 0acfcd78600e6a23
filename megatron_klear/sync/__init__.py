"""Trainer -> rollout-engine weight transfer."""
