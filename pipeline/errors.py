"""Errors that the CLI prints as one actionable message (non-zero exit, no traceback)."""


class KDMError(Exception):
    """A user-facing error: the message says what is wrong and what to do."""


class ArtifactExists(KDMError):
    pass


class ArtifactMissing(KDMError):
    pass


class DataCorrupt(KDMError):
    """Stored data does not match what its manifest recorded (a missing, truncated or altered file)."""
