"""ReLUfication by fine-tuning (ProSparse): smooth FFN activations -> ReLU family, trained back.

1. Swap: every SiLU/GELU activation module of the model's FFN blocks becomes a
   `SparseActivation` (relu, shifted_relu = relu(x - shift), or relu2 = relu(x)^2).
   Module replacement, not torch.fx: a Hugging Face decoder's forward has data-dependent
   branches (cache, masks, output dicts) that `torch.fx.symbolic_trace` cannot trace, while the
   activation is already a submodule (`mlp.act_fn`) whose replacement the dynamo ONNX
   exporter sees as a plain Relu.
2. Fine-tune with ProSparse's progressive L1 regularization on the FFN activations: the loss is
   LM loss + lambda(t) * sum over layers of mean |act(gate)|, where lambda rises from 0 through
   `l1_stages` targets, each reached along a quarter sine (lambda_{i-1} + (lambda_i -
   lambda_{i-1}) * sin(pi/2 * t / T_i)) and then held for the stage's remaining steps.
3. Export to ONNX (`export_hf`): the graph has Relu where SiLU was, for `sparsify`/`predictor`.

`relufy()` reports per-layer activation sparsity (fraction of exact zeros of act(gate) on
held-out text) and perplexity before the swap, right after it, and after fine-tuning.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actsparse.errors import ActsparseError

ACTS = ("relu", "shifted_relu", "relu2")
SMOOTH_ACTIVATIONS = ("SiLU", "SiLUActivation", "GELU", "GELUActivation", "NewGELUActivation",
                      "GELUTanh", "PytorchGELUTanh", "FastGELUActivation", "QuickGELUActivation")


def _torch():
    import torch

    return torch


class SparseActivation(_torch().nn.Module):
    """relu(x), relu(x - shift) or relu(x)^2; keeps its last output for the L1 regularizer."""

    def __init__(self, act: str = "relu", shift: float = 0.0):
        super().__init__()
        if act not in ACTS:
            raise ActsparseError(f"activation must be one of {', '.join(ACTS)}, got {act!r}")
        self.act, self.shift = act, float(shift)
        self.record = False
        self.last = None

    def forward(self, x):
        torch = _torch()
        y = torch.relu(x - self.shift) if self.act == "shifted_relu" and self.shift else torch.relu(x)
        if self.act == "relu2":
            y = y * y
        if self.record:
            self.last = y
        return y

    def extra_repr(self) -> str:
        return f"act={self.act}, shift={self.shift}"


def swap_activations(model, act: str = "relu", shift: float = 0.0) -> list[str]:
    """Replace the smooth activation modules in place; returns their module paths."""
    swapped = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child).__name__ in SMOOTH_ACTIVATIONS:
                setattr(parent, child_name, SparseActivation(act, shift))
                swapped.append(f"{parent_name}.{child_name}".lstrip("."))
    if not swapped:
        raise ActsparseError(f"{type(model).__name__} has no SiLU/GELU activation modules to replace")
    return swapped


def sparse_activations(model) -> dict[str, SparseActivation]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseActivation)}


def l1_schedule(step: int, steps: int, stages: tuple[float, ...]) -> float:
    """ProSparse's progressive factor: stage i (of equal length) raises lambda from stage i-1's
    value to stages[i] along a quarter sine over its first half, then holds it."""
    if not stages:
        return 0.0
    length = steps / len(stages)
    index = min(int(step // length), len(stages) - 1)
    before = stages[index - 1] if index else 0.0
    t = (step - index * length) / max(1.0, length / 2)
    return before + (stages[index] - before) * math.sin(math.pi / 2 * min(1.0, t))


def activation_sparsity(model, windows: np.ndarray, batch: int = 8) -> dict[str, float]:
    """Per FFN activation: the fraction of its outputs that are exactly zero on `windows`
    (smooth activations are measured as outputs <= 0: what a ReLU would drop)."""
    torch = _torch()
    counts: dict[str, list[float]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, SparseActivation) or type(module).__name__ in SMOOTH_ACTIVATIONS:
            def hook(mod, inputs, output, name=name):
                zero = (output == 0) if isinstance(mod, SparseActivation) else (inputs[0] <= 0)
                entry = counts.setdefault(name, [0.0, 0])
                entry[0] += float(zero.sum())
                entry[1] += zero.numel()
            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(windows), batch):
                model(input_ids=torch.from_numpy(windows[start:start + batch, :-1]))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {name: round(zeros / total, 4) for name, (zeros, total) in counts.items()}


@dataclass
class RelufyResult:
    """The fine-tuned torch model, its ONNX export, and what it cost."""

    model: Any
    onnx: Any
    report: dict = field(default_factory=dict)


def relufy(model, data: np.ndarray, *, eval_windows: np.ndarray, act: str = "relu", shift: float = 0.0,
           steps: int = 200, lr: float = 1e-3, l1_stages: tuple[float, ...] = (0.05, 0.1, 0.2),
           seq_len: int = 128, batch: int = 16, seed: int = 0, export_seq_len: int = 128,
           minutes: float | None = None, export: bool = True) -> RelufyResult:
    """Swap the FFN activations to `act`, fine-tune on `data` (a token array) with progressive L1
    for `steps` steps, and export to ONNX. `eval_windows` ([n, L + 1] tokens, held-out) measure
    perplexity and per-layer sparsity before and after. The model is changed in place."""
    from actsparse.lm.train import fit, make_optimizer, perplexity

    torch = _torch()
    torch.manual_seed(seed)
    report: dict[str, Any] = {"act": act, "shift": shift, "steps": steps, "lr": lr, "l1_stages": list(l1_stages)}
    report["before"] = {"perplexity": round(perplexity(model, eval_windows), 4),
                        "sparsity": activation_sparsity(model, eval_windows)}
    report["swapped"] = swap_activations(model, act, shift)
    report["after_swap"] = {"perplexity": round(perplexity(model, eval_windows), 4),
                            "sparsity": activation_sparsity(model, eval_windows)}
    acts = list(sparse_activations(model).values())

    def l1(step: int):
        factor = l1_schedule(step, steps, l1_stages)
        return factor * sum(a.last.abs().mean() for a in acts)

    for a in acts:
        a.record = True
    started = time.monotonic()
    try:
        reached = fit(model, data, steps=steps, lr=lr, seq_len=seq_len, batch=batch, seed=seed + 1,
                      warmup=max(1, steps // 20), optimizer=make_optimizer(model, lr, 0.0), extra_loss=l1,
                      deadline=started + minutes * 60 if minutes else None, description="relufy fine-tune")
    finally:
        for a in acts:
            a.record, a.last = False, None
    report["fine_tune"] = {"steps_done": reached, "seconds": round(time.monotonic() - started, 1),
                           "tokens": reached * batch * seq_len}
    sparsity = activation_sparsity(model, eval_windows)
    report["after"] = {"perplexity": round(perplexity(model, eval_windows), 4), "sparsity": sparsity,
                       "mean_sparsity": round(float(np.mean(list(sparsity.values()))), 4)}
    report["perplexity_change"] = round(report["after"]["perplexity"] / report["before"]["perplexity"] - 1, 4)
    onnx_model = None
    if export:
        from actsparse.frontend.torch_export import export_hf

        onnx_model = export_hf(model, seq_len=export_seq_len)
    return RelufyResult(model, onnx_model, report)
