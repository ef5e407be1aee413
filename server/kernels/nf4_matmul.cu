// NF4 x bf16/fp16 matmul for decode-sized batches on the tensor cores (sm_80+), compiled at run time
// by NVRTC after nf4_decode.cu (nf4_matmul.py prepends the #defines). No headers: inline PTX.
//
//   out[m, n] = 2^-shift * sum_b scale[n, b] * sum_{k in block b} dtype(code[q(n, k)]) * x[m, k]
//
// with the weight in nf4_layout.py's order. Each warp owns SLABS slabs of 16 weight rows and walks
// the CTA's K-range one 64-block at a time: one 16-byte load per lane per (slab, block) lands the
// codes of its four A fragments; a table decodes them (nf4_decode.cu: shared memory or registers); four
// mma.m16n8k16 per 8 batch rows multiply them with x, each x fragment (ldmatrix) serving every slab
// of the warp; the block scale is applied to each block's fp32 partial product. x (shared by the
// CTA) and each lane's own weight words and scales stream through a STAGES-deep cp.async ring in
// shared memory, G blocks a stage. With split-K (gridDim.y > 1) each K-range writes fp32 partial
// sums that nf4_sum_splits adds in a fixed order, so the result does not depend on scheduling.
//
// Defines: MT (8-row batch tiles, 1..8), SLABS, WARPS, G, STAGES, TABLE (0: registers, 1: shared memory),
// F16 (1: fp16, 0: bf16), PARTIAL.

#define XROW (64 * G + 8)   // x row stride in shared memory, in elements (16 bytes of padding: no bank conflicts)
#define HALVES (MT <= 2 ? 2 : 1)   // sets of partial sums a block (compute_stage)

__device__ __forceinline__ void mma(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if F16
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
#else
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
#endif
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
  u32 r;
  asm("{.reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a;}" : "=r"(r) : "l"(p));
  return r;
}

// One stage of the ring: x[8*MT rows, 64*G columns], shared by the CTA, then each lane's own weight
// words (16 bytes) and scale pairs (4 bytes) for G blocks of its warp's slabs. A lane reads back
// only the weights it copied itself, so only x needs the CTA barrier. Addresses are set up once:
// the loop only adds a chunk's stride (address arithmetic was a third of the instructions).
#define X_STAGE (8 * MT * XROW * 2)
#define W_WARP (32 * G * SLABS * 20)
#define STAGE_BYTES (X_STAGE + WARPS * W_WARP)
#define X_PIECES (8 * MT * 8 * G)                          // 16-byte pieces of x a stage: 8 per row per block
#define X_ROUNDS ((X_PIECES + WARPS * 32 - 1) / (WARPS * 32))

// Copies of 16 and 4 bytes; a dead one (src-size 0) writes zeros.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool live) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(live ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(u32 dst, const void* src, bool live) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" :: "r"(dst), "l"(src), "r"(live ? 4 : 0));
}

struct Sources {                                   // this thread's global addresses at the next chunk
  const u16* x[X_ROUNDS];
  int x_block[X_ROUNDS];                         // which block of the chunk the piece is in
  u32 x_dst[X_ROUNDS];                           // its offset in a stage
  bool x_row[X_ROUNDS];                          // its row is a real one (< M)
  const u32* w[SLABS];
  const u32* s[SLABS];
};

// Blocks b .. b + G of the CTA's range into the stage at `stage`; x rows past M and blocks past
// the range as zeros. Advances the sources by one chunk.
__device__ __forceinline__ void copy_stage(u32 stage, Sources& src, const u16* __restrict__ x, u32 mine, u32 mine_s,
                                           bool live, int b, int b_end) {
#pragma unroll
  for (int r = 0; r < X_ROUNDS; ++r) {
    if (X_PIECES % (WARPS * 32) == 0 || threadIdx.x + r * WARPS * 32 < X_PIECES) {
      const bool ok = src.x_row[r] && b + src.x_block[r] < b_end;
      cp_async16(stage + src.x_dst[r], ok ? src.x[r] : x, ok);
      src.x[r] += 64 * G;
    }
  }
#pragma unroll
  for (int gi = 0; gi < G; ++gi) {
    const bool ok = live && b + gi < b_end;
#pragma unroll
    for (int sl = 0; sl < SLABS; ++sl) {
      const int at = gi * SLABS + sl;
      cp_async16(stage + mine + at * 512, src.w[sl] + gi * 128, ok);
      cp_async4(stage + mine_s + at * 128, src.s[sl] + gi * 8, ok);
    }
  }
#pragma unroll
  for (int sl = 0; sl < SLABS; ++sl) src.w[sl] += G * 128, src.s[sl] += G * 8;
}

template <typename Table>
__device__ __forceinline__ void compute_stage(u32 stage, u32 mine, u32 mine_s, u32 x_frag, float (&acc)[SLABS][MT][4],
                                              const Table& t, int b, int b_end) {
#pragma unroll
  for (int gi = 0; gi < G; ++gi) {
    if (b + gi >= b_end) break;
    u32 a[SLABS][4][4], sc[SLABS];                // each slab's A fragments of the block's four k16 tiles
#pragma unroll
    for (int sl = 0; sl < SLABS; ++sl) {
      const int at = gi * SLABS + sl;
      u32 w[4];
      asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
                   : "r"(stage + mine + at * 512));
      asm volatile("ld.shared.u32 %0, [%1];" : "=r"(sc[sl]) : "r"(stage + mine_s + at * 128));
#pragma unroll
      for (int j = 0; j < 4; ++j) decode8(w[j], t, a[sl][j]);
    }
    // Up to two 8-row tiles: two independent sums (k 0..31 and 32..63 of the block) halve the chain of
    // dependent MMAs. More tiles are chains enough of their own, and a second set of sums only costs
    // registers and adds (the H100 sweep: 8-10 % faster at 4 tiles without it, 3 % slower at 2).
    float part[SLABS][HALVES][MT][4];
#pragma unroll
    for (int sl = 0; sl < SLABS; ++sl)
#pragma unroll
      for (int h = 0; h < HALVES; ++h)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int e = 0; e < 4; ++e) part[sl][h][mt][e] = 0.f;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        // four 8x8 tiles of x: rows 8mt.., columns 32half + 0, 8, 16, 24 -> b0, b1 of two k16 steps
        u32 b0, b1, b2, b3;
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3)
                     : "r"(stage + x_frag + (mt * 8 * XROW + gi * 64 + half * 32) * 2));
#pragma unroll
        for (int sl = 0; sl < SLABS; ++sl) {
          const u32 (&f0)[4] = a[sl][2 * half];
          const u32 (&f1)[4] = a[sl][2 * half + 1];
          mma(part[sl][half % HALVES][mt], f0[0], f0[1], f0[2], f0[3], b0, b1);
          mma(part[sl][half % HALVES][mt], f1[0], f1[1], f1[2], f1[3], b2, b3);
        }
      }
    }
#pragma unroll
    for (int sl = 0; sl < SLABS; ++sl) {
      float lo, hi;                               // scales of rows g and g + 8
      scale_pair(sc[sl], lo, hi);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const float (&p0)[4] = part[sl][0][mt];
        const float (&p1)[4] = part[sl][HALVES - 1][mt];
        const bool two = HALVES == 2;
        acc[sl][mt][0] = fmaf(lo, two ? p0[0] + p1[0] : p0[0], acc[sl][mt][0]);
        acc[sl][mt][1] = fmaf(lo, two ? p0[1] + p1[1] : p0[1], acc[sl][mt][1]);
        acc[sl][mt][2] = fmaf(hi, two ? p0[2] + p1[2] : p0[2], acc[sl][mt][2]);
        acc[sl][mt][3] = fmaf(hi, two ? p0[3] + p1[3] : p0[3], acc[sl][mt][3]);
      }
    }
  }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
nf4_matmul(const u32* __restrict__ words, const u32* __restrict__ scales, const u16* __restrict__ x, void* out,
           int M, int N, int K, int ldx, int blocks_per_split, int shift,
           u32 t0, u32 t1, u32 t2, u32 t3, u32 t4, u32 t5, u32 t6, u32 t7) {
  extern __shared__ __align__(16) unsigned char ring[];
  const u32 regs[8] = {t0, t1, t2, t3, t4, t5, t6, t7};
  const int KB = K / 64;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int slab = (blockIdx.x * WARPS + warp) * SLABS;
  const bool live = slab < N / 16;               // SLABS divides N/16 (checked by the caller)
  const int b_begin = blockIdx.y * blocks_per_split;
  const int b_end = min(KB, b_begin + blocks_per_split);
  const int m0 = blockIdx.z * 64;
  const int chunks = (b_end - b_begin + G - 1) / G;

  Sources src;
#pragma unroll
  for (int r = 0; r < X_ROUNDS; ++r) {
    const int i = threadIdx.x + r * WARPS * 32, row = i / (8 * G), piece = i % (8 * G);
    src.x_row[r] = m0 + row < M;
    src.x[r] = x + (long)(m0 + row) * ldx + (long)b_begin * 64 + piece * 8;
    src.x_block[r] = piece / 8;
    src.x_dst[r] = (row * XROW + piece * 8) * 2;
  }
#pragma unroll
  for (int sl = 0; sl < SLABS; ++sl) {
    const long blk = live ? (long)(slab + sl) * KB + b_begin : 0;
    src.w[sl] = words + (blk * 32 + lane) * 4;
    src.s[sl] = scales + blk * 8 + (lane >> 2);
  }
  const u32 ring0 = smem_addr(ring);
  const u32 mine = X_STAGE + warp * W_WARP + lane * 16;                      // this lane's words in a stage
  const u32 mine_s = X_STAGE + warp * W_WARP + G * SLABS * 512 + lane * 4;   // and its scale pairs
  const u32 x_frag = ((lane & 7) * XROW + (lane >> 3) * 8) * 2;   // this lane's ldmatrix row address in a stage

#if TABLE
  const u32 table = ring0 + STAGES * STAGE_BYTES;   // made visible by the main loop's first barrier
  for (int e = threadIdx.x; e < 256; e += WARPS * 32) {
    u32 pair[4];
    decode8(e * 0x01010101u, regs, pair);
#pragma unroll
    for (int c = 0; c < 32; c += 4)
      asm volatile("st.shared.v4.u32 [%0], {%1,%1,%1,%1};" :: "r"(table + (e * 32 + c) * 4), "r"(pair[0]));
  }
  const u32 t = table + lane * 4;
#else
  const u32 (&t)[8] = regs;
#endif
  for (int c = 0; c < STAGES - 1; ++c) {         // STAGES - 1 stages in flight ahead of the math
    copy_stage(ring0 + c * STAGE_BYTES, src, x, mine, mine_s, live, b_begin + c * G, b_end);
    asm volatile("cp.async.commit_group;");
  }
  float acc[SLABS][MT][4];
#pragma unroll
  for (int sl = 0; sl < SLABS; ++sl)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[sl][mt][e] = 0.f;

  int read_slot = 0, write_slot = STAGES - 1;
  for (int c = 0; c < chunks; ++c) {
    // stage c has landed for every thread, and every warp is done with stage c - 1, whose slot the
    // copy of stage c + STAGES - 1 then takes
    asm volatile("cp.async.wait_group %0;" :: "n"(STAGES - 2));
    __syncthreads();
    copy_stage(ring0 + write_slot * STAGE_BYTES, src, x, mine, mine_s, live, b_begin + (c + STAGES - 1) * G, b_end);
    asm volatile("cp.async.commit_group;");
    if (live) compute_stage(ring0 + read_slot * STAGE_BYTES, mine, mine_s, x_frag, acc, t, b_begin + c * G, b_end);
    read_slot = read_slot == STAGES - 1 ? 0 : read_slot + 1;
    write_slot = write_slot == STAGES - 1 ? 0 : write_slot + 1;
  }
  asm volatile("cp.async.wait_group 0;");
  if (!live) return;

  const float unscale = __int_as_float((127 - shift) << 23);   // 2^-shift, exact
  const int g = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int sl = 0; sl < SLABS; ++sl) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int n = (slab + sl) * 16 + g + (e >> 1) * 8;
        const int m = m0 + mt * 8 + tq * 2 + (e & 1);
        if (m < M) {
#if PARTIAL
          ((float*)out)[((long)blockIdx.y * M + m) * N + n] = acc[sl][mt][e];
#else
          ((u16*)out)[(long)m * N + n] = to_dtype(acc[sl][mt][e] * unscale);
#endif
        }
      }
    }
  }
}

// out[i] = dtype(2^-shift * sum_s partial[s, i]), s in order
extern "C" __global__ void nf4_sum_splits(const float* __restrict__ partial, u16* __restrict__ out, int total,
                                          int splits, int shift) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= total) return;
  float acc = 0.f;
  for (int s = 0; s < splits; ++s) acc += partial[(long)s * total + i];
  out[i] = to_dtype(acc * __int_as_float((127 - shift) << 23));
}

// The dense weight the kernel multiplies by, for batches past the kernel's rows (prefill):
//   W[n, k] = dtype(2^-shift * scale[n, k/64] * dtype(code[q(n, k)])),  W [N, K] row-major.
// One thread per word (8 codes).
extern "C" __global__ void nf4_dequantize(const u32* __restrict__ words, const u32* __restrict__ scales,
                                          u16* __restrict__ w, int N, int K, int shift,
                                          u32 t0, u32 t1, u32 t2, u32 t3, u32 t4, u32 t5, u32 t6, u32 t7) {
  const long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (long)N * K / 8) return;
  const u32 t[8] = {t0, t1, t2, t3, t4, t5, t6, t7};
  const int KB = K / 64, j = idx & 3, lane = (idx >> 2) & 31;
  const long blk = idx >> 7;
  const int slab = blk / KB, b = blk % KB, g = lane >> 2, tq = lane & 3;
  u32 a[4];
  decode8(words[idx], t, a);
  float lo, hi;
  scale_pair(scales[blk * 8 + g], lo, hi);
  const float unscale = __int_as_float((127 - shift) << 23);
#pragma unroll
  for (int i = 0; i < 4; ++i) {               // byte i: rows g / g + 8, columns 2t / 2t + 8 (+1)
    const long row = slab * 16 + g + (i & 1) * 8;
    const long col = (long)b * 64 + j * 16 + tq * 2 + (i >> 1) * 8;
    const float s = ((i & 1) ? hi : lo) * unscale;
    const u32 pair = to_dtype(from_dtype(a[i] & 0xFFFF) * s) | ((u32)to_dtype(from_dtype(a[i] >> 16) * s) << 16);
    *(u32*)(w + row * K + col) = pair;
  }
}
