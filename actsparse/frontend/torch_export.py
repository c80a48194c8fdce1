"""torch.nn.Module -> `ir.Model` through torch's dynamo exporter (`torch.onnx.export(dynamo=True)`).

Shapes are static unless `dynamic_shapes` is given: TVM's ONNX importer needs them
(a dynamic dimension stops the import). The exporter runs onnxscript's optimizer itself (constant folding,
so nn.Linear becomes MatMul with a pre-transposed [in, out] initializer for 3-D inputs,
Gemm with transB=1 for 2-D ones). At opset 18 GELU comes out as its Erf (or Tanh)
decomposition and SiLU as `x * Sigmoid(x)`; from opset 20 GELU is one `Gelu` op.

torch and transformers are imported lazily: they are optional dependencies.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import onnx_ir as ir

from actsparse.errors import ActsparseError

__all__ = ["export_torch", "export_hf", "DEFAULT_OPSET"]

DEFAULT_OPSET = 18
# Outputs taken from a Hugging Face model, first one present wins.
HF_OUTPUTS = ("logits", "last_hidden_state")


def export_torch(
    module,
    example_inputs: tuple | Mapping[str, Any],
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_shapes: Any = None,
    opset: int = DEFAULT_OPSET,
) -> ir.Model:
    """Export `module` (in eval mode) to an optimized `ir.Model` with the dynamo exporter.

    example_inputs: a tuple of positional tensors, or a dict of keyword arguments
    (non-tensor values are baked into the graph). The module's training flag is
    restored afterwards. Raises ActsparseError with the exporter's reason on failure.
    """
    torch = _import_torch()
    if not isinstance(module, torch.nn.Module):
        raise ActsparseError(f"expected a torch.nn.Module, got {type(module).__name__}")
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, tuple):
        args, kwargs = example_inputs, None
    else:
        raise ActsparseError("example_inputs must be a tuple of tensors or a dict of keyword arguments")
    was_training = module.training
    module.eval()
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                module, args, kwargs=kwargs, input_names=input_names, output_names=output_names,
                dynamic_shapes=dynamic_shapes, opset_version=opset, dynamo=True, optimize=True,
                verbose=False, external_data=False,
            )
    except ActsparseError:
        raise
    except Exception as exc:  # the exporter raises many types; the user needs the reason
        raise ActsparseError(f"torch export of {type(module).__name__} failed: {_root_cause(exc)}") from None
    finally:
        module.train(was_training)
    if program is None or program.model is None:
        raise ActsparseError(f"torch export of {type(module).__name__} produced no model")
    return program.model


def export_hf(
    model,
    *,
    batch: int = 1,
    seq_len: int = 16,
    attention_mask: bool = False,
    output: str | None = None,
    opset: int = DEFAULT_OPSET,
    seed: int = 0,
) -> ir.Model:
    """Export a Hugging Face transformers model with static shapes [batch, seq_len].

    Inputs: `input_ids` (random token ids drawn with `seed`) and, if `attention_mask`,
    an all-ones `attention_mask`. The single output is `output` if given, else `logits`
    when the model has a head, else `last_hidden_state`; other outputs (pooler, cache)
    are removed with the nodes only they used. The graph keeps the module paths of
    the transformers model ("encoder.layer.0.intermediate.dense") in its node metadata.
    """
    torch = _import_torch()
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab <= 0:
        raise ActsparseError(f"{type(model).__name__} has no config.vocab_size: not a transformers text model?")
    generator = torch.Generator().manual_seed(seed)
    inputs: dict[str, Any] = {"input_ids": torch.randint(0, vocab, (batch, seq_len), generator=generator)}
    if attention_mask:
        inputs["attention_mask"] = torch.ones(batch, seq_len, dtype=torch.long)
    options: dict[str, Any] = {}
    parameters = inspect.signature(model.forward).parameters
    if "use_cache" in parameters:
        options["use_cache"] = False

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            eager = model(**inputs, **options, return_dict=True)
    except Exception as exc:
        raise ActsparseError(f"{type(model).__name__} failed on example input_ids: {_root_cause(exc)}") from None
    finally:
        model.train(was_training)
    names = [key for key, value in eager.items() if value is not None]
    chosen = output or next((name for name in HF_OUTPUTS if name in names), None)
    if chosen not in names:
        raise ActsparseError(f"{type(model).__name__} has no output {chosen!r}; it returns {', '.join(names)}")
    # return_dict=False: the outputs come as a tuple in the same order as the dict's keys.
    ir_model = export_torch(model, {**inputs, **options, "return_dict": False}, opset=opset)
    _keep_only_output(ir_model, names.index(chosen), chosen)
    return ir_model


def _keep_only_output(model: ir.Model, index: int, name: str) -> None:
    outputs = model.graph.outputs
    if index >= len(outputs):
        raise ActsparseError(f"exported graph has {len(outputs)} outputs, expected at least {index + 1}")
    kept = outputs[index]
    outputs.clear()
    outputs.append(kept)
    if kept.name != name and name not in {v.name for v in model.graph.inputs}:
        kept.name = name
    ir.passes.common.RemoveUnusedNodesPass()(model)


def _import_torch():
    try:
        import torch
    except ImportError:
        raise ActsparseError("exporting from torch needs torch: pip install 'actsparse[torch]'") from None
    return torch


# Loggers that print progress, optional-package notes or whole tracebacks during an export;
# the reason of a failure reaches the user through ActsparseError instead.
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._subclasses", "torch._dynamo", "onnxscript")


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's progress prints, log lines and warnings for the duration of an export."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _root_cause(exc: BaseException) -> str:
    """The innermost exception's first meaningful line, shortened to one line."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__

