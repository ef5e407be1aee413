"""Our Triton kernels (server/kernels) against float64 references on fresh random inputs.

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


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def quantized(n: int, k: int):
    from adapters.formats import nf4
    from server.kernels.nf4_matmul import decode_absmax

    packed, state = nf4.quantize(torch.randn(n, k, device="cuda"), torch.bfloat16)
    return packed.view(-1), decode_absmax(state), state.code.float().contiguous(), nf4.dequantize(packed, state)


@pytest.mark.parametrize("model", SHAPES)
def test_nf4_matmul_matches_float64_reference(model):
    from server.kernels.nf4_matmul import nf4_matmul

    for n, k in SHAPES[model]:
        packed, absmax, code, weight = quantized(n, k)
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
            nf4_matmul(x, packed, absmax, code, n, out=out)
            want = x.double() @ weight.double().T
            assert not out.isnan().any(), f"{model} {n}x{k} M={m}: unwritten outputs"
            # bf16 output rounding alone gives ~1e-3.
            assert relative_error(out, want) < 4e-3, f"{model} {n}x{k} M={m}: {relative_error(out, want):.2e}"


def test_nf4_matmul_takes_float16_rows_from_one():
    """The default launch at one row is the bf16 GEMV; float16 (--dtype float16) must get the tensor-core one."""
    from adapters.formats import nf4
    from server.kernels.nf4_matmul import decode_absmax, nf4_matmul

    packed, state = nf4.quantize(torch.randn(1024, 2048, device="cuda"), torch.float16)
    weight = nf4.dequantize(packed, state)
    for m in (1, 3, 8):
        x = torch.randn(m, 2048, device="cuda", dtype=torch.float16)
        out = nf4_matmul(x, packed.view(-1), decode_absmax(state), state.code.float().contiguous(), 1024)
        assert out.dtype == torch.float16
        assert relative_error(out, x.double() @ weight.double().T) < 4e-3, f"M={m}"


def test_nf4_matmul_every_launch_shape_computes_the_same():
    """Launch shapes the benchmark sweeps: no split (direct bf16 store), uneven K-ranges, several blocks a step."""
    from server.kernels.nf4_matmul import NF4Config, nf4_matmul

    n, k = 1000, 4096 + 192                                   # N not a multiple of any block, K-ranges uneven
    packed, absmax, code, weight = quantized(n, k)
    for m, config in [(1, NF4Config(32, 1, 1, 1)), (1, NF4Config(128, 1, 8, 4)), (1, NF4Config(64, 1, 3, 2)),
                      (5, NF4Config(64, 16, 1, 1)), (20, NF4Config(128, 32, 8, 2, num_stages=2)),
                      (64, NF4Config(64, 64, 5, 2)), (40, NF4Config(128, 16, 2, 1))]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        nf4_matmul(x, packed, absmax, code, n, config, out=out)
        want = x.double() @ weight.double().T
        assert relative_error(out, want) < 4e-3, f"M={m} {config}: {relative_error(out, want):.2e}"


def test_nf4_matmul_decodes_exactly_what_bitsandbytes_dequantizes():
    """Unit rows pick single columns: out[i, n] = W[n, c + i] with no rounding in between."""
    from server.kernels.nf4_matmul import nf4_matmul

    n, k = 4096, 4096
    packed, absmax, code, weight = quantized(n, k)
    for start in (0, 1000, k - 64):
        x = torch.zeros(64, k, device="cuda", dtype=torch.bfloat16)
        x[torch.arange(64), start + torch.arange(64)] = 1
        for m in (1, 8, 64):
            out = nf4_matmul(x[:m], packed, absmax, code, n)
            assert torch.equal(out, weight[:, start:start + m].T), f"columns {start}.. M={m}"


def test_nf4_matmul_agrees_with_bitsandbytes_matmul():
    import bitsandbytes as bnb

    from adapters.formats import nf4
    from server.kernels.nf4_matmul import decode_absmax, nf4_matmul

    packed, state = nf4.quantize(torch.randn(11008, 4096, device="cuda"), torch.bfloat16)
    for m in (1, 16, 64):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        ours = nf4_matmul(x, packed.view(-1), decode_absmax(state), state.code.float(), 11008)
        theirs = bnb.matmul_4bit(x, packed.t(), quant_state=state)
        # bitsandbytes' one-row GEMV accumulates less precisely than a GEMM (4.03e-3 seen once at M = 1)
        assert relative_error(ours, theirs.double()) < (8e-3 if m == 1 else 4e-3), f"M={m}"


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
    from server.kernels.nf4_matmul import nf4_matmul

    n, k, m = 4096, 4096, 16
    packed, absmax, code, weight = quantized(n, k)
    a, b, ranks = adapter_stacks(5, 16, n, k, [0, 16, 8, 4, 0])
    lora = [LoraSlice(a, b, ranks)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    slots = torch.zeros(m, dtype=torch.long, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        lora_bgmv(nf4_matmul(x, packed, absmax, code, n), x, lora, slots)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = lora_bgmv(nf4_matmul(x, packed, absmax, code, n), x, lora, slots)
    generator = torch.Generator().manual_seed(1)
    for step in range(4):
        x.copy_(torch.randn(m, k, generator=generator))
        slots.copy_(torch.randint(0, 5, (m,), generator=generator))
        ranks.copy_(torch.tensor([0, 16 - 4 * step, 8, 4, 8 * (step % 2)], dtype=torch.int32))
        a[4].normal_()
        y.fill_(float("nan"))
        graph.replay()
        base = x.double() @ weight.double().T
        want = bgmv_reference(base, x, a, b, ranks, slots)
        assert relative_error(y, want) < 4e-3, f"replay {step}"
