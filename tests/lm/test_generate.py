"""Causal LMs end to end: HF families -> decode-step ONNX (checked against transformers in
onnxruntime) -> compiled decode step over the KV cache -> generate / perplexity / CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import actsparse  # noqa: E402
from actsparse.errors import ActsparseError  # noqa: E402
from actsparse.frontend.causal_lm import read_causal_lm  # noqa: E402
from actsparse.frontend.decode_graph import build_decode_graph  # noqa: E402
from actsparse.lm.compile import compile_causal_lm, decode_feeds, ort_decode_steps  # noqa: E402
from actsparse.runtime.generate import LanguageModel, sample  # noqa: E402

COMMON = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, max_position_embeddings=128, eos_token_id=1, bos_token_id=0, pad_token_id=0)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
# The LayerNorm families name their sizes differently and have no GQA knob of that name.
SIZES = {k: v for k, v in COMMON.items() if k not in ("num_key_value_heads", "intermediate_size")} | {
    "initializer_range": 0.1}  # attention far from uniform, so that a position or rotary error shows
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, rope_scaling=LLAMA3_ROPE),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),
    "mistral": lambda: transformers.MistralConfig(**COMMON),
    "phi3": lambda: transformers.Phi3Config(**COMMON),
    "gemma": lambda: transformers.GemmaConfig(**COMMON, head_dim=16),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=16),
    # Phi-4-mini: RoPE on the first 3/4 of each head
    "phi3_partial_rotary": lambda: transformers.Phi3Config(**COMMON, partial_rotary_factor=0.75),
    # Pythia: parallel residual, per-head interleaved query_key_value with biases, rotary on 1/4 of each head
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**SIZES, intermediate_size=96, rotary_pct=0.25),
    "gpt_neox_sequential": lambda: transformers.GPTNeoXConfig(**SIZES, intermediate_size=96, rotary_pct=0.5,
                                                              use_parallel_residual=False, hidden_act="gelu_new"),
    # OPT-125m: learned positions, pre-norm, fc1 / ReLU / fc2 with biases
    "opt": lambda: transformers.OPTConfig(**SIZES, ffn_dim=96, word_embed_proj_dim=64),
    # OPT-350m: post-norm (no final norm), embeddings of 32 projected to the hidden 64 and back
    "opt_post_norm": lambda: transformers.OPTConfig(**SIZES, ffn_dim=96, word_embed_proj_dim=32,
                                                    do_layer_norm_before=False),
    # Falcon-7B: multi-query, attention and MLP in parallel on one input_layernorm
    "falcon": lambda: transformers.FalconConfig(**SIZES, ffn_hidden_size=96, multi_query=True, parallel_attn=True),
    # Falcon-40B: new_decoder_architecture, kv groups of 2 queries + k + v in the fused qkv, ln_attn and ln_mlp
    "falcon_new_arch": lambda: transformers.FalconConfig(**SIZES, ffn_hidden_size=96, new_decoder_architecture=True,
                                                         num_kv_heads=2),
    "falcon_new_arch_one_norm": lambda: transformers.FalconConfig(**SIZES, ffn_hidden_size=96,
                                                                  new_decoder_architecture=True, num_kv_heads=2,
                                                                  num_ln_in_parallel_attn=1),
    # sequential Falcon with separate q, k, v heads interleaved in the fused qkv, biases
    "falcon_sequential": lambda: transformers.FalconConfig(**SIZES, ffn_hidden_size=96, multi_query=False,
                                                           parallel_attn=False, bias=True),
}


def random_lm(family: str, seed: int = 0):
    """A random-init model whose norms and biases are not the trivial 1 / 0."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name or ".ln_" in name:  # Falcon: ln_attn, ln_mlp, ln_f
                p += 0.1 * torch.randn_like(p)
    return model


def torch_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Plain argmax decoding with transformers' own KV cache (no EOS suppression, no stop)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model(ids, use_cache=True)
        tokens = []
        for _ in range(new_tokens):
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def ort_decode_logits(model_ir, tokens) -> np.ndarray:
    """Logits of each position, from the decode-step graph run token by token in onnxruntime."""
    from actsparse.ir.ort_session import ort_session

    return np.array([logits[0] for _, logits in ort_decode_steps(ort_session(model_ir), tokens)])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decode_graph_matches_transformers(family):
    model = random_lm(family)
    decode = build_decode_graph(read_causal_lm(model, 64))
    tokens = torch.randint(2, 300, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens).logits[0].numpy()
    got = ort_decode_logits(decode, tokens[0].tolist())
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)


def test_phi3_fused_projections_become_a_gated_ffn():
    from actsparse.ir.blocks import find_blocks

    blocks = find_blocks(build_decode_graph(read_causal_lm(random_lm("phi3"), 32)))
    assert [b.kind for b in blocks.ffn] == ["gated", "gated"]
    assert len(blocks.attention) == 2 and all(b.o is not None for b in blocks.attention)


def test_unsupported_family_and_context_are_clear_errors():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ActsparseError, match="not supported for generation"):
        read_causal_lm(gpt2, 16)
    with pytest.raises(ActsparseError, match="max_position_embeddings"):
        read_causal_lm(random_lm("llama"), 4096)
    with pytest.raises(ActsparseError, match="max_position_embeddings"):
        read_causal_lm(random_lm("opt"), 129)  # the learned position table ends at 128


@pytest.mark.parametrize("family", ["gpt_neox", "opt_post_norm", "falcon_new_arch"])
def test_layernorm_family_folders_read_like_their_modules(family, tmp_path):
    """A saved folder keeps the checkpoint names (GPT-NeoX's head is `embed_out`, tied heads are
    left out): read from safetensors, the decode step still gives transformers' logits."""
    model = random_lm(family)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokens = [0, 5, 9, 200, 31, 7]
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0].numpy()
    got = ort_decode_logits(build_decode_graph(read_causal_lm(tmp_path, 32)), tokens)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)


def test_falcon_alibi_is_refused_by_name():
    config = transformers.FalconConfig(**SIZES, alibi=True)
    with pytest.raises(ActsparseError, match="ALiBi"):
        read_causal_lm(transformers.AutoModelForCausalLM.from_config(config), 32)


@pytest.mark.parametrize("family", ["gpt_neox", "opt", "falcon"])
def test_non_gated_ffns_are_found_as_ffn_blocks(family):
    """fc1 / act / fc2 (with biases) is an "mlp" FFN block and fused qkv projections are split into
    q, k, v: sparsify, quantize and the kernels find them as in a Llama."""
    from actsparse.ir.blocks import find_blocks

    blocks = find_blocks(build_decode_graph(read_causal_lm(random_lm(family), 32)))
    assert [b.kind for b in blocks.ffn] == ["mlp", "mlp"]
    assert [b.name for b in blocks.ffn] == ["layers.0.mlp", "layers.1.mlp"]
    assert len(blocks.attention) == 2 and all(b.o is not None and not b.fused_qkv for b in blocks.attention)
    expected = "relu" if family == "opt" else "gelu"
    assert all(b.activation.kind == expected for b in blocks.ffn)


@pytest.fixture(scope="module")
def llama():
    return random_lm("llama")


@pytest.fixture(scope="module")
def dense_lm(llama, tmp_path_factory):
    art = compile_causal_lm(llama, "host", output=tmp_path_factory.mktemp("lm") / "dense.actsparse", max_context=48)
    return art


def test_compiled_greedy_equals_transformers(llama, dense_lm):
    lm = actsparse.load(dense_lm.path)
    assert isinstance(lm, LanguageModel) and lm.max_context == 48
    prompt = [0, 17, 42, 99, 5]
    got = list(lm.generate(prompt, 30, stop_tokens=[]))
    assert got == torch_greedy(llama, prompt, 30)
    assert lm.stats.prompt_tokens == 5 and lm.stats.new_tokens == 30 and lm.stats.decode_steps == 29
    assert lm.stats.decode_tokens_per_second > 0
    # a second sequence on the same object, without reloading, gives the same tokens
    assert list(lm.generate(prompt, 30, stop_tokens=[])) == got


NEW_FAMILIES = ["phi3_partial_rotary", "gpt_neox", "gpt_neox_sequential", "opt", "opt_post_norm", "falcon",
                "falcon_new_arch", "falcon_sequential"]


@pytest.mark.slow
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_compiled_greedy_equals_transformers_per_family(family, tmp_path):
    """LayerNorm, parallel residual, learned positions, partial rotary, fused qkv layouts: the
    compiled decode step over the KV cache generates transformers' greedy tokens."""
    model = random_lm(family)
    art = compile_causal_lm(model, "host", output=tmp_path / f"{family}.actsparse", max_context=48)
    lm = actsparse.load(art.path)
    prompt = [0, 17, 42, 99, 5]
    assert list(lm.generate(prompt, 24, stop_tokens=[])) == torch_greedy(model, prompt, 24)
    assert lm.info["family"] == model.config.model_type


@pytest.mark.slow
def test_opt_relu_ffn_runs_on_the_sparse_kernel(tmp_path):
    """OPT's fc1 / ReLU / fc2: with no pass at all, fc2 reads only the rows of the nonzero ReLU
    outputs (the `nonzero` kernel) and the tokens are still transformers'."""
    model = random_lm("opt")
    art = compile_causal_lm(model, "host", output=tmp_path / "opt.actsparse", max_context=32)
    kernels = {k["name"]: k["kernel"] for k in art.kernels}
    assert [kernels[f"layers.{i}.mlp.down_proj"] for i in range(2)] == ["nonzero"] * 2
    assert kernels["layers.0.mlp.up_proj"] == "dense"
    lm = actsparse.load(art.path)
    assert list(lm.generate([2, 7, 9], 12, stop_tokens=[])) == torch_greedy(model, [2, 7, 9], 12)


def test_compiled_step_logits_and_perplexity_match_onnxruntime(llama, dense_lm):
    decode = build_decode_graph(read_causal_lm(llama, 48))
    tokens = [0, 5, 77, 123, 9, 250, 31, 8, 64, 12, 200, 3]
    reference = ort_decode_logits(decode, tokens)
    lm = actsparse.load(dense_lm.path)
    lm.reset()
    got = np.array([lm.step(t) for t in tokens])
    np.testing.assert_allclose(got, reference, atol=1e-4, rtol=1e-4)
    logp = reference - np.log(np.exp(reference).sum(-1, keepdims=True))
    ort_ppl = float(np.exp(-np.mean([logp[i, tokens[i + 1]] for i in range(len(tokens) - 1)])))
    assert lm.perplexity(tokens) == pytest.approx(ort_ppl, rel=1e-3)


def test_generation_errors_are_clear(dense_lm):
    lm = actsparse.load(dense_lm.path)
    with pytest.raises(ActsparseError, match="context overflow"):
        list(lm.generate([1, 2, 3], 46))
    with pytest.raises(ActsparseError, match="outside the vocabulary"):
        list(lm.generate([1, 300], 2))
    with pytest.raises(ActsparseError, match="empty"):
        list(lm.generate([], 2))
    with pytest.raises(ActsparseError, match="top_p"):
        list(lm.generate([1], 2, top_p=0))
    with pytest.raises(ActsparseError, match="no tokenizer"):
        lm.generate_text("hello", 4)
    lm.reset()
    for t in range(48):
        lm.step(t % 7)
    with pytest.raises(ActsparseError, match="context overflow"):
        lm.step(1)


def test_sampling_rules():
    logits = np.array([1.0, 3.0, 2.0, -1.0])
    assert sample(logits) == 1
    rng = np.random.default_rng(0)
    assert {sample(logits, 1.0, top_k=1, rng=rng) for _ in range(20)} == {1}
    draws = {sample(logits, 1.0, top_k=2, rng=rng) for _ in range(200)}
    assert draws == {1, 2}
    assert {sample(logits, 1.0, top_p=0.5, rng=rng) for _ in range(50)} == {1}  # token 1 alone holds > 0.5
    # repetition penalty divides a positive logit: 3 / 4 < 2
    assert sample(logits, repetition_penalty=4.0, seen=[1]) == 2
    a = [sample(logits, 0.8, rng=np.random.default_rng(7)) for _ in range(5)]
    b = [sample(logits, 0.8, rng=np.random.default_rng(7)) for _ in range(5)]
    assert a == b


def test_seeded_sampling_and_streaming(dense_lm):
    lm = actsparse.load(dense_lm.path)
    seen = []
    first = list(lm.generate([0, 4], 12, temperature=0.9, top_k=40, top_p=0.95, seed=3, stop_tokens=[],
                             on_token=seen.append))
    assert seen == first and len(first) == 12
    assert list(lm.generate([0, 4], 12, temperature=0.9, top_k=40, top_p=0.95, seed=3, stop_tokens=[])) == first


def test_teal_decode_step_runs_sparse_kernels_everywhere(llama, tmp_path):
    art = compile_causal_lm(llama, "host", "sparsify{method=teal,sparsity=0.5}", output=tmp_path / "teal.actsparse",
                            max_context=32)
    kernels = {k["name"]: k["kernel"] for k in art.kernels}
    attention = [n for n in kernels if "self_attn" in n]
    assert len(attention) == 8 and all(kernels[n] == "threshold" for n in attention)
    assert [kernels[f"layers.{i}.mlp"] for i in range(2)] == ["ffn_input_sparse"] * 2
    layers = art.records[-1].report["layers"]
    assert all(abs(l["calibrated_sparsity"] - 0.5) < 0.1 for l in layers)
    lm = actsparse.load(art.path)
    tokens = list(lm.generate([0, 3, 9], 10, stop_tokens=[]))
    assert len(tokens) == 10 and all(0 <= t < 300 for t in tokens)
    assert np.isfinite(lm.perplexity([0, 3, 9, 27, 81, 243]))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt_neox", "falcon"])
def test_teal_on_layernorm_families_runs_sparse_kernels_and_a_dense_prompt(family, tmp_path):
    """TEAL on non-gated FFNs with biases, parallel residuals (Falcon: q, k, v and fc1 share one
    normed input, so one threshold): every projection on the sparse kernel; the prompt chunk reads
    those kernels' weights densely and gives transformers' logits of the dense model."""
    model = random_lm(family)
    art = compile_causal_lm(model, "host", "sparsify{method=teal,sparsity=0.5}", output=tmp_path / "teal.actsparse",
                            max_context=64)  # room for two chunks
    kernels = {k["name"]: k["kernel"] for k in art.kernels}
    projections = [n for n in kernels if ".self_attn." in n or ".mlp." in n]
    assert len(projections) == 12 and all(kernels[n] == "threshold" for n in projections)
    assert all(abs(l["calibrated_sparsity"] - 0.5) < 0.1 for l in art.records[-1].report["layers"])
    lm = actsparse.load(art.path)
    assert lm.prefill_tokens == 32
    tokens = [0] + [int(t) for t in np.random.default_rng(2).integers(2, 300, 39)]
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0, -1].numpy()
    lm.reset()
    np.testing.assert_allclose(lm.prefill(tokens), expected, atol=1e-4, rtol=1e-4)
    assert len(list(lm.generate([0, 3, 9], 8, stop_tokens=[]))) == 8


def test_calibration_feeds_are_decode_steps(llama):
    decode = build_decode_graph(read_causal_lm(llama, 32))
    feeds = decode_feeds(decode, [np.array([0, 1, 2, 3]), np.array([5, 6, 7])])
    assert len(feeds) == 3 + 2  # every step but each sequence's first
    assert [f["position"][0] for f in feeds] == [1, 2, 3, 1, 2]
    assert feeds[2]["past_key.0"].shape == (2, 3, 16)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A Hugging Face folder: config.json + model.safetensors + a word-level tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("hf") / "tiny-qwen2"
    model = random_lm("qwen2", seed=3)
    model.save_pretrained(folder, safe_serialization=True)
    words = ["<s>", "</s>"] + [f"w{i}" for i in range(298)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    return folder, model


def test_cli_compiles_a_hf_folder_and_generates_text(hf_folder, tmp_path):
    folder, model = hf_folder
    calib = tmp_path / "calib.txt"
    calib.write_text("w1 w2 w3 w4 w5 w6 w7 w8 w9\n\nw10 w11 w12 w13 w14 w15 w16\n")
    out = tmp_path / "lm.actsparse"
    cli = [sys.executable, "-m", "actsparse.cli"]
    done = subprocess.run(cli + ["compile", str(folder), "-o", str(out), "--max-context", "64", "--passes",
                                 "sparsify{method=teal,sparsity=0.4,scope=ffn}", "--calib-text", str(calib),
                                 "--kv-cache", "float16"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "ffn_input_sparse x2" in done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["lm"]["family"] == "qwen2" and manifest["lm"]["tokenizer"]["kind"] == "huggingface"
    assert manifest["lm"]["kv_cache"] == "float16" and manifest["lm"]["prefill"] == {"tokens": 32}
    done = subprocess.run(cli + ["generate", str(out), "--prompt", "w5 w6 w7", "--max-new-tokens", "8", "--stop", ""],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("w") and len(done.stdout.split()) == 8
    assert "decode: 8 tokens" in done.stderr and "tok/s" in done.stderr
    done = subprocess.run(cli + ["generate", str(out), "--prompt-ids", "0,5,x"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("actsparse: error:") and "--prompt-ids" in done.stderr


def test_cli_generate_refuses_a_model_that_is_not_an_lm(tmp_path):
    from actsparse.frontend import zoo
    import onnx

    onnx.save(zoo.swiglu_stack(layers=1, d=32, f=64), tmp_path / "ffn.onnx")
    art = actsparse.compile(str(tmp_path / "ffn.onnx"), output=tmp_path / "ffn.actsparse")
    done = subprocess.run([sys.executable, "-m", "actsparse.cli", "generate", str(art.path), "--prompt-ids", "1"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "not a language-model artifact" in done.stderr


def test_in_repo_lm_greedy_64_tokens_equal_torch(tmp_path):
    """Part 6: the in-repo LM (byte tokenizer), dense: 64 greedy tokens equal torch's."""
    from actsparse.lm.model import build_lm, save_lm

    torch_model = build_lm("tiny", seed=5).eval()
    save_lm(torch_model, tmp_path / "ckpt")
    art = compile_causal_lm(tmp_path / "ckpt", "host", output=tmp_path / "lm.actsparse", max_context=96)
    lm = actsparse.load(art.path)
    assert lm.tokenizer.kind == "bytes"
    prompt = [256] + list(b"def f(x):")
    assert list(lm.generate(prompt, 64, stop_tokens=[])) == torch_greedy(torch_model, prompt, 64)
    text = lm.generate_text("def f(x):", 16, stop_tokens=[])
    assert isinstance(text, str)


def test_sliding_window_matches_transformers(tmp_path):
    """Mistral with a window shorter than the context: the compiled step attends to the last
    `sliding_window` positions, as transformers does."""
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(transformers.MistralConfig(**COMMON, sliding_window=6)).eval()
    art = compile_causal_lm(model, "host", output=tmp_path / "sw.actsparse", max_context=32)
    lm = actsparse.load(art.path)
    assert lm.info["window"] == 6
    tokens = [0, 5, 9, 33, 2, 7, 100, 42, 8, 17, 3, 4, 5, 6, 7, 8]
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0].numpy()
    lm.reset()
    np.testing.assert_allclose(np.array([lm.step(t) for t in tokens]), expected, atol=1e-4, rtol=1e-4)


def test_actsparse_compile_takes_a_causal_lm_module_without_a_wrapper(llama, tmp_path):
    """The issue's first failure: actsparse.compile(LlamaForCausalLM(...)) with no example inputs."""
    art = actsparse.compile(llama, target="host", passes="sparsify{method=teal,sparsity=0.5}",
                            output=tmp_path / "lm.actsparse", max_context=32)
    lm = actsparse.load(art.path)
    assert isinstance(lm, LanguageModel) and lm.max_context == 32
    assert len(list(lm.generate([0, 1, 2], 4, stop_tokens=[]))) == 4
    with pytest.raises(ActsparseError, match="for causal LMs"):
        actsparse.compile(str(tmp_path / "missing.onnx"), max_context=8)


def test_bf16_and_fp16_checkpoints_compile_as_float32(tmp_path):
    """Downloaded models are usually bf16 / fp16 safetensors: the weights are read as float32 and
    the compiled model matches transformers run in float32 on the same (rounded) weights."""
    for dtype in (torch.bfloat16, torch.float16):
        model = random_lm("llama", seed=4).to(dtype)
        folder = tmp_path / str(dtype).split(".")[-1]
        model.save_pretrained(folder, safe_serialization=True)
        art = compile_causal_lm(folder, "host", output=folder / "lm.actsparse", max_context=16)
        lm = actsparse.load(art.path)
        tokens = [0, 9, 99, 199]
        with torch.no_grad():
            expected = model.float()(torch.tensor([tokens])).logits[0].numpy()
        lm.reset()
        np.testing.assert_allclose(np.array([lm.step(t) for t in tokens]), expected, atol=1e-4, rtol=1e-3)
