"""Training-side helpers (need torch): gradual magnitude pruning."""

from actsparse.train.pruning import GradualMagnitudePruner, cubic_sparsity  # noqa: F401
from actsparse.train.relufy import relufy, swap_activations  # noqa: F401
