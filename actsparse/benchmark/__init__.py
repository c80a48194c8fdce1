"""Measuring speed: timing helpers shared by `actsparse bench` and benchmarks/ (`timing`), and
the artifact-against-onnxruntime benchmark behind `actsparse bench` (`artifact`)."""
