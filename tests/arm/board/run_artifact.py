"""Run artifacts on the (emulated) board.

    python run_artifact.py INPUTS.npz ARTIFACT OUTPUTS.npz [ARTIFACT OUTPUTS.npz ...]


Loads each artifact with `actsparse.runtime.load` (the thin runtime), runs it once on the
inputs and saves its outputs. Prints one JSON line per artifact: {"load_s", "run_s"} or
{"error": message} when the runtime refused it; then a last line {"modules": the heavy
packages that got imported (must be none)}.
"""

import json
import sys
import time

import numpy as np

import actsparse.runtime

HEAVY = ("tvm", "torch", "onnx", "onnxruntime")


def run_one(artifact, inputs, outputs_path):
    start = time.perf_counter()
    try:
        model = actsparse.runtime.load(artifact)
    except actsparse.runtime.ActsparseError as exc:
        return {"error": str(exc)}
    loaded = time.perf_counter()
    outputs = model.run(inputs)
    ran = time.perf_counter()
    np.savez(outputs_path, **outputs)
    return {"load_s": loaded - start, "run_s": ran - loaded}


def main(inputs_path, *pairs):
    with np.load(inputs_path, allow_pickle=False) as data:
        inputs = {name: data[name] for name in data.files}
    for artifact, outputs_path in zip(pairs[::2], pairs[1::2]):
        print(json.dumps(run_one(artifact, inputs, outputs_path)), flush=True)
    print(json.dumps({"modules": sorted(name for name in HEAVY if sys.modules.get(name) is not None)}))


if __name__ == "__main__":
    main(*sys.argv[1:])
