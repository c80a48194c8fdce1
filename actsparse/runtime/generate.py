"""Text generation with a language-model artifact: numpy + tvm_ffi only.

The artifact's `main` is one decode step: (input_ids [1, 1], position [1], cache buffers...,
weights...) -> logits [1, vocab]. The cache buffers (per layer: keys [kv, head_dim, capacity],
values [kv, capacity, head_dim]) are allocated here once, at load time, for the artifact's
maximum context; the step writes the token's key and value into them at `position`, so the
runtime only counts positions. The prompt runs in chunks through the artifact's `prefill`
(input_ids [1, chunk], position [1], last [1], the same buffers, the same weights) where the
artifact has one, the last chunk zero-padded; a short remainder (under PREFILL_MIN_TOKENS)
and artifacts without `prefill` take the decode step token by token.

    lm = actsparse.load("lm.actsparse")
    for token in lm.generate([1, 306, 4658], max_new_tokens=32): ...
    print(lm.generate_text("def fibonacci(n):", max_new_tokens=64))
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from actsparse.errors import ActsparseError
from actsparse.runtime.model import CompiledModel, aligned, call_vm

# Below this many prompt tokens a padded chunk costs more than single steps (a chunk of 32 costs
# about 6 decode steps on an AVX-512 CPU: it is compute-bound where a step is bandwidth-bound).
PREFILL_MIN_TOKENS = 8


@dataclass
class GenerationStats:
    """Timings of the last `generate` call (the prompt's steps and the new tokens' steps)."""

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    new_tokens: int = 0
    decode_steps: int = 0  # steps run for new tokens (the first new token comes from the prompt's last step)
    decode_seconds: float = 0.0

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Decode steps per second (sampling included)."""
        return self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0


class LanguageModel(CompiledModel):
    """A loaded LM artifact: `generate()` (token ids), `generate_text()` (with its tokenizer),
    `perplexity()`, and `step()` for callers that drive decoding themselves.

    One sequence at a time per object (the cache is this object's state): calls from several
    threads are serialized by a lock. Sequences run one after another without reloading.
    """

    def __init__(self, manifest: dict, module, params: list, *, source, gpu=None, files: dict[str, bytes] | None = None):
        super().__init__(manifest, module, params, source=source, gpu=gpu)
        if gpu is not None:
            raise ActsparseError("generation runs on CPU artifacts only so far")
        lm = manifest["lm"]
        self.info = dict(lm)
        self.max_context = int(lm["max_context"])
        self.vocab_size = int(lm["vocab_size"])
        self.eos_token_ids = [int(t) for t in lm.get("eos_token_ids") or []]
        self._files = files or {}
        self._tokenizer = None
        cache_specs = {c["name"]: c for c in lm["caches"]}
        names = [spec.name for spec in self._input_specs]
        if names[:2] != ["input_ids", "position"] or set(names[2:]) != set(cache_specs):
            raise ActsparseError(f"artifact is inconsistent: LM inputs {names}")
        dtypes = {cache_specs[n].get("dtype", "float32") for n in names[2:]}
        if not dtypes <= {"float32", "float16"}:
            raise ActsparseError(f"artifact is inconsistent: KV cache dtypes {sorted(dtypes)}")
        self._cache_arrays = [aligned(np.zeros(cache_specs[n]["shape"], cache_specs[n].get("dtype", "float32")))
                              for n in names[2:]]
        self._caches = [self._tvm_ffi.from_dlpack(a) for a in self._cache_arrays]
        self._token = aligned(np.zeros((1, 1), np.int64))
        self._position = aligned(np.zeros((1,), np.int64))
        self._token_tensor = self._tvm_ffi.from_dlpack(self._token)
        self._position_tensor = self._tvm_ffi.from_dlpack(self._position)
        self.capacity = int(lm["cache_capacity"])
        functions = manifest.get("functions") or {}
        prefill = lm.get("prefill") or {}
        self.prefill_tokens = int(prefill.get("tokens", 0)) if "prefill" in functions else 0
        if self.prefill_tokens:
            self._prefill_params = [self._params[i] for i in functions["prefill"]["params"]]
            self._chunk = aligned(np.zeros((1, self.prefill_tokens), np.int64))
            self._last = aligned(np.zeros((1,), np.int64))
            self._chunk_tensor = self._tvm_ffi.from_dlpack(self._chunk)
            self._last_tensor = self._tvm_ffi.from_dlpack(self._last)
        self._lock = threading.RLock()
        self.length = 0  # tokens in the cache
        self.stats = GenerationStats()

    # ------------------------------------------------------------ tokenizer

    @property
    def tokenizer(self):
        """The packed tokenizer (`encode(text) -> ids`, `decode(ids) -> text`), or an ActsparseError."""
        if self._tokenizer is None:
            from actsparse.runtime.tokenizer import make_tokenizer

            self._tokenizer = make_tokenizer(self.info.get("tokenizer"), self._files)
        return self._tokenizer

    # ------------------------------------------------------------ stepping

    def reset(self) -> None:
        """Start a new sequence (the buffers are reused; old entries past the length are never read)."""
        self.length = 0

    def step(self, token: int) -> np.ndarray:
        """Append one token at the current length.

        Args:
            token: a token id, in 0..vocab_size - 1.

        Returns:
            The next-token logits [vocab] (a copy).

        Raises:
            ActsparseError: the context is full, the id is outside the vocabulary, or the model
                failed.
        """
        with self._lock:
            if self.length >= self.max_context:
                raise ActsparseError(f"context overflow: the artifact holds {self.max_context} tokens "
                                     f"(compile with a larger --max-context)")
            token = int(token)
            self._check_vocabulary([token])
            self._token[0, 0] = token
            self._position[0] = self.length
            try:
                logits = call_vm(lambda: self._main()(self._token_tensor, self._position_tensor, *self._caches,
                                                      *self._params))
            except Exception as exc:
                raise ActsparseError(f"model execution failed: {exc}") from None
            self.length += 1
            return np.from_dlpack(logits).reshape(-1).copy()

    def prefill(self, tokens: Iterable[int]) -> np.ndarray:
        """Append `tokens` (a prompt) at the current length, in chunks where the artifact has a
        prefill function.

        Args:
            tokens: token ids, at least one.

        Returns:
            The logits after the last token [vocab] (a copy).

        Raises:
            ActsparseError: no tokens, more than the context holds, an id outside the vocabulary,
                or a failure in the model.
        """
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ActsparseError("no tokens to append")
        with self._lock:
            if self.length + len(tokens) > self.max_context:
                raise ActsparseError(f"context overflow: {self.length} + {len(tokens)} tokens > the artifact's "
                                     f"maximum context {self.max_context}")
            self._check_vocabulary(tokens)
            done, logits = 0, None
            while done < len(tokens):
                rest = len(tokens) - done
                if (self.prefill_tokens and rest >= min(PREFILL_MIN_TOKENS, self.prefill_tokens)
                        and self.length + self.prefill_tokens <= self.capacity):
                    take = min(rest, self.prefill_tokens)
                    logits = self._run_chunk(tokens[done:done + take])
                    done += take
                else:
                    logits = self.step(tokens[done])
                    done += 1
            return logits

    def _check_vocabulary(self, tokens: list[int]) -> None:
        bad = next((t for t in tokens if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ActsparseError(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")

    def _run_chunk(self, tokens: list[int]) -> np.ndarray:
        self._chunk[0, :] = 0  # padding rows: computed, written past the length, never read
        self._chunk[0, :len(tokens)] = tokens
        self._position[0] = self.length
        self._last[0] = len(tokens) - 1
        try:
            logits = call_vm(lambda: self._function("prefill")(self._chunk_tensor, self._position_tensor,
                                                               self._last_tensor, *self._caches,
                                                               *self._prefill_params))
        except Exception as exc:
            raise ActsparseError(f"model execution failed: {exc}") from None
        self.length += len(tokens)
        return np.from_dlpack(logits).reshape(-1).copy()

    # ------------------------------------------------------------ generation

    def generate(self, prompt: Iterable[int], max_new_tokens: int = 64, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop_tokens: Iterable[int] | None = None,
                 on_token: Callable[[int], None] | None = None) -> Iterator[int]:
        """Yield up to `max_new_tokens` new token ids after `prompt` (a new sequence each call).

        temperature 0 is greedy; otherwise logits / temperature, then top-k, then top-p (nucleus),
        sampled with a generator seeded by `seed`. repetition_penalty > 1 makes tokens already in
        the sequence less likely (the CTRL rule transformers uses). Stops after a stop token
        (default: the model's EOS ids; pass [] to never stop early), which is yielded.
        `on_token(id)` is called for each new token as it is produced. Timings land in `stats`.

        Args:
            prompt: token ids, at least one (e.g. the BOS id).
            max_new_tokens: the most tokens to generate.
            temperature: 0 for greedy decoding, else the sampling temperature.
            top_k: keep the k most likely tokens (0: all).
            top_p: keep the smallest set of tokens whose probability reaches p (1: all).
            repetition_penalty: > 1 penalizes tokens already in the sequence.
            seed: seeds the sampling.
            stop_tokens: ids that end generation (default: the model's EOS ids).
            on_token: called with each new id.

        Returns:
            An iterator over the new token ids (generation runs as it is consumed).

        Raises:
            ActsparseError: bad sampling options, an empty prompt, prompt + max_new_tokens over the
                maximum context, or an id outside the vocabulary.
        """
        prompt = [int(t) for t in prompt]
        _check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
        if not prompt:
            raise ActsparseError("the prompt is empty: give at least one token (e.g. the BOS id)")
        if len(prompt) + max_new_tokens > self.max_context:
            raise ActsparseError(f"context overflow: prompt {len(prompt)} + {max_new_tokens} new tokens > the "
                                 f"artifact's maximum context {self.max_context}")
        stops = set(self.eos_token_ids if stop_tokens is None else (int(t) for t in stop_tokens))
        rng = np.random.default_rng(seed)
        with self._lock:
            self.reset()
            self.stats = stats = GenerationStats(prompt_tokens=len(prompt))
            start = time.perf_counter()
            logits = self.prefill(prompt)
            stats.prompt_seconds = time.perf_counter() - start
            seen = list(prompt)
            elapsed = 0.0  # this generator's own time: sampling and steps, not the caller's
            for _ in range(max_new_tokens):
                mark = time.perf_counter()
                token = sample(logits, temperature, top_k, top_p, repetition_penalty, seen, rng)
                seen.append(token)
                stats.new_tokens += 1
                elapsed += time.perf_counter() - mark
                stats.decode_seconds = elapsed
                if on_token is not None:
                    on_token(token)
                yield token
                if token in stops or stats.new_tokens == max_new_tokens:
                    break
                mark = time.perf_counter()
                logits = self.step(token)
                elapsed += time.perf_counter() - mark
                stats.decode_seconds = elapsed
                stats.decode_steps += 1

    def generate_text(self, prompt: str, max_new_tokens: int = 64, *, on_text: Callable[[str], None] | None = None,
                      **sampling) -> str:
        """The text generated after `prompt` (encoded with the packed tokenizer, BOS first when the
        model has one). `on_text(piece)` streams the text as it grows.

        Args:
            prompt: the text to continue.
            max_new_tokens: the most tokens to generate.
            on_text: called with each new piece of text.
            **sampling: the sampling options of `generate`.

        Returns:
            The generated text (without the prompt).

        Raises:
            ActsparseError: as for `generate`, or an artifact without a tokenizer.
        """
        tok = self.tokenizer
        ids = list(tok.encode(prompt))
        bos = self.info.get("bos_token_id")
        if bos is not None and (not ids or ids[0] != bos):
            ids = [int(bos)] + ids
        new: list[int] = []
        shown = ""
        for token in self.generate(ids, max_new_tokens, **sampling):
            new.append(token)
            text = tok.decode(new)
            if on_text is not None and text.startswith(shown) and not text.endswith("\ufffd"):
                on_text(text[len(shown):])
                shown = text
        text = tok.decode(new)
        if on_text is not None and text != shown and text.startswith(shown):
            on_text(text[len(shown):])
        return text

    def perplexity(self, tokens: Iterable[int]) -> float:
        """exp(mean negative log-likelihood) of tokens[1:] given the tokens before, through the
        compiled decode step (one sequence, at most the maximum context).

        Args:
            tokens: token ids, at least 2 and at most the maximum context.

        Returns:
            The perplexity.

        Raises:
            ActsparseError: fewer than 2 tokens, more than the context holds, or an id outside the
                vocabulary.
        """
        tokens = [int(t) for t in tokens]
        if len(tokens) < 2:
            raise ActsparseError("perplexity needs at least 2 tokens")
        if len(tokens) > self.max_context:
            raise ActsparseError(f"{len(tokens)} tokens exceed the artifact's maximum context {self.max_context}")
        with self._lock:
            self.reset()
            nll = 0.0
            for current, following in zip(tokens[:-1], tokens[1:]):
                logits = self.step(current).astype(np.float64)
                peak = logits.max()
                nll += peak + np.log(np.exp(logits - peak).sum()) - logits[following]
            return float(np.exp(nll / (len(tokens) - 1)))


def _check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty) -> None:
    if int(max_new_tokens) < 1:
        raise ActsparseError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise ActsparseError(f"temperature must be >= 0, got {temperature}")
    if int(top_k) < 0:
        raise ActsparseError(f"top_k must be >= 0 (0: off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ActsparseError(f"top_p must be in (0, 1], got {top_p}")
    if not repetition_penalty > 0:
        raise ActsparseError(f"repetition_penalty must be > 0, got {repetition_penalty}")


def sample(logits: np.ndarray, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           repetition_penalty: float = 1.0, seen: Iterable[int] = (), rng: np.random.Generator | None = None) -> int:
    """The next token id from `logits` [vocab] (see `LanguageModel.generate` for the rules)."""
    logits = np.asarray(logits, np.float64).copy()
    if repetition_penalty != 1.0:
        index = np.fromiter(set(seen), np.int64)
        if index.size:
            values = logits[index]
            logits[index] = np.where(values > 0, values / repetition_penalty, values * repetition_penalty)
    if temperature == 0:
        return int(np.argmax(logits))
    logits /= temperature
    if top_k and top_k < logits.size:
        cut = np.partition(logits, -top_k)[-top_k]
        logits[logits < cut] = -np.inf
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, top_p) + 1)]  # the smallest set reaching top_p
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    rng = rng or np.random.default_rng()
    return int(rng.choice(probs.size, p=probs))
