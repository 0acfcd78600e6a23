"""Inference engines (HF transformers in process, SGLang servers + router) behind one interface."""
