"""Our model runner against transformers' LlamaForCausalLM on the embedded default model."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from server.lora.slots import AdapterSlots
from server.model.kv_cache import PagedKVCache
from server.engine.runner import ModelRunner
from server.model.linear import DenseLinear
from server.model.weights import base_weight_bytes, load_model

from .conftest import PROMPT, paged_sequences, run_pass


def build_runner(base_dir, quantize: bool, dtype: torch.dtype, block_size: int = 16) -> ModelRunner:
    config = AutoConfig.from_pretrained(base_dir)
    model, stacks = load_model(base_dir, config, dtype, torch.device("cpu"), quantize, num_lora_slots=2,
                               max_lora_rank=8)
    cache = PagedKVCache(model.args.n_layers, 64, block_size, model.args.n_kv_heads, model.args.head_dim, dtype,
                         torch.device("cpu"))
    return ModelRunner(model, cache, AdapterSlots(stacks, 1), torch.device("cpu"))


def run_steps(runner: ModelRunner, prompts: list[list[int]], continuations: list[list[int]]) -> list[torch.Tensor]:
    """Prefill the prompts together, then feed the given continuation tokens one step at a time;
    returns each step's logits [n, vocab]."""
    seqs = paged_sequences(runner, prompts)
    steps = [run_pass(runner, [(seq, len(seq.prompt_ids)) for seq in seqs])]
    for i in range(len(continuations[0])):
        for seq, cont in zip(seqs, continuations):
            seq.output_ids.append(cont[i])
        steps.append(run_pass(runner, [(seq, 1) for seq in seqs]))
    return steps


def reference_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()   # [T, vocab]


def test_logits_match_transformers_in_float32(base_dir, base_model, tokenizer):
    runner = build_runner(base_dir, quantize=False, dtype=torch.float32)
    # Two prompts of different lengths in one padded prefill, then decode steps for both.
    prompts = [tokenizer.encode(PROMPT), tokenizer.encode("Paris is the capital of")]
    continuations = [[11, 260, 1345], [2136, 30, 198]]
    steps = run_steps(runner, prompts, continuations)
    for row, (prompt, cont) in enumerate(zip(prompts, continuations)):
        expected = reference_logits(base_model, prompt + cont)
        for step, logits in enumerate(steps):
            want = expected[len(prompt) - 1 + step]
            assert torch.allclose(logits[row], want, atol=2e-3, rtol=1e-4), \
                f"row {row} step {step}: max diff {(logits[row] - want).abs().max():.2e}"


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
def test_dense_weights_run_prepacked_on_the_cpu_and_equal_f_linear():
    """The CPU keeps dense weights only in oneDNN's layout; x · Wᵀ stays F.linear's, in float64 terms, for
    decode rows, prefill chunks and fused weights, and the memory metric still counts the weights once."""
    torch.manual_seed(0)
    weights = [torch.randn(96, 64), torch.randn(32, 64)]
    linear = DenseLinear(weights)
    assert linear.prepacked is not None and linear.prepacked.layout == torch._mkldnn
    assert not hasattr(linear, "weight"), "only the prepacked copy is kept"
    want_weight = torch.cat(weights).double()
    for rows in (1, 8, 300):
        x = torch.randn(rows, 1, 64)
        got = linear(x)
        assert got.shape == (rows, 1, 128)
        want = x.double() @ want_weight.T
        assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-5), (got.double() - want).abs().max()
    model = torch.nn.Module()
    model.linear = linear
    assert base_weight_bytes(model) == 128 * 64 * 4


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill_beside_decode_rows_matches_transformers(base_dir, base_model, tokenizer, chunk):
    """A prompt computed `chunk` tokens a pass, in blocks of 4 tokens, in the same passes as another request's
    decode rows: every sampled row's logits are transformers' for the same tokens."""
    runner = build_runner(base_dir, quantize=False, dtype=torch.float32, block_size=4)
    long = tokenizer.encode(PROMPT + " Water them, feed the soil, and give them sun.")
    short = tokenizer.encode("Paris is the capital of")
    seqs = paged_sequences(runner, [short, long])
    run_pass(runner, [(seqs[0], len(short))])
    decoded = [2136, 30, 198, 11, 260, 1345, 28, 29, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42]
    want_short = reference_logits(base_model, short + decoded)
    step = 0
    while seqs[1].computed < len(long):
        seqs[0].output_ids.append(decoded[step])
        logits = run_pass(runner, [(seqs[0], 1), (seqs[1], min(chunk, len(long) - seqs[1].computed))])
        assert torch.allclose(logits[0], want_short[len(short) + step], atol=2e-3, rtol=1e-4), f"decode row, step {step}"
        step += 1
    assert logits.shape[0] == 2, "the prompt's last chunk samples"
    assert torch.allclose(logits[1], reference_logits(base_model, long)[-1], atol=2e-3, rtol=1e-4)


def test_nf4_logits_match_transformers_bitsandbytes(base_dir, tokenizer):
    """The NF4 path runs on the CPU here (bitsandbytes 0.50 has CPU kernels); on a GPU it is the default."""
    from transformers import AutoModelForCausalLM

    from adapters.formats.nf4 import bnb_config

    reference = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=bnb_config(torch.bfloat16),
                                                     dtype=torch.bfloat16, device_map="cpu")
    runner = build_runner(base_dir, quantize=True, dtype=torch.bfloat16)
    prompt = tokenizer.encode(PROMPT)
    ours = run_steps(runner, [prompt], [[]])[0][0]
    want = reference_logits(reference, prompt)[-1]
    # bf16 activations: compare the distributions, not bits.
    assert ours.argmax() == want.argmax()
    assert torch.nn.functional.cosine_similarity(ours, want, dim=0) > 0.999
