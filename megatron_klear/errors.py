"""Exceptions that carry what the user must fix."""


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field."""


class CheckpointError(RuntimeError):
    """A checkpoint or model directory is missing, partial or of another shape."""
