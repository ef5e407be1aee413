"""Our GPU kernels (server/kernels) against float64 references on fresh random inputs.

Needs a GPU: skipped on CPU-only hosts (CI); run on the GPU machine with
`python -m pytest tests/test_kernels_gpu.py`. Shapes are the projections of the default model
(SmolLM2-135M, 576 hidden), a 1B Llama (TinyLlama shape) and Llama-2-7B.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton kernels need a GPU")

# (out_features, in_features) of q, k, gate and down
SHAPES = {
    "default": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
    "1b": [(2048, 2048), (256, 2048), (5632, 2048), (2048, 5632)],
    "7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
}
ROWS = [1, 2, 3, 5, 8, 13, 16, 17, 31, 32, 48, 64]
# Against a float64 evaluation of the kernel's own formula, the error is the output's rounding:
# relative 2^-9 for bf16 (8 significant bits), 2^-12 for fp16.
TOLERANCE = {torch.bfloat16: 4e-3, torch.float16: 1e-3}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def quantized(n: int, k: int, dtype: torch.dtype = torch.bfloat16, scale: float = 1.0):
    """A fresh random [n, k] weight: (PackedNF4, bnb's dense dequantized weight, the NF4 code)."""
    from adapters.formats import nf4
    from server.kernels.nf4_layout import decode_absmax, repack

    packed, state = nf4.quantize(torch.randn(n, k, device="cuda") * scale, dtype)
    return (repack(packed.view(-1), decode_absmax(state), state.code, n, k, dtype), nf4.dequantize(packed, state),
            state.code)


def poisoned(m: int, n: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.full((m, n), float("nan"), device="cuda", dtype=dtype)


@pytest.mark.parametrize("model", SHAPES)
def test_nf4_matmul_matches_float64_reference(model):
    """The kernel's own formula (fp16 block scales on fp32 block sums, nf4_matmul's docstring) in float64,
    and bnb's dequantize-then-matmul within bf16's usual tolerance."""
    from server.kernels.nf4_layout import reference
    from server.kernels.nf4_matmul import nf4_matmul

    for n, k in SHAPES[model]:
        packed, weight, code = quantized(n, k)
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = nf4_matmul(x, packed, out=poisoned(m, n))
            assert not out.isnan().any(), f"{model} {n}x{k} M={m}: unwritten outputs"
            exact = relative_error(out, reference(x, packed, code, torch.bfloat16))
            assert exact < TOLERANCE[torch.bfloat16], f"{model} {n}x{k} M={m}: {exact:.2e} against the formula"
            bnb_error = relative_error(out, x.double() @ weight.double().T)
            assert bnb_error < 1e-2, f"{model} {n}x{k} M={m}: {bnb_error:.2e} against bnb's weight"


def test_nf4_matmul_in_float16_and_with_tiny_scales():
    """--dtype float16 rows, and a weight whose scales would be fp16 subnormals without the power-of-two shift,
    with either decode table."""
    from server.kernels.nf4_layout import reference
    from server.kernels.nf4_matmul import NF4Config, nf4_matmul

    for dtype, scale in ((torch.float16, 1.0), (torch.bfloat16, 1e-6)):
        packed, _, code = quantized(1024, 2048, dtype, scale)
        for m, table in ((1, False), (3, True), (8, False), (40, True)):
            x = torch.randn(m, 2048, device="cuda", dtype=dtype)
            out = nf4_matmul(x, packed, NF4Config(4, 1, 2, 3, 4, table), out=poisoned(m, 1024, dtype))
            assert out.dtype == dtype
            error = relative_error(out, reference(x, packed, code, dtype))
            assert error < TOLERANCE[dtype], f"{dtype} scale {scale} M={m}: {error:.2e}"


def test_nf4_matmul_every_launch_shape_computes_the_same():
    """Launch shapes the benchmark sweeps: no split (direct store), uneven K-ranges, partial chunks,
    two slabs a warp, more than 64 rows (a second grid column), the decode table in shared memory."""
    from server.kernels.nf4_layout import reference
    from server.kernels.nf4_matmul import NF4Config, nf4_matmul

    n, k = 1024 + 32, 4096 + 192
    packed, _, code = quantized(n, k)
    for m, config in [(1, NF4Config(4, 1, 1, 2, 1)), (1, NF4Config(8, 2, 4, 4, 8)), (3, NF4Config(4, 2, 3, 3, 5)),
                      (20, NF4Config(4, 1, 2, 2, 7)), (64, NF4Config(8, 1, 1, 3, 2)), (64, NF4Config(4, 2, 2, 4, 1)),
                      (100, NF4Config(4, 1, 2, 3, 3)), (32, NF4Config(4, 2, 2, 5, 16)), (64, NF4Config(8, 2, 1, 3, 4)),
                      (1, NF4Config(4, 1, 2, 3, 5, True)), (17, NF4Config(8, 2, 1, 3, 1, True)),
                      (64, NF4Config(4, 1, 1, 3, 4, True))]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        out = nf4_matmul(x, packed, config, out=poisoned(m, n))
        error = relative_error(out, reference(x, packed, code, torch.bfloat16))
        assert error < TOLERANCE[torch.bfloat16], f"M={m} {config}: {error:.2e}"


def test_nf4_matmul_split_k_repeats_bit_for_bit_in_a_graph():
    """Calls one after another, and replays of a captured graph, give the same bits: the K-ranges' sums
    are added in a fixed order, whatever order the CTAs ran in."""
    from server.kernels.nf4_matmul import NF4Config, nf4_matmul

    packed, _, _ = quantized(2048, 4096)
    x = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    config = NF4Config(4, 2, 2, 3, 8)
    first = nf4_matmul(x, packed, config)
    for _ in range(3):
        assert torch.equal(nf4_matmul(x, packed, config, out=poisoned(16, 2048)), first)
    out = poisoned(16, 2048)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        nf4_matmul(x, packed, config, out=out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        nf4_matmul(x, packed, config, out=out)
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, first)


def test_nf4_matmul_reads_strided_rows():
    """x as a view with a row stride wider than K (a slice of a larger activation buffer)."""
    from server.kernels.nf4_layout import reference
    from server.kernels.nf4_matmul import nf4_matmul

    packed, _, code = quantized(512, 1024)
    x = torch.randn(9, 1024 + 64, device="cuda", dtype=torch.bfloat16)[:, 64:]
    out = nf4_matmul(x, packed)
    assert relative_error(out, reference(x, packed, code, torch.bfloat16)) < TOLERANCE[torch.bfloat16]


def test_nf4_dequantize_gives_the_kernels_weight():
    """Unit rows pick single columns of the kernel's weight; the dense dequantization equals them exactly
    (scale times code, times a power of two, rounded once in both)."""
    from server.kernels.nf4_matmul import nf4_dequantize, nf4_matmul

    n, k = 4096, 4096
    packed, weight, _ = quantized(n, k)
    dense = nf4_dequantize(packed, torch.bfloat16)
    assert relative_error(dense, weight.double()) < 1e-2
    for start in (0, 1000, k - 64):
        x = torch.zeros(64, k, device="cuda", dtype=torch.bfloat16)
        x[torch.arange(64), start + torch.arange(64)] = 1
        out = nf4_matmul(x, packed)
        assert torch.equal(out, dense[:, start:start + 64].T), f"columns {start}.."


def adapter_stacks(num_slots: int, max_rank: int, n: int, k: int, ranks: list[int]):
    a = torch.randn(num_slots, max_rank, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    b = torch.randn(num_slots, n, max_rank, device="cuda", dtype=torch.bfloat16)
    a[0], b[0] = 0, 0
    return a, b, torch.tensor(ranks, dtype=torch.int32, device="cuda")


def spreads(m: int, num_slots: int, generator: torch.Generator) -> dict[str, list[int]]:
    zipf = 1.0 / torch.arange(1, num_slots, dtype=torch.float64)
    return {
        "all_same": [1] * m,
        "all_distinct": [1 + i % (num_slots - 1) for i in range(m)],
        "zipf": (1 + torch.multinomial(zipf, m, replacement=True, generator=generator)).tolist(),
        "base_rows_mixed": [0 if i % 3 == 0 else 1 + i % (num_slots - 1) for i in range(m)],
    }


def bgmv_reference(y, x, a, b, ranks, slots) -> torch.Tensor:
    want = y.double().clone()
    for i, s in enumerate(slots.tolist()):
        r = int(ranks[s])
        want[i] += (x[i].double() @ a[s, :r].double().T) @ b[s, :, :r].double().T
    return want


@pytest.mark.parametrize("model", SHAPES)
def test_lora_bgmv_matches_float64_loop(model):
    from server.kernels.lora_bgmv import LoraSlice, lora_bgmv

    generator = torch.Generator().manual_seed(0)
    # Slot 0 is the base model; slot 5 holds an adapter that does not target this projection.
    ranks = [0, 4, 8, 16, 64, 0, 8]
    for n, k in SHAPES[model]:
        a, b, rank_of = adapter_stacks(len(ranks), 64, n, k, ranks)
        for m in (1, 3, 8, 17, 32, 64):
            for spread, row_slots in spreads(m, len(ranks), generator).items():
                slots = torch.tensor(row_slots, device="cuda")
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                y = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
                want = bgmv_reference(y, x, a, b, rank_of, slots)
                before = y.clone()
                lora_bgmv(y, x, [LoraSlice(a, b, rank_of)], slots)
                untouched = (rank_of[slots] == 0)
                assert torch.equal(y[untouched], before[untouched]), f"{spread}: rows without LoRA changed"
                assert relative_error(y, want) < 4e-3, f"{model} {n}x{k} M={m} {spread}"


@pytest.mark.parametrize("model", SHAPES)
def test_lora_bgmv_slices_of_a_fused_projection_in_one_launch(model):
    """q|k|v side by side in one output: each slice gets its own adapters' ranks (targets differ per
    adapter: slot 2 leaves k alone, slot 3 touches only v), columns of one slice never spill into another."""
    from server.kernels.lora_bgmv import LoraSlice, lora_bgmv

    (n_q, k), (n_kv, _) = SHAPES[model][0], SHAPES[model][1]
    generator = torch.Generator().manual_seed(5)
    slice_ranks = {"q": [0, 16, 8, 0, 4], "k": [0, 16, 0, 0, 64], "v": [0, 16, 8, 4, 4]}
    widths = {"q": n_q, "k": n_kv, "v": n_kv}
    stacks = {p: adapter_stacks(5, 64, widths[p], k, r) for p, r in slice_ranks.items()}
    for m in (1, 5, 32, 64):
        for spread, row_slots in spreads(m, 5, generator).items():
            slots = torch.tensor(row_slots, device="cuda")
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            y = torch.randn(m, n_q + 2 * n_kv, device="cuda", dtype=torch.bfloat16)
            parts = y.split([n_q, n_kv, n_kv], dim=-1)
            wants = [bgmv_reference(part, x, *stacks[p], slots) for part, p in zip(parts, "qkv")]
            lora_bgmv(y, x, [LoraSlice(*stacks[p]) for p in "qkv"], slots)
            for part, want, p in zip(y.split([n_q, n_kv, n_kv], dim=-1), wants, "qkv"):
                assert relative_error(part, want) < 4e-3, f"{model} M={m} {spread} slice {p}"


def test_lora_bgmv_reads_ranks_and_slots_at_graph_replay():
    """Captured once, replayed after the adapters, their ranks and the rows' slots change in place."""
    from server.kernels.lora_bgmv import LoraSlice, lora_bgmv
    from server.kernels.nf4_layout import reference
    from server.kernels.nf4_matmul import nf4_matmul

    n, k, m = 4096, 4096, 16
    packed, _, code = quantized(n, k)
    a, b, ranks = adapter_stacks(5, 16, n, k, [0, 16, 8, 4, 0])
    lora = [LoraSlice(a, b, ranks)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    slots = torch.zeros(m, dtype=torch.long, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        lora_bgmv(nf4_matmul(x, packed), x, lora, slots)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = lora_bgmv(nf4_matmul(x, packed), x, lora, slots)
    generator = torch.Generator().manual_seed(1)
    for step in range(4):
        x.copy_(torch.randn(m, k, generator=generator))
        slots.copy_(torch.randint(0, 5, (m,), generator=generator))
        ranks.copy_(torch.tensor([0, 16 - 4 * step, 8, 4, 8 * (step % 2)], dtype=torch.int32))
        a[4].normal_()
        y.fill_(float("nan"))
        graph.replay()
        want = bgmv_reference(reference(x, packed, code, torch.bfloat16), x, a, b, ranks, slots)
        assert relative_error(y, want) < 4e-3, f"replay {step}"
