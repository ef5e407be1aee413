"""bitsandbytes' NF4 tensors re-laid for the tensor-core kernel (nf4_matmul.cu), with the same codes.

Repacking happens once, at load. It changes where each 4-bit code sits, never its value, so
`unpack_codes(repack(...))` gives back bnb's bytes bit for bit; the bnb tensors stay the export
format. The layout puts each lane's 16-byte load straight into the registers its `mma.m16n8k16`
A fragment needs (Marlin's weight shuffle, with weight rows as the MMA's M: "swap AB"):

    words   [N/16, K/64, 32, 4] uint32: slab s (rows 16s..16s+15), 64-block b, lane l = 4g + t, k16 tile j.
            Byte 0 of word j holds W[16s+g,   64b+16j+2t, +1]    (high nibble the even column, as bnb)
            byte 1                 W[16s+g+8, 64b+16j+2t, +1]
            byte 2                 W[16s+g,   64b+16j+2t+8, +9]
            byte 3                 W[16s+g+8, 64b+16j+2t+8, +9]
            so one decoded word is the fragment (a0, a1, a2, a3) and a warp reads 512 contiguous bytes.
    scales  [N/16, K/64, 8] uint32: the fp16 pair (absmax[16s+g, b], absmax[16s+g+8, b]) * 2^shift,
            low half row g. fp16 keeps 11 significant bits of bnb's fp32 scale (an error under 2^-12,
            well inside the bf16 rounding of every weight); the power-of-two shift (exact) keeps the
            tensor's largest scale near 2^14 so small scales stay normal, and the kernel multiplies
            the sums by 2^-shift.
    table   8 uint32: the low bytes, then the high bytes, of dtype(code[0..15]), four entries a word,
            for the `prmt` decode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BLOCK = 64    # bitsandbytes' NF4 blocksize (adapters.formats.nf4.BLOCK_SIZE)
SLAB = 16     # weight rows per MMA tile


@dataclass(frozen=True)
class PackedNF4:
    """One NF4 weight (or several stacked along N) in the kernel's layout; see the module docstring."""
    words: torch.Tensor      # [N/16 * K/64 * 128] int32
    scales: torch.Tensor     # [N/16 * K/64 * 8] int32
    table: tuple[int, ...]   # 8 words
    shift: int               # scales were multiplied by 2^shift
    n: int
    k: int


def decode_absmax(state) -> torch.Tensor:
    """bnb QuantState -> float32 absmax [N*K/64], exactly as bnb's dequantize_4bit computes it."""
    import bitsandbytes.functional as bnbf

    if not state.nested:
        return state.absmax.float().contiguous()
    absmax = bnbf.dequantize_blockwise(state.absmax, state.state2)
    return (absmax + state.offset).float().contiguous()


def fits(n: int, k: int) -> bool:
    """Whether an [n, k] weight has the shape the layout needs."""
    return n % SLAB == 0 and k % BLOCK == 0


def codes_of(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """bnb's packed bytes [n*k/2] -> the 4-bit codes [n, k] (uint8), high nibble the even column."""
    pairs = packed.reshape(n, k // 2)
    return torch.stack([pairs >> 4, pairs & 15], dim=-1).reshape(n, k)


def repack(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, k: int,
           dtype: torch.dtype) -> PackedNF4:
    """bnb packed bytes [n*k/2] uint8, decoded fp32 absmax [n*k/64] and its code [16] -> PackedNF4."""
    if not fits(n, k):
        raise ValueError(f"an NF4 weight of {n}x{k} is not a multiple of {SLAB}x{BLOCK}")
    codes = codes_of(packed.reshape(-1), n, k)
    # [s, h, g, b, j, ch, t, e]: row 16s + 8h + g, column 64b + 16j + 8ch + 2t + e
    c = codes.reshape(n // SLAB, 2, 8, k // BLOCK, 4, 2, 4, 2)
    bytes_ = (c[..., 0] << 4) | c[..., 1]                                     # [s, h, g, b, j, ch, t]
    words = bytes_.permute(0, 3, 2, 6, 4, 5, 1).contiguous()                  # [s, b, g, t, j, ch, h]
    scale = absmax.reshape(n // SLAB, 2, 8, k // BLOCK).float()
    top = float(scale.abs().max())
    shift = 14 - math.frexp(top)[1] if top > 0 else 0                   # largest scale lands in [2^13, 2^14)
    halves = (scale * 2.0 ** shift).to(torch.float16).permute(0, 3, 2, 1).contiguous()   # [s, b, g, h]
    return PackedNF4(words=words.reshape(-1).view(torch.int32),
                     scales=halves.reshape(-1).view(torch.int32),
                     table=table_words(code, dtype), shift=shift, n=n, k=k)


def table_words(code: torch.Tensor, dtype: torch.dtype) -> tuple[int, ...]:
    """The 16 NF4 values in `dtype`, split into a low-byte plane and a high-byte plane of 4 words each."""
    bits = code.float().cpu().to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    planes = [(bits & 0xFF), (bits >> 8)]
    return tuple(int(sum(int(plane[4 * w + i]) << (8 * i) for i in range(4))) for plane in planes for w in range(4))


def unpack_codes(packed: PackedNF4) -> torch.Tensor:
    """The inverse of repack's code shuffle: the [n, k] codes bnb's bytes hold."""
    n, k = packed.n, packed.k
    words = packed.words.view(torch.uint8).reshape(n // SLAB, k // BLOCK, 8, 4, 4, 2, 2)   # [s, b, g, t, j, ch, h]
    bytes_ = words.permute(0, 6, 2, 1, 4, 5, 3)                                          # [s, h, g, b, j, ch, t]
    return torch.stack([bytes_ >> 4, bytes_ & 15], dim=-1).reshape(n, k)


def unpack_scales(packed: PackedNF4) -> torch.Tensor:
    """The fp32 block scales [n, k/64] the kernel applies (fp16-rounded absmax)."""
    n, k = packed.n, packed.k
    halves = packed.scales.view(torch.float16).reshape(n // SLAB, k // BLOCK, 8, 2).permute(0, 3, 2, 1)
    return halves.float().reshape(n, k // BLOCK) * 2.0 ** -packed.shift


def reference(x: torch.Tensor, packed: PackedNF4, code: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 out [M, n] of the kernel's semantics: sum_b scale[n, b] * sum_k dtype(code[q]) * x."""
    values = code.float().to(dtype).double().to(x.device)[unpack_codes(packed).long()]   # [n, k]
    blocks = values.reshape(packed.n, packed.k // BLOCK, BLOCK)
    xs = x.double().reshape(x.shape[0], packed.k // BLOCK, BLOCK)
    partial = torch.einsum("nbk,mbk->mnb", blocks, xs)
    return (partial * unpack_scales(packed).double()[None]).sum(-1)
