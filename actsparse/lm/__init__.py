"""A real small language model to measure activation sparsity on: a Llama-architecture
decoder trained on the Python standard library's source, byte-level tokens.
Training and perplexity: `actsparse.lm.train` (`python -m actsparse.lm.train --out DIR`)."""

from actsparse.lm.data import corpus_files, corpus_tokens, decode, encode, eval_windows  # noqa: F401
from actsparse.lm.model import build_lm, lm_config, load_lm, save_lm  # noqa: F401
