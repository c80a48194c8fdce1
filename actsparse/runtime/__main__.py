"""`python -m actsparse.runtime run ARTIFACT [--inputs in.npz] [-o out.npz] [--seed N]` and
`python -m actsparse.runtime generate LM_ARTIFACT --prompt-ids 1,2,3 [...]`: the thin runtime's
command line, for devices that have only numpy, safetensors and apache-tvm-ffi."""

from __future__ import annotations

import argparse
import sys

from actsparse.errors import ActsparseError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m actsparse.runtime", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a compiled artifact once")
    run.add_argument("artifact")
    run.add_argument("--inputs", help=".npz with one array per input name (default: random inputs)")
    run.add_argument("-o", "--output", help="write the outputs to this .npz (default: print a summary)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--trust", action="append", default=[], metavar="PUB",
                     help="refuse the artifact unless this public key signed it (repeatable)")
    from actsparse.runtime.generate_command import add_generate_arguments, generate_command

    generate = sub.add_parser("generate", help="generate with a language-model artifact")
    add_generate_arguments(generate)
    generate.add_argument("--trust", action="append", default=[], metavar="PUB",
                          help="refuse the artifact unless this public key signed it (repeatable)")
    args = parser.parse_args(argv)
    from actsparse.runtime.run_command import run_artifact_command

    try:
        if args.trust:
            from actsparse.runtime.signing import trust_in_this_process

            trust_in_this_process(args.trust)
        if args.command == "generate":
            return generate_command(args)
        return run_artifact_command(args.artifact, args.inputs, args.output, args.seed)
    except ActsparseError as exc:
        print(f"actsparse: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
