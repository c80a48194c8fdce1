"""Glue around TVM's ONNX importer: weights handed over as params, its errors and its stderr."""

from __future__ import annotations

from typing import Any


def weights_as_params(mod, params: dict, weights: list) -> tuple[Any, dict[str, list]]:
    """Put the weights that `ir.large.weightless_proto` made graph inputs back among the params.

    TVM's importer saw them as inputs after the model's own ones: `main(*inputs, *weights,
    *params)`. `num_input` drops to the model's own inputs, and the weights' arrays (in memory,
    or memory-mapped from their external-data file) go first in the params, so that `main` is
    again `main(*inputs, *params)`. The importer never held them: it would have copied each
    weight twice (onnx.numpy_helper, then a TVM tensor) and needs a protobuf under 2 GB.
    """
    arrays = {name: [p.numpy() for p in values] for name, values in params.items()}
    if not weights:
        return mod, arrays
    main = mod["main"]
    mod["main"] = main.with_attr("num_input", int(main.attrs["num_input"]) - len(weights))
    arrays["main"] = [w.const_value.numpy() for w in weights] + arrays.get("main", [])
    return mod, arrays


def tvm_error_summary(exc: BaseException) -> str:
    """The line of a TVM exception that says what went wrong: TVM's messages end with source
    excerpts and caret lines ("^^^^"), so the last line alone can be nothing but carets."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if lines and any(marker in str(exc) for marker in ("Error in pass:", "Location (TVMScript)")):
        return lines[0][:300]  # TVM's diagnostics: the message first, then the script it points into
    meaningful = [line for line in lines if any(ch.isalnum() for ch in line) and not line.startswith("File ")]
    for line in reversed(meaningful):
        for marker in ("Check failed:", "Error:", "error:"):
            if marker in line:
                return line[line.index(marker):][:300]
    return (meaningful[-1] if meaningful else type(exc).__name__)[:300]


class quiet_native_stderr:
    """Capture what native code (TVM's C++ logging) writes to file descriptor 2 while TVM runs:
    a warning such as "BlockBuilder destroyed with remaining blocks" must not come before the
    one-line error. The captured text is dropped on failure and written out on success with
    ACTSPARSE_DEBUG set."""

    def __enter__(self):
        import os
        import sys
        import tempfile

        sys.stderr.flush()
        self._saved = os.dup(2)
        self._capture = tempfile.TemporaryFile()
        os.dup2(self._capture.fileno(), 2)
        return self

    def __exit__(self, kind, value, traceback):
        import os
        import sys

        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        if kind is None and os.environ.get("ACTSPARSE_DEBUG"):
            self._capture.seek(0)
            sys.stderr.write(self._capture.read().decode("utf-8", "replace"))
        self._capture.close()
        return False
