"""The `generate` command, shared by `actsparse generate` and the device's
`python -m actsparse.runtime generate` (numpy + tvm_ffi only; `tokenizers` for text)."""

from __future__ import annotations

import argparse
import sys

from actsparse.errors import ActsparseError


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="LM artifact (from `actsparse compile MODEL_FOLDER`)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="prompt text (encoded with the artifact's tokenizer)")
    group.add_argument("--prompt-ids", help="prompt token ids, comma-separated (for artifacts without a tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--stop", default=None, help="stop token ids, comma-separated (default: the model's EOS; "
                                                "'' never stops early)")


def generate_command(args) -> int:
    """Stream the new text (or ids) to stdout; prompt and decode tok/s to stderr."""
    from actsparse.runtime import load
    from actsparse.runtime.generate import LanguageModel

    lm = load(args.artifact)
    if not isinstance(lm, LanguageModel):
        raise ActsparseError(f"{args.artifact}: not a language-model artifact (compile a causal-LM folder)")
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    repetition_penalty=args.repetition_penalty, seed=args.seed,
                    stop_tokens=id_list(args.stop, "--stop") if args.stop is not None else None)
    if args.prompt is not None:
        lm.generate_text(args.prompt, args.max_new_tokens, on_text=lambda piece: print(piece, end="", flush=True),
                         **sampling)
        print()
    else:
        for token in lm.generate(id_list(args.prompt_ids, "--prompt-ids"), args.max_new_tokens, **sampling):
            print(token, end=" ", flush=True)
        print()
    stats = lm.stats
    print(f"prompt: {stats.prompt_tokens} tokens, {stats.prompt_tokens_per_second:.1f} tok/s; "
          f"decode: {stats.new_tokens} tokens, {stats.decode_tokens_per_second:.1f} tok/s", file=sys.stderr)
    return 0


def id_list(text: str, flag: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ActsparseError(f"{flag} {text!r}: expected comma-separated token ids, e.g. 1,306,4658") from None
