"""How an `actsparse` command ends: every exception as one line on stderr and an exit status
(2 for the user's errors, 1 for a bug, 130/143 for Ctrl-C/SIGTERM), SIGTERM turned into an
exception so that cleanup runs, and the crash guard that runs the native compiler in a forked
child (a crash becomes one line, and no half-written output is left).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from actsparse.errors import ActsparseError, one_line

EXIT_USAGE = 2


def run_command(work) -> int:
    """`work()`'s exit status through `handled`, with SIGTERM and SIGINT raising inside it."""
    _received.clear()
    previous = _handle_sigterm(_on_sigterm)
    previous_int = _handle_signal("SIGINT", _on_sigint)
    try:
        return handled(work)
    finally:
        _handle_sigterm(previous)
        _handle_signal("SIGINT", previous_int)


class Terminated(BaseException):
    """SIGTERM, raised inside the running command so that its cleanup (`finally`, temp
    files) runs as for Ctrl-C. A BaseException: no `except Exception` may swallow it."""


# The signal this run received, if any: a library may turn the exception a signal raises
# inside it into one of its own errors, which must still read as the interruption it is.
_received: list[int] = []


def _on_sigterm(signum, frame):
    _received.append(143)
    raise Terminated()


def _on_sigint(signum, frame):
    _received.append(130)
    raise KeyboardInterrupt()


def _interrupted_message(status: int) -> str:
    what = "terminated" if status == 143 else "interrupted"
    return f"actsparse: {what}; no partial output was left"


def handled(work) -> int:
    """`work()`'s exit status, every exception turned into one line on stderr and a status."""
    try:
        return work() or 0
    except ActsparseError as exc:
        print(f"actsparse: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("actsparse: interrupted; no partial output was left", file=sys.stderr)
        return 130
    except Terminated:
        print("actsparse: terminated; no partial output was left", file=sys.stderr)
        return 143
    except ModuleNotFoundError as exc:
        if not _is_missing_compiler(exc):
            return _internal_error(exc)
        print(f"actsparse: error: this command needs the compiler, which this install lacks (no module "
              f"{exc.name!r}): pip install \"actsparse[compile]\"", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a bug, not the user's input: still one line unless asked
        if _received:  # raised by the interruption, inside a library that re-wrapped it
            print(_interrupted_message(_received[0]), file=sys.stderr)
            return _received[0]
        return _internal_error(exc)


def _is_missing_compiler(exc: ModuleNotFoundError) -> bool:
    """A device-only install (no `compile` extra) running a compiler command."""
    from actsparse import COMPILER_MODULES

    return (exc.name or "").split(".")[0] in COMPILER_MODULES


def _internal_error(exc: Exception) -> int:
    if os.environ.get("ACTSPARSE_DEBUG"):
        raise exc
    print(f"actsparse: internal error: {type(exc).__name__}: {one_line(str(exc).splitlines()[0]) if str(exc) else ''} "
          f"(set ACTSPARSE_DEBUG=1 for a traceback)", file=sys.stderr)
    return 1


def run_crash_guarded(work, output: str | None = None) -> int:
    """Run `work()` (which returns an exit status) in a forked child and return its status.

    No input may kill the command without a word: if the child dies of a signal (TVM or LLVM
    overflowing their stack on a pathological graph, a bad kernel), this says so in one line,
    removes the half-written temp files beside `output`, and raises ActsparseError (exit 2).
    SIGINT reaches the child directly (same process group); a SIGTERM sent to this process is
    passed on to it. Without fork (not POSIX), `work()` runs here.
    """
    import signal

    if not hasattr(os, "fork"):
        return work()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never return into the caller's stack
        status = 1
        try:
            status = work()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    forward = lambda signum, frame: os.kill(pid, signum)  # noqa: E731
    previous_term = _handle_signal("SIGTERM", forward)
    previous_int = _handle_signal("SIGINT", signal.SIG_IGN)  # the child gets it and reports
    try:
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
    finally:
        _handle_signal("SIGTERM", previous_term)
        _handle_signal("SIGINT", previous_int)
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        _remove_staging(output)
        raise ActsparseError(f"the compiler crashed on this model ({name}); nothing was written. Please report it "
                             "with the model (set ACTSPARSE_DEBUG=1 to see where)")
    return os.WEXITSTATUS(status)


def _remove_staging(output: str | None) -> None:
    """The temp files and folders a killed writer leaves beside its destination."""
    import shutil

    if not output:
        return
    destination = Path(output)
    for leftover in destination.parent.glob(f".{destination.name}.*tmp*"):
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def _handle_sigterm(handler):
    """Install `handler` for SIGTERM and return the previous one (None off the main thread,
    where Python cannot set signal handlers)."""
    return _handle_signal("SIGTERM", handler)


def _handle_signal(name: str, handler):
    import signal
    import threading

    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(getattr(signal, name), handler)
