"""Run the CLI in-process on hostile input and check the promises every run must keep.

Each call of `run_cli` is one fuzz case. It checks:
- the exit status is 0 or 2 (1 is an internal error, anything else a crash);
- stderr holds no traceback, and on failure exactly one line, `actsparse: error: ...`;
- the case ended within its deadline (an interval timer interrupts a hang);
- no file appeared in the case folder except the outputs a successful run may write,
  and no file the case created is left in the temp folder.

Counts of cases per category go to `COUNTS`, which the session summary prints.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, settings

from actsparse import cli

COUNTS: Counter[str] = Counter()

# Folders other libraries create in the temp folder and keep by design (not ours to clean).
THIRD_PARTY_CACHES = ("torchinductor_",)

# Cases per fuzz test in the default (CI) run; ACTSPARSE_FUZZ_EXAMPLES replaces it.
FUZZ_ENV = "ACTSPARSE_FUZZ_EXAMPLES"


class CaseTimeout(BaseException):
    """Raised by the interval timer; a BaseException so the CLI's own handlers cannot swallow it."""


@dataclass
class Outcome:
    status: int
    stdout: str
    stderr: str


def examples(default: int, *, share: float = 1.0) -> int:
    """Cases for one fuzz test: `default`, or ACTSPARSE_FUZZ_EXAMPLES x `share` when set."""
    value = os.environ.get(FUZZ_ENV)
    if not value:
        return default
    return max(1, int(int(value) * share))


def fuzz_settings(default: int, *, share: float = 1.0) -> settings:
    """Hypothesis settings for a fuzz test: no example database (nothing written to the
    repository), our own deadline instead of Hypothesis's (imports make first calls slow).
    Under CI the cases are derandomized (the same every run, so a landing never depends on
    luck); elsewhere they are random, and ACTSPARSE_FUZZ_EXAMPLES runs more of them."""
    return settings(
        max_examples=examples(default, share=share),
        derandomize=bool(os.environ.get("CI")),
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                               HealthCheck.function_scoped_fixture],
    )


def listing(folder: Path) -> set[str]:
    """Every path under `folder`, relative, including folders and dotfiles."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


@contextlib.contextmanager
def deadline(seconds: float):
    """Interrupt the block with CaseTimeout after `seconds` (main thread only)."""

    def expire(signum, frame):
        raise CaseTimeout(f"case ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def private_tempdir(root: Path):
    """Point `tempfile` at a fresh folder for the block, so leftovers can be seen."""
    folder = Path(tempfile.mkdtemp(prefix="tmp-", dir=root))
    saved = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = saved


def run_cli(argv: list[str], folder: Path, *, category: str, outputs: tuple[str, ...] = (),
            seconds: float = 20.0) -> Outcome:
    """Run `actsparse <argv>` in-process and assert the promises above.

    `folder` is the case's folder (inputs live there); `outputs` are the names, relative
    to it, that a successful run may create.
    """
    COUNTS[category] += 1
    before = listing(folder)
    out, err = io.StringIO(), io.StringIO()
    with private_tempdir(folder.parent) as tmp:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                with deadline(seconds):
                    status = cli.main([str(a) for a in argv])
            except SystemExit as exc:  # argparse usage errors
                status = exc.code if isinstance(exc.code, int) else 2
        # torch (imported by the predictor pass) keeps its compile cache in the temp folder on purpose.
        leftovers = {p for p in listing(tmp) if not p.startswith(THIRD_PARTY_CACHES)}
        if not leftovers:
            shutil.rmtree(tmp, ignore_errors=True)
    outcome = Outcome(status, out.getvalue(), err.getvalue())
    check_outcome(outcome, argv)
    assert not leftovers, f"temp files left behind by {argv}: {sorted(leftovers)}"
    after = listing(folder)
    assert before <= after, f"{argv} removed input files {sorted(before - after)}"
    may_create = _with_parents(outputs) if outcome.status == 0 else set()
    unexpected = {p for p in after - before if p not in may_create and not _inside(p, outputs)}
    if outcome.status != 0:
        unexpected = after - before
    assert not unexpected, f"{argv} (exit {outcome.status}) left {sorted(unexpected)}; stderr: {outcome.stderr!r}"
    return outcome


def check_outcome(outcome: Outcome, argv) -> None:
    """Exit 0 or 2, no traceback, one `actsparse: error:` line on failure."""
    assert outcome.status in (0, 2), f"exit {outcome.status} for {argv}: {outcome.stderr!r}"
    assert "Traceback" not in outcome.stderr, f"traceback for {argv}: {outcome.stderr}"
    if outcome.status == 2:
        lines = outcome.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("actsparse: error: "), (
            f"failure of {argv} must be one 'actsparse: error:' line, got {outcome.stderr!r}")


def _with_parents(names: tuple[str, ...]) -> set[str]:
    found = set()
    for name in names:
        parts = Path(name).parts
        found |= {Path(*parts[: i + 1]).as_posix() for i in range(len(parts))}
    return found


def _inside(path: str, outputs: tuple[str, ...]) -> bool:
    """Whether `path` lies inside an output folder (a directory artifact holds several files)."""
    return any(path.startswith(o.rstrip("/") + "/") for o in outputs)


class CaseFolders:
    """Fresh folders for fuzz cases under one root; each is removed when its case ends."""

    def __init__(self, root: Path):
        self.root = root
        self.count = 0

    @contextlib.contextmanager
    def new(self):
        self.count += 1
        folder = self.root / f"case{self.count}"
        folder.mkdir()
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
