"""Stands in for the sglang package in the supervision contract tests only (tests/sglang_double.py)."""
