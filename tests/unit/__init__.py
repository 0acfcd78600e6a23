"""Unit tests: one process (or spawned gloo ranks), seconds each."""
