"""The decode step's Triton kernels besides the matmuls (server/kernels: rms_norm, rope_cache,
decode_attention) against float64 references on fresh random inputs, and the model run through
every kernel against the same model in plain torch.

Needs a GPU: skipped on CPU-only hosts (CI); run on the GPU machine with
`python -m pytest tests/test_decode_kernels_gpu.py`. On a host without one, `TRITON_INTERPRET=1`
(with triton installed) runs the three kernels' tests in Triton's interpreter, whose bf16 casts
truncate instead of rounding: hence its looser tolerance, and the exactness checks run on CUDA only.
"""
from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
INTERPRETED = not CUDA and os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not (CUDA or INTERPRETED), reason="Triton kernels need a GPU (or TRITON_INTERPRET=1)")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA itself (bitsandbytes, exact rounding)")
TOLERANCE = 1e-2 if INTERPRETED else 4e-3     # bf16 output rounding alone gives ~1e-3

# (query heads, KV heads, head dim, hidden) of the default model (SmolLM2-135M), a 1B Llama (TinyLlama) and Llama-2-7B
SHAPES = {"default": (9, 3, 64, 576), "1b": (32, 4, 64, 2048), "7b": (32, 32, 128, 4096)}
ROWS = [1, 2, 5, 8, 17, 32, 64]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def poison_allocator() -> None:
    """Fills memory the caching allocator hands out next with NaN, so unwritten outputs show."""
    if CUDA:
        torch.full((64 << 20,), float("nan"), device="cuda")


def rope_tables(rows: int, head_dim: int, max_pos: int, generator: torch.Generator):
    """Positions and the rows' cos/sin at them, built as transformers builds them (both halves equal)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    positions = torch.randint(0, max_pos, (rows,), generator=generator)
    positions[0], positions[-1] = 0, max_pos - 1
    freqs = torch.outer(positions.double(), inv_freq)
    table = torch.cat((freqs, freqs), dim=-1)
    return (positions.to(DEVICE), table.cos().to(torch.bfloat16).to(DEVICE),
            table.sin().to(torch.bfloat16).to(DEVICE))


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, D], cos/sin [B, D] -> float64 x·cos + rotate_half(x)·sin (model.rotate_half)."""
    x, half = x.double(), x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.double()[:, None] + rotated * sin.double()[:, None]


@pytest.mark.parametrize("model", SHAPES)
def test_add_rms_norm_matches_float64_reference(model):
    from server.kernels.rms_norm import add_rms_norm
    from server.model.llama import RMSNorm

    dim = SHAPES[model][3]
    generator = torch.Generator().manual_seed(0)
    weight = (1 + 0.1 * torch.randn(dim, generator=generator)).to(torch.bfloat16).to(DEVICE)
    for rows in ROWS:
        x = torch.randn(rows, dim, generator=generator).to(torch.bfloat16).to(DEVICE)
        for delta in (None, torch.randn(rows, dim, generator=generator).to(torch.bfloat16).to(DEVICE)):
            poison_allocator()
            y, h = add_rms_norm(x, delta, weight, 1e-5)
            stream = x.double() if delta is None else x.double() + delta.double()
            want = stream * torch.rsqrt(stream.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
            assert relative_error(h, stream) < TOLERANCE, f"{model} rows={rows}: residual"
            assert relative_error(y, want) < TOLERANCE, f"{model} rows={rows}: {relative_error(y, want):.2e}"
            if CUDA:   # the same roundings as the torch path it replaces
                norm = RMSNorm(dim, 1e-5).to(DEVICE, torch.bfloat16)
                norm.weight.data = weight
                torch_y, torch_h = norm(x, delta)
                assert torch.equal(h, torch_h)
                torch.testing.assert_close(y, torch_y, rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("model", SHAPES)
def test_rope_and_cache_write_matches_float64_reference(model):
    from server.kernels.rope_cache import rope_and_cache_write

    heads, kv_heads, head_dim, _ = SHAPES[model]
    generator = torch.Generator().manual_seed(1)
    length, num_blocks, block_size = 200, 40, 16
    for rows in (1, 5, 32):
        _, cos, sin = rope_tables(rows, head_dim, length, generator)
        slots = torch.randperm(num_blocks * block_size, generator=generator)[:rows].to(DEVICE)   # anywhere in the pool
        # q|k|v as column slices of one fused projection output, as the model hands them over
        fused = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=generator).to(torch.bfloat16).to(DEVICE)
        q, k, v = fused.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=torch.bfloat16,
                             device=DEVICE)
        v_cache = k_cache.clone()
        poison_allocator()
        q_out = rope_and_cache_write(q, k, v, slots, cos, sin, k_cache, v_cache)
        assert relative_error(q_out, rope_reference(q.view(rows, heads, head_dim), cos, sin)) < TOLERANCE
        k_flat, v_flat = k_cache.view(-1, kv_heads, head_dim), v_cache.view(-1, kv_heads, head_dim)
        assert relative_error(k_flat[slots], rope_reference(k.view(rows, kv_heads, head_dim), cos, sin)) < TOLERANCE
        assert torch.equal(v_flat[slots], v.reshape(rows, kv_heads, head_dim))
        k_flat[slots] = 0
        v_flat[slots] = 0
        assert k_cache.isnan().sum() == k_cache.numel() - rows * kv_heads * head_dim, "wrote outside the rows' slots"
        assert v_cache.isnan().sum() == v_cache.numel() - rows * kv_heads * head_dim


@pytest.mark.parametrize("model", SHAPES)
@pytest.mark.parametrize("block_size", [16, 5])
def test_paged_decode_attention_matches_float64_softmax(model, block_size):
    """Each row's tokens in blocks scattered over the pool, in its block table's order."""
    from server.kernels.decode_attention import decode_attention

    heads, kv_heads, head_dim, _ = SHAPES[model]
    generator = torch.Generator().manual_seed(2)
    length, group = 300, heads // kv_heads                 # 300: not a multiple of any block
    max_blocks = -(-length // block_size)
    for rows in (1, 5, 32):
        positions = torch.randint(0, length, (rows,), generator=generator)
        positions[0], positions[-1] = 0, length - 1
        num_blocks = 1 + rows * max_blocks                 # block 0: NaN, what unused table entries point to
        tables = torch.zeros(rows + 2, max_blocks, dtype=torch.int32)
        tables[:rows] = (1 + torch.randperm(rows * max_blocks, generator=generator)).view(rows, max_blocks)
        q = torch.randn(rows, heads, head_dim, generator=generator).to(torch.bfloat16).to(DEVICE)
        k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator).to(torch.bfloat16)
        v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator).to(torch.bfloat16)
        want = torch.empty(rows, heads, head_dim, dtype=torch.float64)
        for b, p in enumerate(positions.tolist()):
            used = p // block_size + 1
            keys = k_cache[tables[b, :used].long()].flatten(0, 1)[:p + 1].double()      # [p+1, KV, D]
            values = v_cache[tables[b, :used].long()].flatten(0, 1)[:p + 1].double()
            keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
            scores = torch.einsum("lhd,hd->hl", keys, q[b].cpu().double()) * head_dim ** -0.5
            want[b] = torch.einsum("hl,lhd->hd", scores.softmax(-1), values)
            # Past the row's position its blocks may hold anything (a longer earlier request's keys): never read.
            k_cache.view(-1, kv_heads, head_dim)[tables[b, p // block_size].long() * block_size + p % block_size + 1:
                                                 (tables[b, p // block_size].long() + 1) * block_size] = float("nan")
            tables[b, used:] = 0
        k_cache[0], v_cache[0] = float("nan"), float("nan")
        poison_allocator()
        out = decode_attention(q, k_cache.to(DEVICE), v_cache.to(DEVICE), tables.to(DEVICE), positions.to(DEVICE))
        assert not out.isnan().any(), f"{model} rows={rows}: read past a row's position, or left output unwritten"
        assert relative_error(out.cpu(), want) < TOLERANCE, f"{model} rows={rows}: {relative_error(out.cpu(), want):.2e}"


@pytest.mark.parametrize("model", SHAPES)
@pytest.mark.parametrize("block_size", [16, 5])
def test_paged_prefill_attention_matches_float64_causal_softmax(model, block_size):
    """Chunks of every kind in one launch: whole prompts, a prompt's later chunk over its cached start (or a
    prefix-cache hit), one-token chunks; blocks scattered over the pool, NaN wherever no chunk may read."""
    from server.kernels.prefill_attention import prefill_attention

    heads, kv_heads, head_dim, _ = SHAPES[model]
    generator = torch.Generator().manual_seed(4)
    group = heads // kv_heads
    # Triton's interpreter gets tl.dot of bf16 operands wrong (values of order 1e8): float32 there.
    dtype = torch.float32 if INTERPRETED else torch.bfloat16
    # (start, length): positions start..start+length-1 are the chunk's rows; 0..start-1 are already cached.
    spreads = {"whole prompts": [(0, 7), (0, 64), (0, 1), (0, 70)],
               "continued and cached starts": [(37, 5), (64, 64), (3, 1), (0, 33), (129, 17)]}
    for spread, chunks in spreads.items():
        max_blocks = max(-(-(s + n) // block_size) for s, n in chunks)
        num_blocks = 1 + len(chunks) * max_blocks          # block 0: NaN, what unused table entries point to
        tables = torch.zeros(len(chunks), max_blocks, dtype=torch.int32)
        tables[:] = (1 + torch.randperm(len(chunks) * max_blocks, generator=generator)).view(len(chunks), max_blocks)
        k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator).to(dtype)
        v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator).to(dtype)
        total = sum(n for _, n in chunks)
        q = torch.randn(total, heads, head_dim, generator=generator).to(dtype)
        want = torch.empty(total, heads, head_dim, dtype=torch.float64)
        meta, row = [], 0
        for c, (start, length) in enumerate(chunks):
            end = start + length
            used = -(-end // block_size)
            keys = k_cache[tables[c, :used].long()].flatten(0, 1)[:end].double().repeat_interleave(group, dim=1)
            values = v_cache[tables[c, :used].long()].flatten(0, 1)[:end].double().repeat_interleave(group, dim=1)
            scores = torch.einsum("lhd,ihd->hil", keys, q[row:row + length].double()) * head_dim ** -0.5
            causal = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]         # [i, l]
            scores = scores.masked_fill(~causal, float("-inf"))
            want[row:row + length] = torch.einsum("hil,lhd->ihd", scores.softmax(-1), values)
            # Past the chunk's last position its blocks may hold anything: never read.
            last_block = tables[c, (end - 1) // block_size].long()
            k_cache.view(-1, kv_heads, head_dim)[last_block * block_size + (end - 1) % block_size + 1:
                                                 (last_block + 1) * block_size] = float("nan")
            tables[c, used:] = 0
            meta.append((row, length, start))
            row += length
        k_cache[0], v_cache[0] = float("nan"), float("nan")
        poison_allocator()
        out = prefill_attention(q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), tables.to(DEVICE),
                                torch.tensor(meta, dtype=torch.int32, device=DEVICE), max(n for _, n in chunks))
        assert not out.isnan().any(), f"{model} {spread}: read past a chunk's position, or left a row unwritten"
        error = relative_error(out.cpu(), want)
        assert error < TOLERANCE, f"{model} {spread} block {block_size}: {error:.2e}"


@needs_cuda
@pytest.mark.parametrize("rows", [1, 3, 4, 16, 64, 65])
@pytest.mark.parametrize("kernel_max_rows", [64, 0])
def test_fused_nf4_weights_equal_each_weight_alone(rows, kernel_max_rows):
    """q|k|v as one NF4Linear (one launch of our kernel up to kernel_max_rows; bitsandbytes a weight
    at a time otherwise) equals each weight dequantized alone, with its own double-quantized scales."""
    from adapters.formats import nf4
    from server.model.linear import NF4Linear

    generator = torch.Generator().manual_seed(3)
    weights = [torch.randn(n, 2048, generator=generator).to(DEVICE) * scale for n, scale in
               ((2048, 1.0), (256, 3.0), (256, 0.2))]
    fused = NF4Linear(weights, torch.bfloat16, kernel_max_rows=kernel_max_rows)
    dense = torch.cat([nf4.round_trip(w) for w in weights]).double()
    x = torch.randn(rows, 2048, generator=generator).to(torch.bfloat16).to(DEVICE)
    out = fused(x)
    assert out.shape == (rows, 2560) and fused.splits == (2048, 256, 256)
    for part, (start, end) in zip(("q", "k", "v"), ((0, 2048), (2048, 2304), (2304, 2560))):
        want = x.double() @ dense[start:end].T
        # bitsandbytes' one-row GEMV accumulates less precisely than a GEMM (4.05e-3 seen on this k)
        tolerance = 8e-3 if rows == 1 and kernel_max_rows == 0 else 4e-3
        assert relative_error(out[:, start:end], want) < tolerance, f"rows={rows} {part}"


@needs_cuda
@pytest.mark.parametrize("quantize", [True, False])
def test_model_through_kernels_matches_plain_torch(tmp_path, quantize):
    """Prefill chunks and decode rows of mixed adapters (ranks 8 and 4, base rows between), in mixed passes,
    same tokens fed to both."""
    from server.lora.slots import AdapterSlots
    from server.model.kv_cache import PagedKVCache
    from server.engine.runner import ModelRunner
    from server.model.weights import load_model
    from tests.conftest import paged_sequences, run_pass, tiny_llama_checkpoint

    config = tiny_llama_checkpoint(tmp_path)
    targets = frozenset({"q_proj", "v_proj", "up_proj", "down_proj"})
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18]]
    steps = [[21, 22, 23], [24, 25, 26], [27, 28, 29], [30, 31, 32]]     # teacher-forced decode tokens

    def logits(kernels: bool) -> list[torch.Tensor]:
        model, stacks = load_model(tmp_path, config, torch.bfloat16, torch.device("cuda"), quantize, num_lora_slots=4,
                                   max_lora_rank=8, kernels=kernels)
        generator = torch.Generator().manual_seed(1)
        for (_, projection), stack in stacks.items():
            if projection in targets:
                for slot, rank in ((1, 8), (2, 4)):
                    stack.load(slot, torch.randn(rank, stack.a.shape[2], generator=generator) * 0.1,
                               torch.randn(stack.b.shape[1], rank, generator=generator) * 0.2)
        slots = AdapterSlots(stacks, 3)
        slots.ranks.update({1: 8, 2: 4})
        slots.projections.update({1: targets, 2: targets})
        cache = PagedKVCache(3, 32, 4, 2, 64, torch.bfloat16, torch.device("cuda"))
        runner = ModelRunner(model, cache, slots, torch.device("cuda"))
        seqs = paged_sequences(runner, prompts, [1, 0, 2])
        out = [run_pass(runner, [(seqs[0], 5), (seqs[1], 2), (seqs[2], 3)])]         # the third's prompt in 2 chunks
        for tokens in steps:
            for seq, token in zip(seqs, tokens):
                seq.output_ids.append(token)
            # the third: its last 4 prompt tokens and a fed token, beside the others' decode rows; then one each
            out.append(run_pass(runner, [(seq, seq.num_tokens - seq.computed) for seq in seqs]))
        return out

    for step, (ours, torch_path) in enumerate(zip(logits(True), logits(False))):
        assert relative_error(ours, torch_path.double()) < 2e-2, f"step {step}"
