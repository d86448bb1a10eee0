"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class QerlError(ValueError):
    """A user mistake (bad config, missing file, unsupported model): message is shown as is."""
