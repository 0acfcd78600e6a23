"""Rollout engines (HF transformers in process, SGLang servers) behind one interface."""
