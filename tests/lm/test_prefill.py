"""The prompt in chunks (`prefill`) over the decode step's weights: the same logits and cache as
the decode step token by token, for each family and each kernel layout the chunk reads."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import actsparse  # noqa: E402
from actsparse.errors import ActsparseError  # noqa: E402
from actsparse.lm.compile import compile_causal_lm  # noqa: E402

from tests.lm.test_generate import COMMON, FAMILIES, random_lm, torch_greedy  # noqa: E402

TOKENS = list(np.random.default_rng(0).integers(2, 300, 70))


def stepped_logits(lm, tokens) -> np.ndarray:
    lm.reset()
    return np.array([lm.step(t) for t in tokens])


def assert_chunk_equals_steps(lm, tokens=TOKENS[:40], tolerance: float = 1e-4) -> None:
    """The prompt through `prefill` (chunks) gives the last logits the decode step gives token by token."""
    assert lm.prefill_tokens == 32, lm.info["prefill"]
    reference = stepped_logits(lm, tokens)
    lm.reset()
    np.testing.assert_allclose(lm.prefill(tokens), reference[-1], atol=tolerance, rtol=tolerance)


def count_chunks(lm) -> list[int]:
    calls: list[int] = []
    run = lm._run_chunk
    lm._run_chunk = lambda tokens: (calls.append(len(tokens)), run(tokens))[1]
    return calls


@pytest.fixture(scope="module")
def llama():
    return random_lm("llama")  # GQA, llama3-scaled RoPE


@pytest.fixture(scope="module")
def dense(llama, tmp_path_factory):
    path = compile_causal_lm(llama, "host", output=tmp_path_factory.mktemp("pf") / "dense.actsparse",
                             max_context=96).path
    return actsparse.load(path)


def test_chunks_equal_single_steps(dense):
    assert dense.prefill_tokens == 32 and dense.info["prefill"] == {"tokens": 32}
    reference = stepped_logits(dense, TOKENS)
    chunks = count_chunks(dense)
    for length, expected_chunks in ((8, [8]), (31, [31]), (32, [32]), (33, [32]), (45, [32, 13]), (70, [32, 32])):
        chunks.clear()
        dense.reset()
        logits = dense.prefill(TOKENS[:length])
        assert chunks == expected_chunks and dense.length == length
        np.testing.assert_allclose(logits, reference[length - 1], atol=1e-5, rtol=1e-5)
    # the cache the chunks wrote serves the steps after them
    dense.reset()
    dense.prefill(TOKENS[:40])
    np.testing.assert_allclose(np.array([dense.step(t) for t in TOKENS[40:50]]), reference[40:50], atol=1e-5,
                               rtol=1e-5)
    # a chunk after a step starts at the current length
    dense.reset()
    dense.step(TOKENS[0])
    np.testing.assert_allclose(dense.prefill(TOKENS[1:45]), reference[44], atol=1e-5, rtol=1e-5)


def test_long_prompt_greedy_equals_transformers(llama, dense):
    prompt = [0] + TOKENS[:44]
    got = list(dense.generate(prompt, 20, stop_tokens=[]))
    assert got == torch_greedy(llama, prompt, 20)
    assert dense.stats.prompt_tokens == 45 and dense.stats.prompt_tokens_per_second > 0


def test_prefill_errors_are_clear(dense):
    dense.reset()
    with pytest.raises(ActsparseError, match="context overflow"):
        dense.prefill(list(range(2, 99)))
    with pytest.raises(ActsparseError, match="outside the vocabulary"):
        dense.prefill([1] * 20 + [300])
    with pytest.raises(ActsparseError, match="no tokens"):
        dense.prefill([])
    assert dense.length == 0


def test_teal_prompt_runs_dense_over_the_sparse_kernels_weights(llama, dense, tmp_path):
    """TEAL's kernels keep W row-major (kn) and fuse the FFN's gate and up: the chunk reads those
    arrays and computes the dense model (the thresholds are for single tokens)."""
    art = compile_causal_lm(llama, "host", "sparsify{method=teal,sparsity=0.5}", output=tmp_path / "teal.actsparse",
                            max_context=96)
    teal = actsparse.load(art.path)
    assert teal.prefill_tokens == 32
    reference = stepped_logits(dense, TOKENS[:40])
    teal.reset()
    np.testing.assert_allclose(teal.prefill(TOKENS[:40]), reference[-1], atol=1e-4, rtol=1e-4)
    # one copy of the weights: the artifact is no bigger than the dense one's weights plus packing
    assert teal.weight_bytes <= dense.weight_bytes * 1.01


@pytest.mark.slow
def test_rsparse_prompt_reads_w_from_the_rank_sparse_kernels_weights(llama, dense, tmp_path):
    """R-Sparse's decode kernel holds [W; B] row-major: the chunk reads W, its first K rows, and
    computes the dense model, as for TEAL."""
    art = compile_causal_lm(llama, "host", "rsparse{sparsity=0.5,sparse_ratio=0.5,scope=ffn}", output=tmp_path / "rsparse.actsparse",
                            max_context=96)
    assert "rsparse" in {layer["kernel"] for layer in art.kernels}
    rsparse = actsparse.load(art.path)
    assert rsparse.prefill_tokens == 32, rsparse.info["prefill"]
    reference = stepped_logits(dense, TOKENS[:40])
    rsparse.reset()
    np.testing.assert_allclose(rsparse.prefill(TOKENS[:40]), reference[-1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma", "phi3", "phi3_partial_rotary", "gpt_neox",
                                    "gpt_neox_sequential", "opt", "opt_post_norm", "falcon", "falcon_new_arch",
                                    "falcon_sequential"])
def test_families_chunks_equal_single_steps(family, tmp_path):
    """Biases (qwen2), q/k norms (qwen3), a scaled embedding, norm offset and GELU FFN (gemma), fused
    projections split (phi3), partial rotary (phi3_partial_rotary, gpt_neox), LayerNorm and parallel
    residual (gpt_neox, falcon), learned positions, post-norm and the embedding projections (opt),
    and the fused-qkv layouts (falcon: multi-query, kv groups, per-head)."""
    art = compile_causal_lm(random_lm(family), "host", output=tmp_path / f"{family}.actsparse", max_context=64)
    assert_chunk_equals_steps(actsparse.load(art.path))


def test_shared_quant_kernel_over_two_chunk_inputs_still_runs_chunks(tmp_path):
    """A freshly initialized GPT-NeoX has equal attention and MLP norms: the decode step's optimizer
    merges them, so with int8 + a sparsifier on a VNNI CPU q/k/v and up read one Sparsify output and
    share one kernel, while the chunk graph keeps two norms. The chunk runs that kernel once per
    input (it used to give up on chunks and run the prompt token by token)."""
    from actsparse.codegen.kernels.cpu.quant import has_int8_dot_product
    from actsparse.codegen.targets import resolve_target

    if not has_int8_dot_product(resolve_target("host")):
        pytest.skip("layers share a quant kernel on AVX-512 VNNI CPUs only")
    passes = "sparsify{method=teal,sparsity=0.000001},quantize{mode=dynamic,bits=8}"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES["gpt_neox"]()).eval()  # norms all 1, biases 0
    art = compile_causal_lm(model, "host", passes, output=tmp_path / "neox.actsparse", max_context=64)
    lm = actsparse.load(art.path)
    assert lm.prefill_tokens == 32, lm.info["prefill"]
    assert_chunk_equals_steps(lm)


@pytest.mark.parametrize("passes", ["quantize{mode=dynamic,bits=8}", "quantize{mode=weight_only,bits=4}"])
def test_quantized_opt_350m_layout_runs_chunks(passes, tmp_path):
    """OPT-350m's project_out feeds lm_head directly: both quantized, both on our kernels, and the
    chunk binds them (the decode step used to keep project_out's generic MatMulInteger / fail on
    its MatMulNBits, so no chunk)."""
    art = compile_causal_lm(random_lm("opt_post_norm"), "host", passes, output=tmp_path / "opt.actsparse", max_context=64)
    kernels = {layer["name"].split(".")[0]: layer["kernel"] for layer in art.kernels}
    assert kernels["project_out"].startswith(("int8", "int4")) and kernels["lm_head"].startswith(("int8", "int4"))
    assert_chunk_equals_steps(actsparse.load(art.path))


@pytest.mark.slow
def test_sliding_window_chunks_equal_single_steps(tmp_path):
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(transformers.MistralConfig(**COMMON, sliding_window=6)).eval()
    assert_chunk_equals_steps(actsparse.load(compile_causal_lm(model, "host", output=tmp_path / "sw.actsparse",
                                                               max_context=64).path))


@pytest.mark.parametrize("family, passes", [
    ("gpt_neox", "relufy"),  # a plain GELU MLP: no fused gated kernel to take the activation from
    ("gpt_neox_sequential", "relufy{act=relu2}"),  # gelu_new -> ReLU squared
    ("llama", "relufy{act=shifted_relu,shift=0.05},quantize{mode=dynamic,bits=8}"),  # gated, not fused
])
def test_relufied_chunks_outside_a_fused_kernel_use_the_relufied_activation(family, passes, tmp_path):
    """The chunk graph is built with the activation relufy put in the decode step (it used to have
    the model's own, so such models ran their prompt token by token)."""
    art = compile_causal_lm(random_lm(family), "host", passes, output=tmp_path / "relu.actsparse", max_context=64)
    assert_chunk_equals_steps(actsparse.load(art.path), tolerance=2e-4)


@pytest.mark.slow
def test_relufied_fused_ffn_chunks_follow_the_decode_activation(llama, tmp_path):
    """relufy changes the FFN's activation: the chunk takes it from the fused kernel (gate-sparse
    form: gate panels, Wu^T read through strides), not from the model's own SiLU."""
    art = compile_causal_lm(llama, "host", "relufy", output=tmp_path / "relu.actsparse", max_context=64)
    assert {k["kernel"] for k in art.kernels if k["name"].endswith(".mlp")} == {"ffn_gate_sparse"}
    assert_chunk_equals_steps(actsparse.load(art.path))


@pytest.mark.slow
def test_quantized_chunks_run_the_int8_and_int4_kernels_at_32_rows(llama, tmp_path):
    from actsparse.codegen.kernels.cpu.quant import has_int8_dot_product
    from actsparse.codegen.targets import resolve_target

    kernels = {}

    def build(passes: str):
        slug = str(abs(hash(passes)))
        art = compile_causal_lm(llama, "host", passes, output=tmp_path / f"{slug}.actsparse", max_context=64)
        kernels[passes] = {layer["kernel"] for layer in art.kernels}
        return actsparse.load(art.path)

    teal = "sparsify{method=teal,sparsity=0.5},"
    plain = {}
    for passes in ("quantize{mode=dynamic,bits=8}", "quantize{mode=weight_only,bits=4}"):
        plain[passes] = lm = build(passes)
        assert_chunk_equals_steps(lm)
    # int4 + TEAL: the sparse kernels' K-major layout, read densely (on a VNNI CPU the one-row
    # int4 VNNI kernel's rows, all 32 rows a call; elsewhere mode nonzero, 8 rows a call). Both
    # chunks and the plain int4 model's dense kernel may round x to int8 per group (VNNI): they
    # agree to that rounding, far closer than the TEAL model's sparse steps are to either.
    int4_teal = build(teal + "quantize{mode=weight_only,bits=4}")
    sparse_steps = stepped_logits(int4_teal, TOKENS[:40])[-1]
    int4_teal.reset()
    lm.reset()
    dense_prompt, int4_prompt = int4_teal.prefill(TOKENS[:40]), lm.prefill(TOKENS[:40])
    assert np.abs(dense_prompt - int4_prompt).max() < 0.2 * np.abs(sparse_steps - int4_prompt).max()
    # int8 + TEAL: chunks of 32 everywhere; on a VNNI CPU over the one-row VNNI kernel's u8 rows
    # (int8_vnni_rows_matmul), elsewhere over the sparse int8 layout in mode nonzero
    int8_teal = build(teal + "quantize{mode=dynamic,bits=8}")
    assert int8_teal.prefill_tokens == 32, int8_teal.info["prefill"]
    if not has_int8_dot_product(resolve_target("host")):
        return
    int8 = plain["quantize{mode=dynamic,bits=8}"]
    int8.reset()
    sparse_steps, float_x_prompt = stepped_logits(int8_teal, TOKENS[:40])[-1], int8.prefill(TOKENS[:40])
    int8_teal.reset()
    assert np.abs(int8_teal.prefill(TOKENS[:40]) - float_x_prompt).max() < 0.2 * np.abs(
        sparse_steps - float_x_prompt).max()
    # The chunk rounds x to int8 per row as each VNNI step rounds it per token. With a threshold
    # below every input that could round to a nonzero code (sparsity 1e-6: the smallest calibration
    # magnitude, far under s_x / 2), steps and chunks do the same integer sums: they agree to the
    # float rounding of the rest of the graph (1e-4, as the float layouts), where a chunk with
    # float x times the codes (the plain int8 model's) is more than 1e-3 away (measured 1.8e-3).
    nearly_dense = "sparsify{method=teal,sparsity=0.000001},quantize{mode=dynamic,bits=8}"
    all_active = build(nearly_dense)
    assert "int8_sparse_threshold_vnni" in kernels[nearly_dense] & kernels[teal + "quantize{mode=dynamic,bits=8}"]
    steps = stepped_logits(all_active, TOKENS[:40])[-1]
    assert np.abs(float_x_prompt - steps).max() > 1e-3
    assert_chunk_equals_steps(all_active, tolerance=1e-4)
    # int4 the same way: per-group rounding of x in steps (int4_sparse_matmul_vnni) and chunks
    # (int4_vnni_rows_matmul) over one copy of the codes
    nearly_dense_int4 = "sparsify{method=teal,sparsity=0.000001},quantize{mode=weight_only,bits=4}"
    all_active = build(nearly_dense_int4)
    assert "int4_sparse_threshold_vnni" in kernels[nearly_dense_int4] & kernels[teal + "quantize{mode=weight_only,bits=4}"]
    assert_chunk_equals_steps(all_active, tolerance=1e-4)


def test_int4_blocked_qdq_chunks_bind_the_decode_kernels(llama, tmp_path):
    """quantize{format=qdq}'s MatMul nodes end in ".matmul_qdq", like ".matmul_nbits": the chunk
    finds the decode step's int4 kernels by layer name (a new MatMul named as the old one it
    replaced had come out "<name>_1", and the prompt ran token by token)."""
    art = compile_causal_lm(llama, "host", "quantize{mode=weight_only,bits=4,format=qdq}",
                            output=tmp_path / "qdq.actsparse", max_context=64)
    assert {layer["kernel"] for layer in art.kernels} == {"int4_dense"}
    assert_chunk_equals_steps(actsparse.load(art.path))


def test_weights_the_decode_step_deduplicated_are_compiled_in(tmp_path):
    """Freshly initialized norms are all ones: the decode step's optimizer keeps one copy of the
    equal arrays, so the chunk's own names are gone; small ones become constants of its code."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON)).eval()
    lm = actsparse.load(compile_causal_lm(model, "host", output=tmp_path / "ones.actsparse", max_context=64).path)
    assert lm.prefill_tokens == 32
    reference = stepped_logits(lm, TOKENS[:40])
    lm.reset()
    np.testing.assert_allclose(lm.prefill(TOKENS[:40]), reference[-1], atol=1e-5, rtol=1e-5)


def test_float16_kv_cache_halves_the_cache_and_keeps_greedy_tokens(llama, dense, tmp_path):
    """--kv-cache float16: the buffers are half the bytes; logits stay within float16 rounding of
    the float32 cache's, prompt chunks and steps alike, and greedy tokens agree."""
    art = compile_causal_lm(llama, "host", output=tmp_path / "f16.actsparse", max_context=96, kv_cache="float16")
    half = actsparse.load(art.path)
    assert half.info["kv_cache"] == "float16" and half.prefill_tokens == 32
    assert all(a.dtype == np.float16 for a in half._cache_arrays)
    assert sum(a.nbytes for a in half._cache_arrays) * 2 == sum(a.nbytes for a in dense._cache_arrays)
    reference = stepped_logits(dense, TOKENS[:45])
    np.testing.assert_allclose(stepped_logits(half, TOKENS[:45]), reference, atol=2e-2, rtol=2e-2)
    half.reset()
    np.testing.assert_allclose(half.prefill(TOKENS[:45]), reference[-1], atol=2e-2, rtol=2e-2)
    prompt = [0] + TOKENS[:40]
    assert list(half.generate(prompt, 16, stop_tokens=[])) == list(dense.generate(prompt, 16, stop_tokens=[]))
    with pytest.raises(ActsparseError, match="kv_cache"):
        compile_causal_lm(llama, "host", output=tmp_path / "bad.actsparse", max_context=32, kv_cache="int8")
