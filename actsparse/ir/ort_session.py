"""onnxruntime sessions for an in-memory model: calibration, verification and reference outputs
all run the model through here (models above 2 GB never become one protobuf)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from actsparse.errors import ActsparseError
from actsparse.ir import large
from actsparse.ir.large import copy_model, has_external_tensors, tensor_bytes

# Up to this many bytes of tensors, onnxruntime gets the whole model as one protobuf.
_ORT_PROTO_LIMIT = 1 << 30


def ort_session(model: ir.Model, *, threads: int = 0):
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # errors come back as one line of ours, not ORT's coloured log first
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        proto, keep = _proto_for_ort(model, options)
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        session._actsparse_weights = keep  # the buffers handed over must outlive session creation
        return session
    except Exception as exc:
        raise ActsparseError(f"onnxruntime cannot load the model: {str(exc).strip().splitlines()[0][:300]}") from None


def _proto_for_ort(model: ir.Model, options) -> tuple[onnx.ModelProto, list]:
    """The protobuf for onnxruntime, and the buffers it reads weights from.

    Small models: the whole model. Large ones (or any with external-data tensors) never become one
    protobuf (2 GB cap; onnxruntime, given bytes, would look for external data relative to the
    working directory): tensors in external files stay references, read by onnxruntime from
    their folder (`session.model_external_initializers_file_folder_path`, read once into its own
    buffers); other tensors of 1 MB or more are handed over as in-memory external initializers.
    """
    import onnxruntime as ort

    if tensor_bytes(model) < _ORT_PROTO_LIMIT and not has_external_tensors(model):
        return ir.serde.serialize_model(model), []
    folders = [str(Path(v.const_value.base_dir).resolve()) for v in model.graph.initializers.values()
               if isinstance(v.const_value, ir.ExternalTensor)]
    folder = max(set(folders), key=folders.count) if folders else None
    copy = copy_model(model)
    names, values = [], []
    for value in copy.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        if isinstance(tensor, ir.ExternalTensor) and str(Path(tensor.base_dir).resolve()) == folder:
            continue
        if tensor.nbytes < large.BIG_TENSOR_BYTES and not isinstance(tensor, ir.ExternalTensor):
            continue
        array = np.ascontiguousarray(tensor.numpy())
        names.append(value.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
        # A placeholder reference: onnxruntime takes the data from `values`, by name.
        value.const_value = ir.ExternalTensor(f"actsparse-in-memory-{len(names)}", 0, tensor.nbytes, tensor.dtype,
                                              shape=tensor.shape, name=value.name)
    if folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    if names:
        options.add_external_initializers(names, values)
    return ir.serde.serialize_model(copy), values
