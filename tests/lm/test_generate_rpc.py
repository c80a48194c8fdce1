"""LM artifacts over the device server (127.0.0.1): `actsparse deploy` generates on the device and
compares with a host artifact, `bench --rpc` reports device-side tok/s; the server never loads a
bare shared library a client uploads."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("tvm")

from actsparse.cli import main  # noqa: E402
from actsparse.deploy.process import start_local_rpc_server  # noqa: E402
from actsparse.lm.compile import compile_causal_lm  # noqa: E402


@pytest.fixture(scope="module")
def lm_artifact(tmp_path_factory):
    from actsparse.lm.model import build_lm, save_lm

    folder = tmp_path_factory.mktemp("rpc-lm")
    save_lm(build_lm("tiny", seed=2), folder / "ckpt")
    return compile_causal_lm(folder / "ckpt", "host", "sparsify{method=teal,sparsity=0.5}",
                             output=folder / "lm.actsparse", max_context=64).path


@pytest.fixture(scope="module")
def server():
    with start_local_rpc_server(key="lm-test") as running:
        yield running


def test_deploy_generates_on_the_device_and_matches_the_reference(lm_artifact, server, capsys):
    rpc = f"127.0.0.1:{server.port}"
    assert main(["deploy", str(lm_artifact), "--rpc", rpc, "--key", "lm-test", "--reference", str(lm_artifact)]) == 0
    out, err = capsys.readouterr()
    assert len(out.split()) == 32 and "greedy tokens equal" in err and "tok/s decode" in err


def test_bench_rpc_reports_device_side_tokens_per_second(lm_artifact, server, tmp_path, capsys):
    rpc = f"127.0.0.1:{server.port}"
    report = tmp_path / "bench.json"
    assert main(["bench", str(lm_artifact), "--rpc", rpc, "--key", "lm-test", "--iters", "8",
                 "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["decode_tokens_per_second"] > 0 and data["device"]["machine"]


def test_server_refuses_to_load_an_uploaded_library(server, tmp_path):
    from tvm import rpc

    session = rpc.connect("127.0.0.1", server.port, key="lm-test")
    library = tmp_path / "evil.so"
    library.write_bytes(b"\x7fELF")  # never opened: refused by name, whatever it holds
    session.upload(str(library), "evil.so")
    with pytest.raises(Exception, match="refused to load"):
        session.load_module("evil.so")
