"""The README's commands run as written, and the documentation's links resolve.

The quick-start shell block runs in a temp folder, with `actsparse` on PATH as a shim that runs
this interpreter's `python -m actsparse.cli` on this checkout; then the Python API and
text-generation blocks run in the same folder, on the files the quick start wrote. Nothing in
the commands is rewritten. Only the block's set-up lines (`make setup`, `source
.venv/bin/activate`) are left out: the interpreter running the tests is that environment.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_BYTES = 15 * 1024
SETUP_LINES = ("make setup", "source .venv/bin/activate")


def code_block(markdown: str, heading: str, language: str) -> str:
    """The first ```language block after the line `heading`."""
    section = markdown[markdown.index(f"\n{heading}\n"):]
    match = re.search(rf"^```{language}\n(.*?)^```", section, re.S | re.M)
    assert match, f"no {language} block under {heading!r}"
    return match.group(1)


def without_setup(script: str) -> str:
    return "\n".join(line for line in script.splitlines() if not line.startswith(SETUP_LINES)) + "\n"


def run(command: list[str], cwd: Path, env: dict[str, str], what: str) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"{what} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory):
    """Runs the README's quick start; returns (folder, environment, stdout)."""
    work = tmp_path_factory.mktemp("readme")
    shims = work / "bin"
    shims.mkdir()
    shim = shims / "actsparse"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m actsparse.cli "$@"\n')
    shim.chmod(0o755)
    env = os.environ | {
        "PATH": f"{shims}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
    }
    script = work / "quick_start.sh"
    script.write_text(without_setup(code_block(README.read_text(), "## Quick start", "bash")))
    out = run(["bash", "-e", str(script)], work, env, "the README's quick start")
    return work, env, out


@pytest.mark.slow
def test_quick_start_runs_as_written(quick_start):
    work, _, out = quick_start
    for name in ("ffn.onnx", "ffn.sparse.onnx", "again.onnx", "report.json", "out.npz",
                 "ffn.actsparse/manifest.json", "lm-mini", "lm.actsparse/manifest.json"):
        assert (work / name).exists(), name
    assert "sparsify" in out


@pytest.mark.slow
def test_python_api_block_runs_as_written(quick_start):
    work, env, _ = quick_start
    (work / "api.py").write_text(code_block(README.read_text(), "## Python API", "python"))
    run([sys.executable, "api.py"], work, env, "the README's Python API block")
    assert (work / "mlp.actsparse" / "manifest.json").exists()


@pytest.mark.slow
def test_generation_block_runs_as_written(quick_start):
    work, env, _ = quick_start
    (work / "generate.py").write_text(code_block(README.read_text(), "## Text generation", "python"))
    out = run([sys.executable, "generate.py"], work, env, "the README's text generation block")
    assert out.strip()


def test_readme_stays_short():
    assert len(README.read_bytes()) <= README_MAX_BYTES


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#+ (.*)$", without_code(markdown), re.M)}


def without_code(markdown: str) -> str:
    """The text outside fenced code blocks (links and headings there are not links)."""
    return re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", without_code(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # a web address: not checked offline
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links that do not resolve: {broken}"
