"""Issue 16 part 5: the in-repo LM compiled for rpi4 generates on the emulated board (qemu) with
the thin runtime's `generate` command (prompt through the prefill chunk, then decode steps), and
its greedy tokens equal the host-compiled artifact's."""

from __future__ import annotations

import json

import pytest

import actsparse

pytestmark = pytest.mark.slow
PROMPT = [256] + list(b"import os\n")


@pytest.fixture(scope="module")
def lm_checkpoint(tmp_path_factory):
    pytest.importorskip("torch")
    from actsparse.lm.model import build_lm, save_lm

    folder = tmp_path_factory.mktemp("lm") / "tiny"
    save_lm(build_lm("tiny", seed=11), folder)
    return folder


@pytest.mark.parametrize("passes", [None, "sparsify{method=teal,sparsity=0.5}"])
def test_rpi4_lm_generates_the_host_tokens(lm_checkpoint, arm_userland, run_on_arm, tmp_path, passes):
    from actsparse.lm.compile import compile_causal_lm

    runtime = arm_userland / "lib" / "libtvm_runtime.so"
    arm = compile_causal_lm(lm_checkpoint, "rpi4", passes, output=tmp_path / "lm.rpi4.actsparse", max_context=64,
                            bundle_runtime=str(runtime))
    host = compile_causal_lm(lm_checkpoint, "host", passes, output=tmp_path / "lm.host.actsparse", max_context=64)
    # the 11-token prompt runs as one padded chunk through the NEON build's prefill
    assert json.loads((arm.path / "manifest.json").read_text())["lm"]["prefill"] == {"tokens": 32}
    expected = list(actsparse.load(host.path).generate(PROMPT, 24, stop_tokens=[]))
    device_cli = "import sys; from actsparse.runtime.__main__ import main; sys.exit(main(sys.argv[1:]))"
    run = run_on_arm(device_cli, "generate", arm.path, "--prompt-ids", ",".join(map(str, PROMPT)),
                     "--max-new-tokens", "24", "--stop", "", timeout=900)
    assert [int(t) for t in run.stdout.split()] == expected
    assert "decode: 24 tokens" in run.stderr
