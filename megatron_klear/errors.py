"""Every exception that carries what the user must fix.

All of them derive from ``KlearError``: the command line catches that one type, prints its
message as one line and exits 2. Anything else is a bug and keeps its traceback: a broken
internal invariant raises ``AssertionError``, never a bare ``RuntimeError`` / ``ValueError``
(tests/unit/test_style.py checks that no module raises those).
"""


class KlearError(Exception):
    """Base of every user-facing error; the message names the field, file or component."""


class ConfigError(KlearError, ValueError):
    """A configuration value is invalid. The message names the field."""


class CheckpointError(KlearError, RuntimeError):
    """A checkpoint or model directory is missing, partial or of another shape."""


class ArgumentError(KlearError, ValueError):
    """A function of the package was called with an argument outside its contract (type,
    dtype, shape, range): from a user's script, or a bug in the caller. Names the argument."""


class DataError(KlearError, ValueError):
    """A data file or row is unusable; the message names the file (and row)."""


class EngineError(KlearError, RuntimeError):
    """The inference engine failed (died, timed out, rejected a request) after its retries."""


class EngineWeightError(EngineError):
    """The inference engine rejected or did not apply a weight (unknown name, wrong shape)."""


class StaleEngineError(EngineError):
    """Generation was asked of an inference engine whose last weight sync did not complete."""


class SyncError(KlearError, RuntimeError):
    """A weight sync failed; the inference engine is stale and must not generate."""


class LaunchError(KlearError, RuntimeError):
    """The job cannot be launched as configured; the message says what to change."""


class RewardError(KlearError, RuntimeError):
    """A reward cannot be computed at all (its checker does not start); never a wrong answer."""


class SandboxError(KlearError, RuntimeError):
    """The code sandbox cannot run programs (not installed, not permitted, failed to start).

    Never a failed test: the message names the backend and the reason.
    """


class OutputDirError(KlearError, RuntimeError):
    """The output directory cannot be used: another live run holds it, or it is not writable."""
