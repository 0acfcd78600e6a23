"""Tokenizer, chat formatting and datasets."""
