"""Errors a user can cause. The CLI prints them as one line and exits with their code."""


class LorakitError(Exception):
    """A mistake the user can fix (bad file, bad config value, missing model).

    The message is one line that names the file, record or key and says what to do.
    The CLI prints ``error: <message>`` and exits with ``exit_code``; no traceback.
    """

    exit_code = 2


class DataError(LorakitError):
    """Bad training or evaluation data: names the file and the record (or line)."""

    def __init__(self, path, message: str, record: str | None = None):
        where = f"{path}: {record}: " if record else f"{path}: "
        super().__init__(where + message)
        self.path = str(path)
        self.record = record


class ConfigError(LorakitError):
    """A bad configuration key or value: names the key."""


class ModelError(LorakitError):
    """A base model or adapter that cannot be found or loaded."""
