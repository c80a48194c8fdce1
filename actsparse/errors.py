"""Errors a user can cause. The CLI prints them as one line and exits with status 2."""


class ActsparseError(Exception):
    """Bad input, bad option or unsupported model: the user's to fix, not a bug."""


class VerificationError(ActsparseError):
    """A pass produced a model that fails onnx.checker or does not match the model before it."""
