// The NF4 decode shared by nf4_matmul.cu's kernels: 4-bit codes to dtype pairs, scales, roundings.
// Compiled in front of nf4_matmul.cu (F16 defined: 1 fp16, 0 bf16).

typedef unsigned int u32;
typedef unsigned short u16;

// a[i] = dtype pair (code[high nibble of byte i], code[low nibble of byte i]) of the word q, from a
// table held in 8 registers (nf4_layout's `table`), low half first: 8 codes in 21 instructions.
__device__ __forceinline__ void decode8(u32 q, const u32 (&t)[8], u32 (&a)[4]) {
  asm("{.reg .b32 m,s,u,v,lo,hi;\n"
      " and.b32 m,%4,0x77777777; shr.b32 s,%4,1; and.b32 s,s,0x44444444; or.b32 s,s,0x32103210;\n"
      " prmt.b32 u,%5,%6,m; prmt.b32 v,%7,%8,m; prmt.b32 lo,u,v,s;\n"
      " prmt.b32 u,%9,%10,m; prmt.b32 v,%11,%12,m; prmt.b32 hi,u,v,s;\n"
      " prmt.b32 %0,lo,hi,0x4051; prmt.b32 %1,lo,hi,0x6273;\n"
      " shr.b32 m,m,16; shr.b32 s,s,16;\n"
      " prmt.b32 u,%5,%6,m; prmt.b32 v,%7,%8,m; prmt.b32 lo,u,v,s;\n"
      " prmt.b32 u,%9,%10,m; prmt.b32 v,%11,%12,m; prmt.b32 hi,u,v,s;\n"
      " prmt.b32 %2,lo,hi,0x4051; prmt.b32 %3,lo,hi,0x6273;}\n"
      : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
      : "r"(q), "r"(t[0]), "r"(t[1]), "r"(t[2]), "r"(t[3]), "r"(t[4]), "r"(t[5]), "r"(t[6]), "r"(t[7]));
}

// The same pairs from a shared-memory table of all 256 bytes (TABLE 1): entry B = the pair of byte B,
// 32 copies side by side so that lane l always reads bank l (no conflicts). 3 instructions a pair
// (byte extract, address, load) against the registers' 21 for 4 pairs.
__device__ __forceinline__ void decode8(u32 q, u32 table_lane, u32 (&a)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const u32 byte = __byte_perm(q, 0, 0x4440 + i);
    asm("ld.shared.u32 %0, [%1];" : "=r"(a[i]) : "r"(table_lane + byte * 128));
  }
}

__device__ __forceinline__ void scale_pair(u32 h2, float& lo, float& hi) {
  asm("{.reg .b16 l,h; mov.b32 {l,h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h;}" : "=f"(lo), "=f"(hi) : "r"(h2));
}

__device__ __forceinline__ u16 to_dtype(float v) {
  u16 r;
#if F16
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(v));
#else
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(v));
#endif
  return r;
}

__device__ __forceinline__ float from_dtype(u32 h) {
#if F16
  float r;
  asm("{.reg .b16 l; cvt.u16.u32 l, %1; cvt.f32.f16 %0, l;}" : "=f"(r) : "r"(h));
  return r;
#else
  return __int_as_float(h << 16);
#endif
}
