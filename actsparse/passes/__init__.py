"""Graph passes. One pass per module; importing this package registers them all."""

from actsparse.passes import cleanup, measure, prune, quantize, relufy, sparsify  # noqa: F401
from actsparse.passes import chess, predictor, rsparse  # noqa: F401
from actsparse.passes.base import PassContext, available_passes, make_pass  # noqa: F401
from actsparse.passes.pipeline import PassSpec, load_recipe, parse_pipeline, run_pipeline  # noqa: F401
