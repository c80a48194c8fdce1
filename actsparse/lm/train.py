"""Train the tiny LM: `python -m actsparse.lm.train --out DIR [--minutes N] [--size small]`.

Reproducible: weights are initialized from `--seed` and step s trains on batch s of a
generator seeded with (seed, s), so an interrupted run resumed from its checkpoint ends with
the same weights as one that never stopped (up to float summation order across threads). The
learning-rate schedule (linear warm-up, cosine decay to 10 %) depends on `--steps` only;
`--minutes` bounds the wall time: when it runs out the run checkpoints and stops, and running
the same command again continues it. A finished run is cached: the command returns at once.

Files in DIR (no pickle): model.safetensors + model.config.json (the LM),
optimizer.safetensors (AdamW moments), state.json (step, options, loss log),
metrics.json (held-out perplexity, parameter count, tokens seen, time), corpus-*.npy (cache).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from actsparse.errors import ActsparseError
from actsparse.lm.data import batch_iterator, corpus_tokens, eval_windows
from actsparse.lm.model import build_lm, load_lm, parameter_count, save_lm

CHECKPOINT_EVERY_S = 120.0


@dataclass
class TrainOptions:
    size: str = "small"
    steps: int = 1200  # small: ~2 s per step of 16 x 256 tokens on 2 quiet cores (2,050 tokens/s) -> ~40 min
    seq_len: int = 256
    batch: int = 16
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    eval_windows: int = 64


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to 10 % of it at `steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, lr: float, weight_decay: float):
    """AdamW; norms and embeddings without weight decay."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def save_optimizer(optimizer, path: Path) -> None:
    """AdamW moments and step counts as safetensors, keyed by parameter index."""
    from safetensors.torch import save_file

    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"{index}.{key}"] = value.detach().reshape(value.shape).contiguous().clone()
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def load_optimizer(optimizer, path: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    full = optimizer.state_dict()
    full["state"] = state
    optimizer.load_state_dict(full)


def fit(model, tokens: np.ndarray, *, steps: int, lr: float, seq_len: int, batch: int, seed: int,
        warmup: int = 50, schedule_steps: int | None = None, optimizer=None, start_step: int = 0,
        deadline: float | None = None,
        extra_loss: Callable[[int], "object"] | None = None, on_checkpoint: Callable[[int], None] | None = None,
        description: str = "training", log: list | None = None) -> int:
    """Train `model` on random windows of `tokens` from `start_step` to `steps` (or until the
    monotonic `deadline`). `extra_loss(step)` is added to the LM loss (regularizers read
    activations captured during the forward pass). The learning-rate schedule spans
    `schedule_steps` (default `steps`). Returns the step reached."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    optimizer = optimizer or make_optimizer(model, lr, 0.1)
    batches = batch_iterator(tokens, seq_len, batch, seed, start_step)
    model.train()
    last_checkpoint = time.monotonic()
    step = start_step
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[rate]:.0f} tok/s"),
               TimeElapsedColumn()]
    with Progress(*columns, transient=False, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task(description, total=steps, completed=start_step, loss=float("nan"), rate=0.0)
        while step < steps:
            if deadline is not None and time.monotonic() >= deadline:
                break
            started = time.perf_counter()
            window = torch.from_numpy(next(batches))
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, schedule_steps or steps, lr, warmup)
            logits = model(input_ids=window[:, :-1]).logits
            lm_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                        window[:, 1:].reshape(-1))
            loss = lm_loss + (extra_loss(step) if extra_loss is not None else 0.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            if log is not None:
                log.append([step, round(lm_loss.item(), 4)])
            rate = window[:, :-1].numel() / (time.perf_counter() - started)
            progress.update(task, completed=step, loss=lm_loss.item(), rate=rate)
            if not sys.stderr.isatty() and (step % 20 == 0 or step == steps):  # a log file still sees progress
                print(f"{description}: step {step}/{steps} loss {lm_loss.item():.3f} {rate:.0f} tok/s",
                      file=sys.stderr, flush=True)
            if on_checkpoint is not None and time.monotonic() - last_checkpoint > CHECKPOINT_EVERY_S:
                on_checkpoint(step)
                last_checkpoint = time.monotonic()
    model.eval()
    return step


def perplexity(model, windows: np.ndarray, batch: int = 8) -> float:
    """exp(mean next-token cross-entropy) over all targets of `windows` ([n, seq_len + 1])."""
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), batch):
            chunk = torch.from_numpy(windows[start:start + batch])
            logits = model(input_ids=chunk[:, :-1]).logits.float()
            total += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"))
            count += chunk[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)


def train_lm(out: str | Path, options: TrainOptions | None = None, *, minutes: float | None = None,
             stop_at: int | None = None, corpus_root: Path | None = None) -> dict:
    """Train (or resume, or return the cached result of) the LM in `out`; returns the metrics
    (held-out perplexity etc.), also written to out/metrics.json once all steps are done.
    `minutes` bounds this call's wall time, `stop_at` its last step (a checkpoint either way);
    `corpus_root` replaces the standard library as the corpus (tests)."""
    import torch

    options = options or TrainOptions()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_file, metrics_file = out / "state.json", out / "metrics.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else None
    if state is not None and state["options"] != asdict(options):
        raise ActsparseError(f"{out} holds a run with other options {state['options']}; use another --out")
    if state is not None and state["step"] >= options.steps and metrics_file.exists():
        return json.loads(metrics_file.read_text())

    train_tokens = corpus_tokens("train", out, corpus_root)
    if state is None:
        model = build_lm(options.size, options.seed)
        optimizer = make_optimizer(model, options.lr, options.weight_decay)
        state = {"options": asdict(options), "step": 0, "seconds": 0.0, "loss_log": []}
    else:
        model = load_lm(out)
        optimizer = make_optimizer(model, options.lr, options.weight_decay)
        load_optimizer(optimizer, out / "optimizer.safetensors")
    started = time.monotonic()
    seconds_before = state["seconds"]

    def checkpoint(step: int) -> None:
        save_lm(model, out)
        save_optimizer(optimizer, out / "optimizer.safetensors")
        state.update(step=step, seconds=round(seconds_before + time.monotonic() - started, 1))
        _write_json(state_file, state)

    deadline = started + minutes * 60 if minutes is not None else None
    step = fit(model, train_tokens, steps=min(options.steps, stop_at or options.steps), schedule_steps=options.steps,
               lr=options.lr, seq_len=options.seq_len,
               batch=options.batch, seed=options.seed, warmup=options.warmup, optimizer=optimizer,
               start_step=state["step"], deadline=deadline, on_checkpoint=checkpoint, log=state["loss_log"])
    checkpoint(step)
    metrics = {"step": step, "steps": options.steps, "finished": step >= options.steps,
               "parameters": parameter_count(model), "tokens_seen": step * options.batch * options.seq_len,
               "train_seconds": state["seconds"], "threads": torch.get_num_threads(), "options": asdict(options)}
    if step >= options.steps or minutes is not None:
        windows = eval_windows(corpus_tokens("heldout", out, corpus_root), options.seq_len, options.eval_windows)
        metrics["heldout_perplexity"] = round(perplexity(model, windows), 4)
        metrics["heldout_tokens"] = int(windows[:, 1:].size)
    if step >= options.steps:
        _write_json(metrics_file, metrics)
    return metrics


def example_lm(out: str | Path, size: str = "mini", steps: int = 400) -> dict:
    """The built-in example LM: `size` trained `steps` short steps (128 tokens x 16) into `out`.
    Cached like any run: the same command returns at once the second time."""
    if steps < 1:
        raise ActsparseError(f"--train-steps must be at least 1, got {steps}")
    options = TrainOptions(size=size, steps=steps, seq_len=128, batch=16, lr=3e-3, warmup=min(20, steps),
                           eval_windows=16)
    return train_lm(out, options)


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m actsparse.lm.train", description=__doc__.splitlines()[0])
    defaults = TrainOptions()
    parser.add_argument("--out", required=True, help="run directory (checkpoints, metrics, corpus cache)")
    parser.add_argument("--minutes", type=float, default=60.0, help="wall-time bound of this invocation")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    options = TrainOptions(**{name: getattr(args, name) for name in asdict(defaults)})
    try:
        metrics = train_lm(args.out, options, minutes=args.minutes)
    except ActsparseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in metrics.items() if k != "options"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
