"""Stands in for the sglang_router package in the supervision contract tests only (tests/sglang_double.py)."""
