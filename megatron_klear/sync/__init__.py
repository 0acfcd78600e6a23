"""Trainer shards -> HF-named buckets -> an inference engine, then a probe check."""
