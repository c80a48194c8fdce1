"""Accuracy of int8 + TEAL prompt chunks on AVX-512 VNNI: x rounded to int8 per row (what the chunk
runs) against float x times the same int8 codes, the float model, and the decode steps.

Compiles a causal LM (default: the in-repo byte-level LM from ``actsparse example lm -o lm-mini``)
four ways: float, int8 (dynamic; its chunks multiply float x by the codes), int8 + TEAL 50 %, and
int8 + TEAL at sparsity 1e-6 (every input that could round to a nonzero code is active, so its
decode steps run the VNNI kernel densely). For ``--prompts`` windows of ``--length`` bytes of a
standard-library file it compares the last position's logits: max |dlogit|, mean KL(float || x)
and top-1 agreement against the float model, and the max |dlogit| between chunks and steps.

    .venv/bin/python benchmarks/prompt_int8_vnni_accuracy.py lm-mini [--prompts 16 --length 96]
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import actsparse  # noqa: E402
from actsparse.lm.compile import compile_causal_lm  # noqa: E402
from common import write_report  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "prompt_int8_vnni_accuracy.json"
PASSES = {"float": "", "int8 (float x chunks)": "quantize{mode=dynamic,bits=8}",
          "int8 + TEAL 50%": "sparsify{method=teal,sparsity=0.5},quantize{mode=dynamic,bits=8}",
          "int8 + TEAL all active": "sparsify{method=teal,sparsity=0.000001},quantize{mode=dynamic,bits=8}"}


def chunks(lm, prompt: list[int]) -> np.ndarray:
    lm.reset()
    return lm.prefill(prompt)


def steps(lm, prompt: list[int]) -> np.ndarray:
    lm.reset()
    for token in prompt:
        logits = lm.step(token)
    return logits


def kl(reference: np.ndarray, logits: np.ndarray) -> float:
    def log_softmax(z):
        z = z.astype(np.float64) - z.max()
        return z - np.log(np.exp(z).sum())

    p, q = log_softmax(reference), log_softmax(logits)
    return float(np.sum(np.exp(p) * (p - q)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a causal LM folder (in-repo checkpoint or Hugging Face)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--length", type=int, default=96, help="prompt bytes (the in-repo LM's tokens)")
    parser.add_argument("--text", default=str(Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"))
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    text = Path(args.text).read_bytes()
    prompts = [list(text[i * args.length: (i + 1) * args.length]) for i in range(args.prompts)]
    work = Path(tempfile.mkdtemp(prefix="vnni-accuracy-"))
    models, kernels = {}, {}
    for i, (name, passes) in enumerate(PASSES.items()):
        art = compile_causal_lm(args.model, "host", passes or None, output=work / f"{i}.actsparse",
                                max_context=args.length + 32)
        kernels[name] = sorted({layer["kernel"] for layer in art.kernels})
        models[name] = actsparse.load(art.path)
    teal, everything = models["int8 + TEAL 50%"], models["int8 + TEAL all active"]
    if not any(k.endswith("_vnni") for k in kernels["int8 + TEAL 50%"]):
        print("no VNNI kernel in the int8 + TEAL model (this CPU has no AVX-512 VNNI?)", file=sys.stderr)
    outputs = {"VNNI chunk (x per row)": [], "float-x chunk": [], "TEAL 50% steps": [], "all-active VNNI steps": []}
    gaps = {"VNNI chunk vs all-active steps": [], "float-x chunk vs all-active steps": [],
            "VNNI chunk vs TEAL 50% steps": []}
    for prompt in prompts:
        reference = chunks(models["float"], prompt)
        vnni, float_x = chunks(teal, prompt), chunks(models["int8 (float x chunks)"], prompt)
        sparse_steps, dense_steps = steps(teal, prompt), steps(everything, prompt)
        for name, logits in zip(outputs, (vnni, float_x, sparse_steps, dense_steps)):
            outputs[name].append((float(np.abs(logits - reference).max()), kl(reference, logits),
                                  bool(logits.argmax() == reference.argmax())))
        for name, (a, b) in zip(gaps, ((vnni, dense_steps), (float_x, dense_steps), (vnni, sparse_steps))):
            gaps[name].append(float(np.abs(a - b).max()))
    report = {"model": str(args.model), "prompts": args.prompts, "length": args.length, "text": args.text,
              "prefill_tokens": teal.prefill_tokens, "kernels": kernels, "vs_float": {}, "max_abs_gap": {}}
    print(f"{args.prompts} prompts of {args.length} tokens, last position; prefill chunks of {teal.prefill_tokens}\n")
    print("| logits vs the float model | max abs diff | mean KL(float || x) | top-1 agrees |")
    print("|---|---|---|---|")
    for name, rows in outputs.items():
        diff, divergence, agree = (np.array(column, dtype=float) for column in zip(*rows))
        report["vs_float"][name] = {"max_abs": diff.max(), "mean_kl": divergence.mean(), "top1": agree.mean()}
        print(f"| {name} | {diff.max():.4f} | {divergence.mean():.2e} | {agree.mean():.0%} |")
    print()
    for name, values in gaps.items():
        report["max_abs_gap"][name] = max(values)
        print(f"- {name}: max |dlogit| {max(values):.2e}")
    write_report(args.output, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
