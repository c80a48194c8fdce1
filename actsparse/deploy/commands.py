"""The commands that talk to a board over RPC: `actsparse deploy` and `actsparse bench --rpc`.

`cli.py` parses their arguments and calls these; the protocol itself is in `deploy/rpc.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from actsparse.errors import ActsparseError, one_line


def _rpc_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ActsparseError(f"--rpc {text!r}: expected HOST:PORT, e.g. 192.168.1.20:9090")
    return host, int(port)


def deploy_command(args) -> int:
    """`actsparse deploy`: upload, verify, run, compare with the packed reference (an LM: greedy tokens)."""
    from actsparse.deploy.reference import INPUTS_FILE, OUTPUTS_FILE, choose_reference
    from actsparse.deploy.rpc import deploy_and_run
    from actsparse.runtime.artifact import read_verified_files

    host, port = _rpc_address(args.rpc)
    manifest, packed = read_verified_files(args.artifact, (INPUTS_FILE, OUTPUTS_FILE))
    if "lm" in manifest:
        return _deploy_lm(args, manifest, host, port)
    reference = choose_reference(manifest, packed, reference=args.reference, inputs=args.inputs, seed=args.seed,
                                 atol=args.atol)
    result = deploy_and_run(args.artifact, reference.inputs, host, port, key=args.key, timeout=args.timeout,
                            reference=reference.outputs, atol=reference.atol, token=_token(args))
    print(f"deployed to {host}:{port} ({result.device.get('machine', '?')}): checksums verified, "
          f"ran in {min(result.seconds) * 1e3:.2f} ms", file=sys.stderr)
    if result.max_abs_error is not None:
        worst = max(result.max_abs_error.values()) if result.max_abs_error else 0.0
        print(one_line(f"matches {reference.described} to {worst:.2e} (atol {reference.atol:g}{reference.why_atol})"),
              file=sys.stderr)
    else:
        print(one_line(f"outputs not compared with {reference.described}"), file=sys.stderr)
    return 0


def _token(args) -> bytes | None:
    from actsparse.deploy.server import read_token

    return read_token(Path(args.token_file)) if getattr(args, "token_file", None) else None


def _deploy_lm(args, manifest: dict, host: str, port: int) -> int:
    """An LM artifact: greedy tokens generated on the board, compared with a reference artifact
    for this machine (--reference HOST_LM.actsparse) when one is given."""
    from actsparse.deploy.rpc import LM_CHECK_NEW_TOKENS, check_greedy_tokens, generate_on_board

    result = generate_on_board(args.artifact, manifest, host, port, LM_CHECK_NEW_TOKENS, key=args.key,
                               timeout=args.timeout, token=_token(args))
    print(f"deployed to {host}:{port} ({result['device'].get('machine', '?')}): checksums verified; generated "
          f"{len(result['tokens'])} tokens at {result['decode_tokens_per_second']:.1f} tok/s decode, "
          f"{result['prompt_tokens_per_second']:.1f} tok/s prompt", file=sys.stderr)
    print(" ".join(map(str, result["tokens"])))
    if args.reference:
        check_greedy_tokens(args.reference, manifest, result["tokens"])
        print(f"greedy tokens equal {args.reference}'s", file=sys.stderr)
    return 0


def bench_remote_command(args) -> dict:
    """`actsparse bench --rpc`: device-side timings, printed; the results for --json."""
    from actsparse.deploy.rpc import generate_on_board, time_on_board
    from actsparse.runtime.artifact import read_verified_manifest

    host, port = _rpc_address(args.rpc)
    manifest = read_verified_manifest(args.artifact)  # for another machine: checked, not loaded
    if "lm" in manifest:
        result = generate_on_board(args.artifact, manifest, host, port, max(2, args.iters), key=args.key,
                                   token=_token(args))
        print(f"{host}:{port}: decode {result['decode_tokens_per_second']:.2f} tok/s, prompt "
              f"{result['prompt_tokens_per_second']:.2f} tok/s (device side, {len(result['tokens'])} greedy tokens)")
        return {k: v for k, v in result.items() if k != "tokens"}
    from actsparse.benchmark.artifact import print_remote_bench

    results = time_on_board(args.artifact, manifest, host, port, args.iters, key=args.key, token=_token(args))
    print_remote_bench(results)
    return results
