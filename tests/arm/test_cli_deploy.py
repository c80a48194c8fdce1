"""`actsparse deploy` and `actsparse bench --rpc` against RPC servers on loopback: a local one
(x86 artifact) and the emulated Raspberry Pi (rpi4 artifact compiled with `actsparse compile`)."""

from __future__ import annotations

import onnx
import pytest

from actsparse.cli import main
from actsparse.deploy.process import start_local_rpc_server
from actsparse.frontend.zoo import swiglu_stack

KEY = "actsparse-cli-test"


@pytest.fixture(scope="module")
def ffn_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("deploy") / "ffn.onnx"
    onnx.save(swiglu_stack(layers=2, d=64, f=160), path)
    return path


@pytest.fixture(scope="module")
def host_artifact(ffn_onnx):
    out = ffn_onnx.with_name("ffn.host.actsparse")
    assert main(["compile", str(ffn_onnx), "-o", str(out), "--passes", "sparsify{method=teal,sparsity=0.5,scope=ffn}"]) == 0
    return out


@pytest.fixture(scope="module")
def local_server():
    with start_local_rpc_server(key=KEY) as server:
        yield server


def test_deploy_compares_with_a_tolerance(local_server, host_artifact, capsys):
    address = f"{local_server.host}:{local_server.port}"
    assert main(["deploy", str(host_artifact), "--rpc", address, "--key", KEY, "--atol", "1e9"]) == 0
    assert "checksums verified" in capsys.readouterr().err
    assert main(["deploy", str(host_artifact), "--rpc", address, "--key", KEY, "--atol", "1e-9"]) == 2
    assert capsys.readouterr().err.startswith("actsparse: error:")


def test_deploy_of_a_sparsified_artifact_compares_with_the_optimized_model(local_server, host_artifact, capsys):
    """The README's own flow: the board must compute the sparsified model, not merely come near the
    dense source (it differs from it by ~1): the reference is the optimized model's outputs packed
    at compile time, so a tight tolerance holds."""
    address = f"{local_server.host}:{local_server.port}"
    assert main(["deploy", str(host_artifact), "--rpc", address, "--key", KEY]) == 0
    err = capsys.readouterr().err
    assert "matches the optimized model the artifact was compiled from" in err and "atol 0.0001)" in err
    assert main(["deploy", str(host_artifact), "--rpc", address, "--key", KEY, "--atol", "1e-3"]) == 0


def test_deploy_of_an_int8_artifact_takes_its_tolerance_from_the_accuracy_report(local_server, ffn_onnx, capsys):
    out = ffn_onnx.with_name("ffn.int8.tar")
    assert main(["compile", str(ffn_onnx), "-o", str(out), "--passes", "quantize{bits=8}"]) == 0
    capsys.readouterr()
    address = f"{local_server.host}:{local_server.port}"
    assert main(["deploy", str(out), "--rpc", address, "--key", KEY]) == 0
    err = capsys.readouterr().err
    assert "matches the optimized model" in err and "int8/int4 kernels skip the graph's activation rounding" in err


def test_deploy_with_other_inputs_uses_the_source_model_only_while_unchanged(local_server, tmp_path, capsys):
    import numpy as np

    source = tmp_path / "ffn.onnx"
    onnx.save(swiglu_stack(layers=1, d=32, f=64), source)
    out = tmp_path / "ffn.actsparse"
    assert main(["compile", str(source), "-o", str(out), "--passes", "sparsify{method=teal,sparsity=0.5}"]) == 0
    capsys.readouterr()
    address = f"{local_server.host}:{local_server.port}"
    assert main(["deploy", str(out), "--rpc", address, "--key", KEY, "--seed", "3"]) == 0
    err = capsys.readouterr().err
    assert f"matches the source model {source.resolve()}" in err
    assert "covers only the default inputs, not --seed 3" in err and "the passes' measured error" in err

    changed = swiglu_stack(layers=1, d=32, f=64)
    changed.graph.initializer[0].raw_data = np.ones(32 * 64, np.float32).tobytes()
    onnx.save(changed, source)
    assert main(["deploy", str(out), "--rpc", address, "--key", KEY, "--seed", "3"]) == 0
    err = capsys.readouterr().err
    assert "outputs not compared" in err and "changed since compile" in err
    # The packed reference does not depend on the source file.
    assert main(["deploy", str(out), "--rpc", address, "--key", KEY]) == 0
    assert "matches the optimized model" in capsys.readouterr().err


def test_deploy_errors_are_one_line(host_artifact, capsys):
    assert main(["deploy", str(host_artifact), "--rpc", "localhost"]) == 2
    assert "expected HOST:PORT" in capsys.readouterr().err
    assert main(["deploy", str(host_artifact), "--rpc", "127.0.0.1:1", "--timeout", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("actsparse: error:")


def test_bench_over_rpc(local_server, host_artifact, capsys):
    address = f"{local_server.host}:{local_server.port}"
    assert main(["bench", str(host_artifact), "--rpc", address, "--key", KEY, "--iters", "5"]) == 0
    assert "remote timings" in capsys.readouterr().out


@pytest.mark.slow
def test_compile_then_deploy_to_the_emulated_board(arm_board, arm_device_package, arm_userland, ffn_onnx,
                                                   tmp_path, capsys):
    artifact = tmp_path / "ffn.rpi4.actsparse"
    runtime = arm_userland / "lib" / "libtvm_runtime.so"
    assert main(["compile", str(ffn_onnx), "-o", str(artifact), "--target", "rpi4", "--bundle-runtime", str(runtime),
                 "--passes", "sparsify{method=teal,sparsity=0.5}"]) == 0
    with arm_board.start_rpc_server(package_dir=arm_device_package, key=KEY, workdir=tmp_path / "board") as server:
        assert main(["deploy", str(artifact), "--rpc", f"{server.host}:{server.port}", "--key", KEY]) == 0
    err = capsys.readouterr().err
    # The README's flow: the board's sparse NEON kernels compute the optimized model, tightly.
    assert "(aarch64)" in err and "matches the optimized model" in err and "(atol 0.0001)" in err


@pytest.mark.slow
def test_cli_run_on_the_emulated_board(run_on_arm, arm_userland, ffn_onnx, tmp_path):
    """`python -m actsparse.runtime run` on the board: the staged package needs no torch/onnx/tvm."""
    import numpy as np

    artifact = tmp_path / "ffn.rpi4.actsparse"
    assert main(["compile", str(ffn_onnx), "-o", str(artifact), "--target", "rpi4",
                 "--bundle-runtime", str(arm_userland / "lib" / "libtvm_runtime.so")]) == 0
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    code = ("import sys; from actsparse.runtime.__main__ import main; rc = main(['run', sys.argv[1], '--inputs', sys.argv[2], "
            "'-o', sys.argv[3]]); heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'tvm')]; "
            "print(heavy); sys.exit(rc)")
    run = run_on_arm(code, artifact, tmp_path / "in.npz", tmp_path / "out.npz")
    assert run.stdout.strip().splitlines()[-1] == "[]"
    import onnxruntime as ort

    expected = ort.InferenceSession(str(ffn_onnx)).run(None, {"x": x})[0]
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_allclose(out["y"], expected, rtol=1e-4, atol=1e-4)


def test_deploy_of_an_artifact_compiled_from_an_optimized_int8_model(local_server, ffn_onnx, tmp_path, capsys):
    """optimize, then compile without passes: the optimized ONNX carries its accuracy report, so
    the int8 kernels' tolerance still comes from it (the default 1e-4 failed by ~0.04)."""
    quantized, out = tmp_path / "ffn.int8.onnx", tmp_path / "ffn.int8.actsparse"
    assert main(["optimize", str(ffn_onnx), "-o", str(quantized), "--passes", "quantize{bits=8}"]) == 0
    assert main(["compile", str(quantized), "-o", str(out)]) == 0
    capsys.readouterr()
    address = f"{local_server.host}:{local_server.port}"
    assert main(["deploy", str(out), "--rpc", address, "--key", KEY]) == 0
    err = capsys.readouterr().err
    assert f"matches the source model {quantized.resolve()}" in err and "int8/int4 kernels" in err
