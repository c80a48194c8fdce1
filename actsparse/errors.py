"""Errors a user can cause. The CLI prints them as one line and exits with status 2."""


class ActsparseError(Exception):
    """Bad input, bad option or unsupported model: the user's to fix, not a bug."""


class VerificationError(ActsparseError):
    """A pass produced a model that fails onnx.checker or does not match the model before it."""


def one_line(text: str) -> str:
    """`text` with line breaks and other control characters escaped: names from a hostile file
    (a tar member called "\\r", a path with a newline) must not break the one-line error or
    drive the terminal."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
