"""Errors with messages meant for users (the CLI prints them without a traceback)."""


class QueptError(Exception):
    """Base class of the errors quept reports to users."""


class CheckpointError(QueptError):
    """A checkpoint is missing, malformed, truncated or altered; the message names file and tensor."""


class PrecisionError(QueptError, ValueError):
    """A precision spec is malformed or asks for something the checkpoint does not hold."""


class SourceModelError(QueptError):
    """The source model cannot be found or is not a supported LLaMA-family model."""


class ContextLengthError(QueptError, ValueError):
    """A prompt (plus the tokens asked for) does not fit the context."""
