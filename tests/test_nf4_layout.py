"""The NF4 kernel's weight layout (server/kernels/nf4_layout.py), checked on the CPU: the repack keeps
bnb's codes bit for bit, the scales within fp16's rounding, and the `prmt` register-table decode that
nf4_matmul.cu runs gives exactly dtype(code) for every byte. The kernel itself runs on a GPU
(tests/test_kernels_gpu.py)."""
from __future__ import annotations

import random

import pytest
import torch

from adapters.formats import nf4
from server.kernels.nf4_layout import codes_of, decode_absmax, reference, repack, table_words, unpack_codes, unpack_scales


def quantized(n: int, k: int, scale: float = 1.0, seed: int = 0):
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * scale
    packed, state = nf4.quantize(weight)
    return packed.view(-1), state


@pytest.mark.parametrize("n, k", [(16, 64), (48, 192), (960, 576)])
def test_repack_keeps_every_code_and_scale(n, k):
    packed, state = quantized(n, k)
    absmax = decode_absmax(state)
    layout = repack(packed, absmax, state.code, n, k, torch.bfloat16)
    assert torch.equal(unpack_codes(layout), codes_of(packed, n, k))
    scales = unpack_scales(layout)
    assert ((scales - absmax.reshape(n, -1)).abs() <= absmax.reshape(n, -1) * 2 ** -11).all()


def test_each_lane_word_holds_its_mma_fragment():
    """Lane 4g + t, k16 tile j: bytes (W[g, 2t..], W[g+8, 2t..], W[g, 2t+8..], W[g+8, 2t+8..]), high nibble first."""
    n, k = 32, 128
    packed, state = quantized(n, k)
    codes = codes_of(packed, n, k)
    words = repack(packed, decode_absmax(state), state.code, n, k, torch.bfloat16).words.view(torch.uint8)
    words = words.reshape(n // 16, k // 64, 32, 4, 4)
    for slab, block, g, t, j in [(0, 0, 0, 0, 0), (1, 1, 7, 3, 3), (1, 0, 3, 2, 1)]:
        row, col = 16 * slab + g, 64 * block + 16 * j + 2 * t
        want = [(codes[r, c] << 4) | codes[r, c + 1] for r, c in ((row, col), (row + 8, col), (row, col + 8),
                                                                   (row + 8, col + 8))]
        assert words[slab, block, 4 * g + t, j].tolist() == [int(v) for v in want]


def prmt(a: int, b: int, selector: int) -> int:
    """PTX prmt.b32 (default mode): byte i of the result is byte selector[i] of the pair (b:a)."""
    pool = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        pick = (selector >> (4 * i)) & 0xF
        byte = pool[pick & 7]
        if pick & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def decode8(q: int, table: tuple[int, ...]) -> list[int]:
    """nf4_matmul.cu's decode8, instruction for instruction."""
    low, high = table[:4], table[4:]
    m = q & 0x77777777
    s = ((q >> 1) & 0x44444444) | 0x32103210
    out = []
    for _ in range(2):
        lo = prmt(prmt(low[0], low[1], m), prmt(low[2], low[3], m), s)
        hi = prmt(prmt(high[0], high[1], m), prmt(high[2], high[3], m), s)
        out += [prmt(lo, hi, 0x4051), prmt(lo, hi, 0x6273)]
        m, s = m >> 16, s >> 16
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_register_table_decodes_every_code_exactly(dtype):
    _, state = quantized(16, 64)
    table = table_words(state.code, dtype)
    bits = [int(v) & 0xFFFF for v in state.code.float().to(dtype).view(torch.int16)]
    rng = random.Random(0)
    words = [rng.getrandbits(32) for _ in range(3000)] + [int(f"{i:x}" * 8, 16) for i in range(16)]
    for q in words:
        pairs = decode8(q, table)
        for byte in range(4):
            value = (q >> (8 * byte)) & 0xFF
            assert pairs[byte] == bits[value >> 4] | (bits[value & 15] << 16), (hex(q), byte)


def test_reference_is_bnb_within_bf16_rounding_and_tiny_scales_stay_exact():
    for scale in (1.0, 1e-6):
        packed, state = quantized(64, 256, scale, seed=1)
        layout = repack(packed, decode_absmax(state), state.code, 64, 256, torch.bfloat16)
        x = torch.randn(5, 256).to(torch.bfloat16)
        bnb = x.double() @ nf4.dequantize(packed.view(-1, 1), state).double().T
        ours = reference(x, layout, state.code, torch.bfloat16)
        assert ((ours - bnb).norm() / bnb.norm()).item() < 1e-2, scale
        assert (unpack_scales(layout) > 0).all(), "a scale was flushed to zero"
