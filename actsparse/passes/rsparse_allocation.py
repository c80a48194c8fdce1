"""Per-layer allocation of R-Sparse's budget: which linear skips how much, at one total byte budget.

`rsparse{allocation=greedy|evolutionary}` gives each linear l its own sparsity s_l such that the
weight bytes read per token are those of the uniform sparsity s: Σ (1 - s_l) K_l N_l = (1 - s) Σ K_l N_l.

Per linear, the closed-form error of the pass (the dropped inputs through the tail of W's SVD) is
tabulated once over a grid of kept fractions f and every rank r: `LinearCurve.tails[f, r]`. The
best split of a read budget b = 1 - s is then a lookup: min over f <= b of tails[f, r(b - f)].

greedy (TEAL's allocation, reusing sparsify's allocator): each linear alone, at its best split of
each 5 % sparsity level, is measured on the model output (calibration samples); then sparsity
goes in 5 % steps to the linear whose measured error grows least per byte skipped. (Scaling the
closed-form curves by one measured sensitivity per linear instead was measured worse than
uniform on MiniLM: docs/rsparse.md.)

evolutionary (the paper's search): a population of per-layer sparsity vectors, all on the budget
(mutations move bytes between two linears; crossovers are convex blends, which stay on the
budget), scored by the model-output error with every linear rewritten, on calibration samples;
seeded with the uniform and the greedy allocation, so it never returns worse than either on the
calibration samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from actsparse.calibrate.stats import token_masks
from actsparse.ir.blocks import Linear
from actsparse.ir.large import copy_model
from actsparse.passes.rsparse import Split, _threshold, channel_scale, insert_rank_sparse, linears_in_scope
from actsparse.passes.sparsify import LEVELS, greedy_allocation

KEPT_FRACTIONS = np.round(np.linspace(0.0, 1.0, 21), 3)  # kept-row fractions the split may take
MAX_SPARSITY = float(LEVELS[-1])  # 0.95: no linear skips more
PROBE_SAMPLES = 8  # calibration samples the model-level errors are measured on
POPULATION = 16
GENERATIONS = 20
ELITE = 3  # best candidates carried over unchanged each generation
MUTATION_STEP = 0.1  # largest sparsity moved between two linears by one mutation (of the smaller)


@dataclass
class LinearCurve:
    """One linear's closed-form relative output error over (kept fraction, rank) on calibration rows."""

    name: str
    k: int
    n: int
    thresholds: np.ndarray  # score threshold keeping KEPT_FRACTIONS[i] of the calibration scores
    kept: np.ndarray  # the fraction above each threshold, measured
    tails: np.ndarray  # [len(KEPT_FRACTIONS), min(K, N) + 1]: relative error at kept fraction i, rank r
    lowrank_in: np.ndarray  # U Σ [K, min(K, N)]
    lowrank_out: np.ndarray  # Vᵀ [min(K, N), N]

    @property
    def weight_bytes(self) -> int:
        return self.k * self.n * 4

    def split(self, sparsity: float) -> Split:
        """The best (kept fraction, rank) that reads at most (1 - sparsity) K N floats."""
        budget = 1.0 - sparsity
        best = None
        for i, fraction in enumerate(KEPT_FRACTIONS):
            if fraction > budget + 1e-9:
                break
            rank = self.rank_for(budget - fraction)
            if best is None or self.tails[i, rank] < self.tails[best[0], best[1]] - 1e-15:
                best = (i, rank)
        i, rank = best
        ratio = round(float(KEPT_FRACTIONS[i] / budget), 6) if budget > 0 else 0.0
        return Split(ratio, rank, float(self.thresholds[i]), float(self.kept[i]), float(self.tails[i, rank]),
                     self.lowrank_in[:, :rank], self.lowrank_out[:rank])

    def rank_for(self, rank_budget: float) -> int:
        """The rank that `rank_budget` K N floats pay for (A and B hold r (K + N))."""
        rank = int(np.floor(max(rank_budget, 0.0) * self.k * self.n / (self.k + self.n) + 1e-9))
        return min(rank, self.tails.shape[1] - 1)

    def error(self, sparsity: float) -> float:
        return self.split(sparsity).error


def linear_curve(name: str, rows: np.ndarray, weight_kn: np.ndarray) -> LinearCurve:
    """Tabulate ‖D W - D A_r B_r‖² / ‖X W‖² for every kept fraction of the grid and every rank r,
    D = the calibration rows with the kept channels zeroed: with W = U Σ Vᵀ it is the energy of
    D U Σ beyond column r, so one product per kept fraction gives every rank."""
    k, n = weight_kn.shape
    u, s, vt = np.linalg.svd(weight_kn, full_matrices=False)
    lowrank_in = u * s
    scores = np.abs(rows) * channel_scale(weight_kn)
    reference = float(np.sum((rows @ weight_kn) ** 2)) or 1.0
    thresholds = np.array([_threshold(scores, 1.0 - f) for f in KEPT_FRACTIONS])
    tails = np.zeros((len(KEPT_FRACTIONS), len(s) + 1))
    kept = np.zeros(len(KEPT_FRACTIONS))
    for i, threshold in enumerate(thresholds):
        keep = scores > threshold
        kept[i] = float(np.mean(keep))
        energy = np.sum((np.where(keep, 0.0, rows) @ lowrank_in) ** 2, axis=0)
        tails[i, :-1] = np.cumsum(energy[::-1])[::-1] / reference
    return LinearCurve(name, k, n, thresholds, kept, tails, lowrank_in, vt)


def allocate(model: ir.Model, scope: str, curves: list[LinearCurve], sparsity: float, method: str,
             samples: list[dict[str, np.ndarray]]) -> tuple[dict[str, float], dict]:
    """Per-linear sparsity for `method` ("greedy" or "evolutionary") at the byte budget of the
    uniform `sparsity`, and what the search saw (model-output errors on the calibration samples)."""
    probe = ModelProbe(model, scope, curves, samples[:PROBE_SAMPLES])
    uniform = {c.name: sparsity for c in curves}
    measured = {c.name: measured_curve(probe, c) for c in curves}
    greedy = greedy_allocation(curves, measured, sparsity)
    search = {"uniform_output_error": round(probe.error(uniform), 6),
              "greedy_output_error": round(probe.error(greedy), 6),
              # the sum of the linears' errors alone: what greedy minimizes, if the errors added up
              "greedy_additive_estimate": round(sum(float(np.interp(greedy[c.name], LEVELS, measured[c.name]))
                                                    for c in curves), 6)}
    if method == "greedy":
        return greedy, search
    best, history = evolve(probe, curves, sparsity, [uniform, greedy])
    return best, search | {"evolutionary_output_error": history[-1], "best_error_per_generation": history}


def measured_curve(probe: "ModelProbe", curve: LinearCurve) -> np.ndarray:
    """The model-output error with this linear alone at its best split of each level (TEAL's
    greedy measures the same for its thresholds); more sparsity never counts as helping."""
    errors = [probe.alone(curve, float(level)) if level > 0 else 0.0 for level in LEVELS]
    return np.maximum.accumulate(np.array(errors))


def evolve(probe: "ModelProbe", curves: list[LinearCurve], sparsity: float,
           seeds: list[dict[str, float]]) -> tuple[dict[str, float], list[float]]:
    """The paper's evolutionary search over per-linear sparsity on the byte budget, deterministic."""
    rng = np.random.default_rng(0)
    names = [c.name for c in curves]
    weights = np.array([c.weight_bytes for c in curves], dtype=np.float64)
    population = [np.array([seed[n] for n in names]) for seed in seeds]
    while len(population) < POPULATION:
        population.append(mutate(population[len(population) % len(seeds)], weights, rng))
    scored = sorted(((probe.error(dict(zip(names, p))), i, p) for i, p in enumerate(population)), key=lambda t: t[:2])
    history = [scored[0][0]]
    for _ in range(GENERATIONS):
        parents = [p for _, _, p in scored]
        children = []
        while len(children) < POPULATION - ELITE:
            a, b = (parents[min(rng.integers(len(parents), size=2))] for _ in range(2))  # tournaments of two
            blend = rng.uniform()
            children.append(mutate(blend * a + (1 - blend) * b, weights, rng))
        new = [(probe.error(dict(zip(names, c))), len(scored) + i, c) for i, c in enumerate(children)]
        scored = sorted(scored[:ELITE] + new, key=lambda t: t[:2])
        history.append(scored[0][0])
    return {n: float(v) for n, v in zip(names, scored[0][2])}, [round(h, 6) for h in history]


def mutate(sparsities: np.ndarray, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Move skipped bytes from one linear to another: the total stays on the budget."""
    out = sparsities.copy()
    if len(out) < 2:
        return out
    give, take = rng.choice(len(out), size=2, replace=False)  # `take` skips more, `give` less
    moved = rng.uniform(0.2, 1.0) * MUTATION_STEP * min(weights[give], weights[take])
    moved = min(moved, out[give] * weights[give], (MAX_SPARSITY - out[take]) * weights[take])
    out[give] -= moved / weights[give]
    out[take] += moved / weights[take]
    return out


class ModelProbe:
    """A copy of the model with every linear in scope as a RankSparseMatMul whose threshold and
    factors are graph inputs, so any allocation runs in one onnxruntime session."""

    def __init__(self, model: ir.Model, scope: str, curves: list[LinearCurve], samples):
        from actsparse.ir.ort_session import ort_session

        copy = copy_model(model)
        linears = {l.name: l for l in linears_in_scope(copy, scope)}
        self.curves = curves
        self.inputs = {c.name: _probe_inputs(copy, linears[c.name], c) for c in curves}
        self.session = ort_session(copy)
        self.samples = samples
        self.masks = token_masks(samples)
        self.float_outputs = [i for i, o in enumerate(self.session.get_outputs()) if "float" in o.type]
        self._padded: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        dense = {c.name: (np.array(-1.0), *self._factors(c, 0)) for c in curves}
        self.reference = self._run(dense)
        self.norm = self._squared(self.reference) or 1.0

    def error(self, sparsity_of: dict[str, float]) -> float:
        """Relative squared error of the model's float outputs (real tokens) with every linear at
        its split for `sparsity_of`."""
        settings = {}
        for curve in self.curves:
            split = curve.split(sparsity_of[curve.name])
            settings[curve.name] = (np.array(split.threshold), *self._factors(curve, split.rank))
        outputs = self._run(settings)
        return self._squared([[a - b for a, b in zip(o, r)] for o, r in zip(outputs, self.reference)]) / self.norm

    def alone(self, curve: LinearCurve, sparsity: float) -> float:
        """The model-output error with only `curve`'s linear at `sparsity`, the others dense."""
        return self.error({c.name: sparsity if c is curve else 0.0 for c in self.curves})

    def _factors(self, curve: LinearCurve, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """A and B zero beyond `rank`, at the probe's fixed width (cached: the search revisits ranks)."""
        key = (curve.name, rank)
        if key not in self._padded:
            a = np.zeros_like(curve.lowrank_in)
            a[:, :rank] = curve.lowrank_in[:, :rank]
            self._padded[key] = (a, curve.lowrank_out)
        return self._padded[key]

    def _run(self, settings) -> list[list[np.ndarray]]:
        feeds = {}
        for name, values in settings.items():
            feeds |= {value.name: array.astype(value.dtype.numpy()) for value, array in zip(self.inputs[name], values)}
        return [[out[i].astype(np.float64) for i in self.float_outputs]
                for out in (self.session.run(None, sample | feeds) for sample in self.samples)]

    def _squared(self, outputs_per_sample) -> float:
        total = 0.0
        for index, outputs in enumerate(outputs_per_sample):
            mask = self.masks[index] if self.masks is not None else None
            for out in outputs:
                real = mask is not None and out.shape[:-1] == mask.shape
                total += float(np.sum(out[mask] ** 2 if real else out ** 2))
        return total


def _probe_inputs(model: ir.Model, linear: Linear, curve: LinearCurve) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Rewrite `linear` in the probe copy with threshold, A and B as new graph inputs, typed as the
    pass's own initializers (the input's type for the threshold, the weight's for A and B)."""
    width = curve.lowrank_in.shape[1]
    x_type = linear.node.inputs[0].dtype or ir.DataType.FLOAT
    w_type = ir.convenience.get_const_tensor(linear.weight).dtype
    made = []
    for suffix, shape, dtype in (("threshold", [], x_type), ("lowrank_in", [curve.k, width], w_type),
                                 ("lowrank_out", [width, curve.n], w_type)):
        value = ir.Value(name=f"{linear.name}.probe_{suffix}", shape=ir.Shape(shape), type=ir.TensorType(dtype))
        model.graph.inputs.append(value)
        made.append(value)
    insert_rank_sparse(model, linear, made[0], made[1], made[2])
    return tuple(made)
