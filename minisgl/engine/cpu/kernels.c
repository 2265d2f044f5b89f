/* Fused CPU kernels for the `torch` backend's forward (loaded by cpu_kernels.py, used by cpu_forward.py).

A decode step of a small model on a CPU is a few big matmuls and hundreds of tiny ops: at batch 4 each
RMSNorm is ~8 torch kernels on a [4, 576] tensor and the attention gathers every key and value into a
padded batch before SDPA reads them again. These kernels do each of those jobs in one pass (the first
two on every row of a step, decode_attention on its decode rows):

  add_rmsnorm   residual += delta; out = bf16(rmsnorm(residual) * w)
  silu_mul      out = bf16(silu(gate) * up), from the fused gate|up matmul output
  decode_attention
                per sequence: q/k/v out of the qkv matmul output, optional per-head q/k RMSNorm (Qwen3),
                RoPE, the new k/v written into the paged pool, then attention over the sequence's slots
                read in place through its row of the page table (no gather, no padding)

Each of them comes twice: with bfloat16 activations between the matmuls (the `amx` path, whose
oneDNN matmuls take and give bfloat16; computed in float32 and rounded once, to nearest even, as
torch's .to(torch.bfloat16)) and with float32 ones (suffix _f32: the `avx512` / `avx2` paths, whose
matmuls are the weight-streaming kernels at the end of this file). The residual stream and the KV
pool are float32 in both.

  gemm_q4_1, gemm_q8_0, gemm_bf16, gemm_f32
                y[B, N] = x[B, K] @ W[N, K]^T (+ bias) for float32 x and y and a weight stored as GGUF
                Q4_1 / Q8_0 blocks, bfloat16 or float32, widened to float32 in registers (see below)
  gemm_dot_q4_1p, gemm_dot_q8_0p, gemm_dot_bf16p
                the same products with x rounded to bfloat16, on AVX512-BF16 (vdpbf16ps), for weights
                repacked by pack_panels (the weights themselves exact)
  decode_layers every layer of a decode-only step in one call (float32 activations)

The file is compiled once per ISA (-mavx512f... or -mavx2 -mfma, see cpu_kernels.py): the vector
code below is written with GCC vector extensions whose width follows the ISA it is built for. Loops over sequences and heads run on OpenMP threads when the library is
built against the OpenMP runtime torch itself uses (one thread pool for both; see cpu_kernels.py).
*/
#include <math.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u); /* round to nearest, ties to even */
    return (uint16_t)(u >> 16);
}

/* An activation element: bfloat16 (bf = 1) or float32 (bf = 0); `bf` is a constant at every call
   site, so each exported kernel is specialized for one of them. */
static inline __attribute__((always_inline)) float ld_act(const void *p, int64_t i, int bf) {
    return bf ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static inline __attribute__((always_inline)) void st_act(void *p, int64_t i, float v, int bf) {
    if (bf)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* e^x to ~2e-7 relative (Cephes' exp2f polynomial): unlike libm's expf it vectorizes at any width. */
static inline float exp_fast(float x) {
    x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
    const float t = x * 1.44269504088896341f; /* e^x = 2^t = 2^n * 2^f, |f| <= 0.5 */
    const float n = floorf(t + 0.5f), f = t - n;
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* 1 / sqrt(mean(x^2) + eps): RMSNorm's scale for one row */
static inline float rms_scale(const float *x, int64_t n, float eps) {
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    return 1.f / sqrtf(ss / (float)n + eps);
}

__attribute__((noinline)) static void rmsnorm_inplace(float *x, const float *w, int64_t n, float eps) {
    const float inv = rms_scale(x, n, eps);
#pragma omp simd
    for (int64_t i = 0; i < n; i++) x[i] = x[i] * inv * w[i];
}

/* The *_impl bodies take `bf` and hold only orphaned `omp for` loops; each exported kernel opens the
   parallel region itself and calls its body with a constant `bf`. (gcc outlines a parallel region
   before it inlines: a region inside the body would be compiled once, with `bf` a runtime value.) */

/* residual [T, D] float32 (updated in place); delta [T, D] or NULL; w [D]; out [T, D]; delta and out
   bfloat16 (add_rmsnorm) or float32 (add_rmsnorm_f32) */
/* One row of add_rmsnorm / silu_mul. Not inlined (one copy per activation type): -fassociative-math
   lets gcc regroup the arithmetic differently in each place it is inlined into, and decode_layers
   must agree to the bit with the kernel-per-op loop. */
__attribute__((noinline)) static void add_rmsnorm_row(float *r, const void *delta, const float *w, void *out,
                                                     int64_t t, int64_t D, float eps, int bf) {
    if (delta) {
#pragma omp simd
        for (int64_t i = 0; i < D; i++) r[i] += ld_act(delta, t * D + i, bf);
    }
    const float inv = rms_scale(r, D, eps);
#pragma omp simd
    for (int64_t i = 0; i < D; i++) st_act(out, t * D + i, r[i] * inv * w[i], bf);
}
__attribute__((noinline)) static void add_rmsnorm_row_bf16(float *r, const void *delta, const float *w, void *out,
                                                          int64_t t, int64_t D, float eps) {
    add_rmsnorm_row(r, delta, w, out, t, D, eps, 1);
}
__attribute__((noinline)) static void add_rmsnorm_row_f32(float *r, const void *delta, const float *w, void *out,
                                                         int64_t t, int64_t D, float eps) {
    add_rmsnorm_row(r, delta, w, out, t, D, eps, 0);
}

static inline __attribute__((always_inline)) void add_rmsnorm_impl(float *residual, const void *delta,
                                                                   const float *w, void *out, int64_t T,
                                                                   int64_t D, float eps, int bf) {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        if (bf)
            add_rmsnorm_row_bf16(residual + t * D, delta, w, out, t, D, eps);
        else
            add_rmsnorm_row_f32(residual + t * D, delta, w, out, t, D, eps);
    }
}

void add_rmsnorm(float *residual, const uint16_t *delta, const float *w, uint16_t *out, int64_t T, int64_t D,
                 float eps) {
#pragma omp parallel if (T * D >= 16384)
    add_rmsnorm_impl(residual, delta, w, out, T, D, eps, 1);
}

void add_rmsnorm_f32(float *residual, const float *delta, const float *w, float *out, int64_t T, int64_t D,
                     float eps) {
#pragma omp parallel if (T * D >= 16384)
    add_rmsnorm_impl(residual, delta, w, out, T, D, eps, 0);
}

/* gate_up [T, 2I] (gate | up); out [T, I]: bfloat16 (silu_mul) or float32 (silu_mul_f32) */
__attribute__((noinline)) static void silu_mul_row_f32(const float *gate_up, float *out, int64_t t, int64_t I) {
    const int64_t g = t * 2 * I, u = g + I;
#pragma omp simd
    for (int64_t i = 0; i < I; i++) {
        const float x = gate_up[g + i];
        out[t * I + i] = x / (1.f + exp_fast(-x)) * gate_up[u + i];
    }
}

static inline __attribute__((always_inline)) void silu_mul_impl(const void *gate_up, void *out, int64_t T,
                                                                int64_t I, int bf) {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        if (!bf) {
            silu_mul_row_f32((const float *)gate_up, (float *)out, t, I);
            continue;
        }
        const int64_t g = t * 2 * I, u = g + I;
#pragma omp simd
        for (int64_t i = 0; i < I; i++) {
            const float x = ld_act(gate_up, g + i, bf);
            st_act(out, t * I + i, x / (1.f + exp_fast(-x)) * ld_act(gate_up, u + i, bf), bf);
        }
    }
}

void silu_mul(const uint16_t *gate_up, uint16_t *out, int64_t T, int64_t I) {
#pragma omp parallel if (T * I >= 16384)
    silu_mul_impl(gate_up, out, T, I, 1);
}

void silu_mul_f32(const float *gate_up, float *out, int64_t T, int64_t I) {
#pragma omp parallel if (T * I >= 16384)
    silu_mul_impl(gate_up, out, T, I, 0);
}

/* x [D] float32, rotated in place (neox style); cs = cos|cos then -sin|sin, 2 * D floats */
__attribute__((noinline)) static void rope_inplace(float *x, const float *cs, int64_t D) {
    const int64_t half = D / 2;
    float tmp[512];
#pragma omp simd
    for (int64_t i = 0; i < half; i++) {
        tmp[i] = x[i] * cs[i] + x[i + half] * cs[D + i];
        tmp[i + half] = x[i + half] * cs[i + half] + x[i] * cs[D + i + half];
    }
    memcpy(x, tmp, D * sizeof(float));
}

/* Rows of a sequence sit anywhere in the pool and the weight stream has flushed the caches: ask for
   the row PREFETCH tokens ahead while working on this one. */
#define PREFETCH 8
static inline void prefetch_row(const float *row, int64_t D) {
    for (int64_t i = 0; i < D; i += 16) __builtin_prefetch(row + i);
}

/* softmax of each of the G rows of scores [G, L], in place */
static void softmax_rows(float *scores, int64_t G, int64_t L) {
    for (int64_t g = 0; g < G; g++) {
        float *s = scores + g * L;
        float m = s[0];
        for (int64_t l = 1; l < L; l++) m = s[l] > m ? s[l] : m;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t l = 0; l < L; l++) {
            s[l] = exp_fast(s[l] - m);
            sum += s[l];
        }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t l = 0; l < L; l++) s[l] *= inv;
    }
}

/* Attention of query heads qg [G, D] (one kv head) over L keys/values read through `slots`. */
static inline __attribute__((always_inline)) void attend(const float *qg, const float *k_pool,
                                                         const float *v_pool, const int64_t *slots, int64_t L,
                                                         int64_t kv_off, int64_t kv_row, float *scores,
                                                         void *out, int64_t G, int64_t D, float scale, int bf) {
    for (int64_t l = 0; l < L; l++) {
        const float *kr = k_pool + slots[l] * kv_row + kv_off;
        if (l + PREFETCH < L) prefetch_row(k_pool + slots[l + PREFETCH] * kv_row + kv_off, D);
        for (int64_t g = 0; g < G; g++) {
            const float *qh = qg + g * D;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t i = 0; i < D; i++) s += qh[i] * kr[i];
            scores[g * L + l] = s * scale;
        }
    }
    softmax_rows(scores, G, L);
    float acc[8 * 256]; /* G <= 8, D <= 256: checked by the caller */
    memset(acc, 0, G * D * sizeof(float));
    for (int64_t l = 0; l < L; l++) {
        const float *vr = v_pool + slots[l] * kv_row + kv_off;
        if (l + PREFETCH < L) prefetch_row(v_pool + slots[l + PREFETCH] * kv_row + kv_off, D);
        for (int64_t g = 0; g < G; g++) {
            const float p = scores[g * L + l];
            float *a = acc + g * D;
#pragma omp simd
            for (int64_t i = 0; i < D; i++) a[i] += p * vr[i];
        }
    }
    for (int64_t g = 0; g < G; g++) {
#pragma omp simd
        for (int64_t i = 0; i < D; i++) st_act(out, g * D + i, acc[g * D + i], bf);
    }
}

/* attend() for a head dim that is a multiple of 16 and a constant group size: the queries and the
   output accumulators live in vector registers (16 floats each; two 256-bit halves under AVX2), each
   key and value row is loaded once for all G query heads. ~2x attend()'s speed at batch 16 on Zen 5,
   where decode attention over float32 rows is compute-bound, not memory-bound. */
typedef float af16 __attribute__((vector_size(64)));
static inline af16 ld16(const float *p) {
    af16 v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline float hsum16(af16 v) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)v);
#else
    float s = 0.f;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
#endif
}

#define ATTEND_FIXED(G, D)                                                                                       \
    static void attend_##G##_##D(const float *qg, const float *k_pool, const float *v_pool, const int64_t *slots, \
                                 int64_t L, int64_t kv_off, int64_t kv_row, float *scores, void *out, float scale, \
                                 int bf) {                                                                       \
        enum { NV = (D) / 16 };                                                                                  \
        af16 q[(G) * NV], acc[(G) * NV];                                                                         \
        for (int g = 0; g < (G); g++)                                                                            \
            for (int v = 0; v < NV; v++) q[g * NV + v] = ld16(qg + g * (D) + v * 16);                            \
        for (int64_t l = 0; l < L; l++) {                                                                        \
            const float *kr = k_pool + slots[l] * kv_row + kv_off;                                               \
            if (l + PREFETCH < L) prefetch_row(k_pool + slots[l + PREFETCH] * kv_row + kv_off, (D));             \
            af16 k[NV];                                                                                          \
            for (int v = 0; v < NV; v++) k[v] = ld16(kr + v * 16);                                               \
            for (int g = 0; g < (G); g++) {                                                                      \
                af16 sv = q[g * NV] * k[0];                                                                      \
                for (int v = 1; v < NV; v++) sv += q[g * NV + v] * k[v];                                         \
                scores[g * L + l] = hsum16(sv) * scale;                                                          \
            }                                                                                                    \
        }                                                                                                        \
        softmax_rows(scores, (G), L);                                                                            \
        for (int i = 0; i < (G) * NV; i++) acc[i] = (af16){};                                                    \
        for (int64_t l = 0; l < L; l++) {                                                                        \
            const float *vr = v_pool + slots[l] * kv_row + kv_off;                                               \
            if (l + PREFETCH < L) prefetch_row(v_pool + slots[l + PREFETCH] * kv_row + kv_off, (D));             \
            af16 vv[NV];                                                                                         \
            for (int v = 0; v < NV; v++) vv[v] = ld16(vr + v * 16);                                              \
            for (int g = 0; g < (G); g++) {                                                                      \
                const float p = scores[g * L + l];                                                               \
                for (int v = 0; v < NV; v++) acc[g * NV + v] += p * vv[v];                                       \
            }                                                                                                    \
        }                                                                                                        \
        for (int g = 0; g < (G); g++)                                                                            \
            for (int v = 0; v < NV; v++)                                                                         \
                for (int i = 0; i < 16; i++) st_act(out, g * (D) + v * 16 + i, acc[g * NV + v][i], bf);         \
    }
#define ATTEND_GROUPS(D) ATTEND_FIXED(1, D) ATTEND_FIXED(2, D) ATTEND_FIXED(3, D) ATTEND_FIXED(4, D) \
    ATTEND_FIXED(5, D) ATTEND_FIXED(6, D) ATTEND_FIXED(7, D) ATTEND_FIXED(8, D)
ATTEND_GROUPS(64)
ATTEND_GROUPS(128)

typedef void (*attend_fn)(const float *, const float *, const float *, const int64_t *, int64_t, int64_t, int64_t,
                          float *, void *, float, int);
static const attend_fn ATTEND_64[8] = {attend_1_64, attend_2_64, attend_3_64, attend_4_64,
                                       attend_5_64, attend_6_64, attend_7_64, attend_8_64};
static const attend_fn ATTEND_128[8] = {attend_1_128, attend_2_128, attend_3_128, attend_4_128,
                                        attend_5_128, attend_6_128, attend_7_128, attend_8_128};

/*
 qkv      [B, (H + 2 Hkv) D] bf16 (f32 for decode_attention_f32): q heads | k heads | v heads, the
          qkv matmul's output
 q_norm_w, k_norm_w [D] or NULL (Qwen3's per-head RMSNorm before RoPE)
 cos_sin  [max_pos, 2, D] float32; positions [B]
 k_pool, v_pool [slots, Hkv, D] float32; write_slots [B]: where this step's k/v go
 table    [B, table_stride]: table[b, l] is the slot of token l of sequence b; lens [B] (this token included)
 out      [B, H D] bf16 (f32 for decode_attention_f32)
 scratch  float32, at least B * H * (D + table_stride) floats
 Query heads h = kv * G + g share kv head `kv` (grouped-query attention). Two parallel loops: first
 every sequence's q/k/v (the new k/v land in the pool), then the (sequence, kv head) pairs.
*/
static inline __attribute__((always_inline)) void decode_attention_impl(
    const void *qkv, const float *q_norm_w, const float *k_norm_w, float eps, const float *cos_sin,
    const int64_t *positions, float *k_pool, float *v_pool, const int64_t *write_slots, const int64_t *table,
    int64_t table_stride, const int64_t *lens, void *out, float *scratch, int64_t B, int64_t H, int64_t Hkv,
    int64_t D, float scale, int bf) {
    const int64_t G = H / Hkv, width = (H + 2 * Hkv) * D, kv_row = Hkv * D;
    float *q_all = scratch;               /* [B, H, D] */
    float *scores_all = scratch + B * H * D; /* [B, H, table_stride] */
    {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) {
            const int64_t src = b * width;
            float *q = q_all + b * H * D;
            float *k_new = k_pool + write_slots[b] * kv_row, *v_new = v_pool + write_slots[b] * kv_row;
            for (int64_t i = 0; i < H * D; i++) q[i] = ld_act(qkv, src + i, bf);
            for (int64_t i = 0; i < kv_row; i++) {
                k_new[i] = ld_act(qkv, src + H * D + i, bf);
                v_new[i] = ld_act(qkv, src + H * D + kv_row + i, bf);
            }
            const float *cs = cos_sin + positions[b] * 2 * D;
            for (int64_t h = 0; h < H; h++) {
                if (q_norm_w) rmsnorm_inplace(q + h * D, q_norm_w, D, eps);
                rope_inplace(q + h * D, cs, D);
            }
            for (int64_t h = 0; h < Hkv; h++) {
                if (k_norm_w) rmsnorm_inplace(k_new + h * D, k_norm_w, D, eps);
                rope_inplace(k_new + h * D, cs, D);
            }
        }
#pragma omp for schedule(static)
        for (int64_t item = 0; item < B * Hkv; item++) {
            const int64_t b = item / Hkv, kv = item % Hkv;
            const float *qg = q_all + (b * H + kv * G) * D;
            float *scores = scores_all + (b * H + kv * G) * table_stride;
            const int64_t o_off = b * H * D + kv * G * D;
            void *o = bf ? (void *)((uint16_t *)out + o_off) : (void *)((float *)out + o_off);
            const int64_t *slots = table + b * table_stride;
            /* constant head dims let the compiler unroll the dot products */
            if (D == 64)
                ATTEND_64[G - 1](qg, k_pool, v_pool, slots, lens[b], kv * D, kv_row, scores, o, scale, bf);
            else if (D == 128)
                ATTEND_128[G - 1](qg, k_pool, v_pool, slots, lens[b], kv * D, kv_row, scores, o, scale, bf);
            else
                attend(qg, k_pool, v_pool, slots, lens[b], kv * D, kv_row, scores, o, G, D, scale, bf);
        }
    }
}

void decode_attention(const uint16_t *qkv, const float *q_norm_w, const float *k_norm_w, float eps,
                      const float *cos_sin, const int64_t *positions, float *k_pool, float *v_pool,
                      const int64_t *write_slots, const int64_t *table, int64_t table_stride, const int64_t *lens,
                      uint16_t *out, float *scratch, int64_t B, int64_t H, int64_t Hkv, int64_t D, float scale) {
#pragma omp parallel
    decode_attention_impl(qkv, q_norm_w, k_norm_w, eps, cos_sin, positions, k_pool, v_pool, write_slots, table,
                          table_stride, lens, out, scratch, B, H, Hkv, D, scale, 1);
}

void decode_attention_f32(const float *qkv, const float *q_norm_w, const float *k_norm_w, float eps,
                          const float *cos_sin, const int64_t *positions, float *k_pool, float *v_pool,
                          const int64_t *write_slots, const int64_t *table, int64_t table_stride,
                          const int64_t *lens, float *out, float *scratch, int64_t B, int64_t H, int64_t Hkv,
                          int64_t D, float scale) {
#pragma omp parallel
    decode_attention_impl(qkv, q_norm_w, k_norm_w, eps, cos_sin, positions, k_pool, v_pool, write_slots, table,
                          table_stride, lens, out, scratch, B, H, Hkv, D, scale, 0);
}

/* ------------------------------------------------------------------ weight-streaming matmuls

   y[B, N] = x[B, K] @ W[N, K]^T (+ bias[N]), x and y float32, for the few rows of a decode step (a
   prompt chunk goes to torch's GEMM). A decode step of a small model reads every weight once for a
   handful of rows, so its speed is that of the weight stream: these kernels read W in a compact
   format and widen it to float32 in registers. Each row of W is K/32 blocks of 32 weights:

     q4_1   GGUF Q4_1, 20 bytes: fp16 d, fp16 m, 16 bytes of 4-bit q (low nibbles are weights 0..15,
            high nibbles 16..31); w = d * q + m
     q8_0   GGUF Q8_0, 34 bytes: fp16 d, 32 int8 q; w = d * q
     bf16   64 bytes, w = the bfloat16 widened;  f32  128 bytes

   The float32 weights are exactly those gguf-py's dequantization computes (d * q, then + m, each
   rounded to float32; d * q itself is exact, an 11-bit fp16 mantissa times a 4- or 8-bit integer, so
   a fused multiply-add rounds the same), so the products are those of the dequantized float32 model;
   only the order of the sums differs from a float32 GEMM. Threads split W into panels of NR rows; each panel
   is widened once into a float32 buffer (L1-resident), then every BR rows of x are multiplied by it
   with NR x BR vector accumulators, so at batch 16 the dequantization is paid once per weight and
   the loop is FMAs fed from L1. */

/* NR x BR accumulators + NR weight vectors + BR input vectors fit the vector registers (32 with
   AVX-512, 16 with AVX2), so each k step loads every operand once */
#if defined(__AVX512F__)
#define VL 16
#define NR 4
#define BR 4
#elif defined(__AVX__)
#define VL 8
#define NR 2
#define BR 4
#else
#define VL 4
#define NR 2
#define BR 2
#endif
#define NV (32 / VL) /* vectors per block of 32 weights */
/* A decode step streams every weight from memory once (~100 MB, more than the L3), so each kernel
   asks for the bytes PF_AHEAD ahead of the ones it reads: on a 2-core Zen 5 this took the bfloat16
   dot kernels' layer matmuls at batch 16 from 5.2 to 3.1 ms a step (gate_up) and the logits matmul at
   batch 1 from 1.0 to 0.65 ms. A thread's rows are one contiguous run, so "ahead" is simply further on. */
#define PF_AHEAD 8192

typedef float vf __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));
typedef uint32_t vu __attribute__((vector_size(VL * 4)));
typedef uint8_t vu8 __attribute__((vector_size(VL)));
typedef int8_t vi8 __attribute__((vector_size(VL)));
typedef uint16_t vu16 __attribute__((vector_size(VL * 2)));

enum { FMT_F32 = 0, FMT_BF16 = 1, FMT_Q8_0 = 2, FMT_Q4_1 = 3 };

static inline int64_t fmt_row_bytes(int fmt, int64_t K) {
    switch (fmt) {
    case FMT_Q4_1: return K / 32 * 20;
    case FMT_Q8_0: return K / 32 * 34;
    case FMT_BF16: return K * 2;
    default: return K * 4;
    }
}

#if defined(__F16C__)
#include <immintrin.h>
static inline float fp16_to_f32(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}
#else
static inline float fp16_to_f32(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
    uint32_t u;
    if (exp == 0x1F) {
        u = sign | 0x7F800000u | (man << 13); /* inf, nan */
    } else if (exp) {
        u = sign | ((exp + 112) << 23) | (man << 13);
    } else { /* zero or subnormal: man * 2^-24, exact in float32 */
        float f = (float)man * 5.9604644775390625e-8f;
        memcpy(&u, &f, 4);
        u |= sign;
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}
#endif

/* An empty asm that "changes" v: keeps the compiler from folding a register operand back into a
   memory load. */
#if defined(__x86_64__) || defined(__i386__)
#define NO_CONTRACT(v) __asm__("" : "+x"(v))
#elif defined(__aarch64__)
#define NO_CONTRACT(v) __asm__("" : "+w"(v))
#else
#define NO_CONTRACT(v) __asm__ volatile("" ::: "memory")
#endif

/* Block `blk` of a weight row, widened into 32 floats at dst. */
static inline __attribute__((always_inline)) void widen_block(int fmt, const uint8_t *row, int64_t blk, float *dst) {
    if (fmt == FMT_Q4_1) {
        const uint8_t *b = row + blk * 20;
        const vf d = (vf){} + fp16_to_f32(b), m = (vf){} + fp16_to_f32(b + 2);
#pragma GCC unroll 8
        for (int j = 0; j < NV; j++) {
            vu8 q8;
            memcpy(&q8, b + 4 + (j % (NV / 2)) * VL, VL);
            vi q = __builtin_convertvector(q8, vi);
            q = j < NV / 2 ? (q & 15) : (q >> 4);
            const vf w = __builtin_convertvector(q, vf) * d + m; /* d * q is exact: a fused add rounds alike */
            memcpy(dst + j * VL, &w, sizeof w);
        }
    } else if (fmt == FMT_Q8_0) {
        const uint8_t *b = row + blk * 34;
        const vf d = (vf){} + fp16_to_f32(b);
#pragma GCC unroll 8
        for (int j = 0; j < NV; j++) {
            vi8 q8;
            memcpy(&q8, b + 2 + j * VL, VL);
            const vf w = __builtin_convertvector(q8, vf) * d;
            memcpy(dst + j * VL, &w, sizeof w);
        }
    } else if (fmt == FMT_BF16) {
        const uint8_t *b = row + blk * 64;
#pragma GCC unroll 8
        for (int j = 0; j < NV; j++) {
            vu16 h;
            memcpy(&h, b + j * VL * 2, VL * 2);
            const vu u = __builtin_convertvector(h, vu) << 16;
            memcpy(dst + j * VL, &u, sizeof u);
        }
    } else {
        memcpy(dst, row + blk * 128, 128);
    }
}

static inline vf load_vf(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float hsum(vf v) {
    float s = 0.f;
    for (int i = 0; i < VL; i++) s += v[i];
    return s;
}

/* y[b, n0 + n] for n < nr, b < br: the panel w [NR, K] (float32) times rows x [br, K] */
static inline __attribute__((always_inline)) void panel_tile(const float *w, const float *x, int64_t K, float *y,
                                                             int64_t ldy, int64_t nr, int br, const float *bias) {
    vf acc[NR][BR];
#pragma GCC unroll 8
    for (int n = 0; n < NR; n++)
#pragma GCC unroll 8
        for (int b = 0; b < BR; b++) acc[n][b] = (vf){};
    for (int64_t k = 0; k < K; k += VL) {
        vf wv[NR], xv[BR];
        /* in registers, not re-read by every FMA: that would make the loop load-bound */
#pragma GCC unroll 8
        for (int n = 0; n < NR; n++) {
            wv[n] = load_vf(w + n * K + k);
            NO_CONTRACT(wv[n]);
        }
#pragma GCC unroll 8
        for (int b = 0; b < BR; b++) {
            if (b < br) {
                xv[b] = load_vf(x + b * K + k);
                NO_CONTRACT(xv[b]);
            }
        }
#pragma GCC unroll 8
        for (int b = 0; b < BR; b++)
            if (b < br)
#pragma GCC unroll 8
                for (int n = 0; n < NR; n++) acc[n][b] += wv[n] * xv[b];
    }
    for (int b = 0; b < br; b++)
        for (int64_t n = 0; n < nr; n++) y[b * ldy + n] = hsum(acc[n][b]) + (bias ? bias[n] : 0.f);
}

static inline __attribute__((always_inline)) void gemm_impl(int fmt, const uint8_t *W, const float *x, float *y,
                                                            const float *bias, int64_t B, int64_t K, int64_t N) {
    const int64_t row_bytes = fmt_row_bytes(fmt, K), panels = (N + NR - 1) / NR, blocks = K / 32;
    {
        float *wbuf = aligned_alloc(64, (size_t)(NR * K * sizeof(float) + 63) / 64 * 64);
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; p++) {
            const int64_t n0 = p * NR, nr = N - n0 < NR ? N - n0 : NR;
            for (int64_t n = 0; n < NR; n++) {
                if (n < nr) {
                    const uint8_t *row = W + (n0 + n) * row_bytes;
                    for (int64_t off = 0; off < row_bytes; off += 64) /* see PF_AHEAD */
                        __builtin_prefetch(row + PF_AHEAD + off, 0, 3);
                    for (int64_t blk = 0; blk < blocks; blk++) widen_block(fmt, row, blk, wbuf + n * K + blk * 32);
                } else {
                    memset(wbuf + n * K, 0, K * sizeof(float)); /* past the last row: zeros, not stored */
                }
            }
            const float *pb = bias ? bias + n0 : NULL;
            int64_t b0 = 0;
            for (; b0 + BR <= B; b0 += BR) panel_tile(wbuf, x + b0 * K, K, y + b0 * N + n0, N, nr, BR, pb);
            switch (B - b0) { /* constant row counts: the tile's loops unroll */
#if BR > 3
            case 3: panel_tile(wbuf, x + b0 * K, K, y + b0 * N + n0, N, nr, 3, pb); break;
#endif
            case 2: panel_tile(wbuf, x + b0 * K, K, y + b0 * N + n0, N, nr, 2, pb); break;
            case 1: panel_tile(wbuf, x + b0 * K, K, y + b0 * N + n0, N, nr, 1, pb); break;
            default: break;
            }
        }
        free(wbuf);
    }
}

/* W: N rows of K/32 blocks in the format of the name; x [B, K], y [B, N] float32; bias [N] or NULL.
   K must be a multiple of 32 (checked by the caller). */
/* One exported entry per format (ctypes looks each up by name), each a threaded impl (here gemm_impl;
   the panel kernels below use it too). */
#define GEMM_ENTRY(name, impl, fmt)                                                                    \
    void name(const uint8_t *W, const float *x, float *y, const float *bias, int64_t B, int64_t K,     \
              int64_t N) {                                                                              \
        _Pragma("omp parallel") impl(fmt, W, x, y, bias, B, K, N);                                     \
    }
GEMM_ENTRY(gemm_q4_1, gemm_impl, FMT_Q4_1)
GEMM_ENTRY(gemm_q8_0, gemm_impl, FMT_Q8_0)
GEMM_ENTRY(gemm_bf16, gemm_impl, FMT_BF16)
GEMM_ENTRY(gemm_f32, gemm_impl, FMT_F32)

/* The ISA this file was built for, so the loader can check it got the build it asked for. */
int kernels_vector_bits(void) { return VL * 32; }

/* out [N, K] float32: the weights of W (N rows in format fmt, FMT_* above), as the matmuls see them */
void widen_rows(int fmt, const uint8_t *W, float *out, int64_t N, int64_t K) {
    const int64_t row_bytes = fmt_row_bytes(fmt, K), blocks = K / 32;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t blk = 0; blk < blocks; blk++) widen_block(fmt, W + n * row_bytes, blk, out + n * K + blk * 32);
}

/* ------------------------------------------------------------------ weight panels

   The Q4_1 / Q8_0 / bfloat16 weights repacked once at load (pack_panels) into panels of 16 output
   rows, so that each vector lane is one output row and a matmul's inner loop multiplies a vector of
   16 rows' weights by one input broadcast to every lane: no weights widened into a buffer, no
   horizontal sums. Per panel and block of 32 inputs:

     q4_1p  fp16 d[16], fp16 m[16], then 8 x 32 bytes: byte 32 p + 2 r + e holds, for row r, weights
            2p + e (low nibble) and 2p + 16 + e (high nibble), as the GGUF block's byte 2p + e does.
                                                                                          320 bytes
     q8_0p  fp16 d[16], then 16 x 64 bytes: pair p of every row as two bfloat16 integers. 1056 bytes
     bf16p  16 x 64 bytes: pair p of every row, bfloat16 weights, no scale.             1024 bytes

   Rows past N in the last panel are zeros. Two kernels read them: the float32 FMA ones right below
   (every AVX2 / AVX-512 CPU) and the bfloat16 dot-product ones after them (AVX512_BF16). Both compute

     y[n] = sum_j d[n,j] * sum_i q[n,j,i] x[j,i]  (+ m[n,j] * sum_i x[j,i] for Q4_1)

   with the weights exact (the nibbles and Q8_0 integers are float32 and bfloat16 values as they are). */
#if defined(__AVX2__)
static inline int64_t panel_block_bytes(int fmt) {
    return fmt == FMT_Q4_1 ? 320 : fmt == FMT_Q8_0 ? 1056 : 1024;
}

int64_t panel_bytes(int fmt, int64_t N, int64_t K) { return (N + 15) / 16 * (K / 32) * panel_block_bytes(fmt); }

static inline uint16_t int_to_bf16(int v) { /* exact for |v| <= 256 */
    float f = (float)v;
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)(u >> 16);
}

/* out = W (N rows in the GGUF / bfloat16 layout of fmt: FMT_Q4_1, FMT_Q8_0 or FMT_BF16) as panels */
/* PANEL_INT16 | FMT_Q8_0: the q8_0p layout with each integer as int16 instead of bfloat16, for the int16
   kernels (the same 1056 bytes a block) */
#define PANEL_INT16 16
void pack_panels(int fmt_flags, const uint8_t *W, uint8_t *out, int64_t N, int64_t K) {
    const int fmt = fmt_flags & ~PANEL_INT16, int16 = fmt_flags & PANEL_INT16;
    const int64_t blocks = K / 32, row_bytes = fmt_row_bytes(fmt, K), pbb = panel_block_bytes(fmt);
    const int64_t panels = (N + 15) / 16;
    memset(out, 0, (size_t)(panels * blocks * pbb));
    for (int64_t p = 0; p < panels; p++)
        for (int64_t j = 0; j < blocks; j++) {
            uint8_t *dst = out + (p * blocks + j) * pbb;
            for (int64_t r = 0; r < 16 && p * 16 + r < N; r++) {
                const uint8_t *row = W + (p * 16 + r) * row_bytes;
                if (fmt == FMT_Q4_1) {
                    const uint8_t *b = row + j * 20;
                    memcpy(dst + 2 * r, b, 2);
                    memcpy(dst + 32 + 2 * r, b + 2, 2);
                    for (int pp = 0; pp < 8; pp++)
                        for (int e = 0; e < 2; e++) dst[64 + 32 * pp + 2 * r + e] = b[4 + 2 * pp + e];
                } else if (fmt == FMT_Q8_0) {
                    const uint8_t *b = row + j * 34;
                    memcpy(dst + 2 * r, b, 2);
                    for (int i = 0; i < 32; i++) {
                        const uint16_t h = int16 ? (uint16_t)(int16_t)(int8_t)b[2 + i] : int_to_bf16((int8_t)b[2 + i]);
                        memcpy(dst + 32 + 64 * (i / 2) + 4 * r + 2 * (i % 2), &h, 2);
                    }
                } else {
                    const uint8_t *b = row + j * 64;
                    for (int i = 0; i < 32; i++) memcpy(dst + 64 * (i / 2) + 4 * r + 2 * (i % 2), b + 2 * i, 2);
                }
            }
        }
}

int kernels_have_panels(void) { return 1; }

/* ------------------------------------------------------------------ float32 FMA matmuls over the panels

   x stays float32 and each weight becomes the float32 it is (a nibble or Q8_0 integer by one convert,
   a bfloat16 by one shift): the products are the float32 model's own weights times float32 inputs,
   only summed in another order (the block scale applied to the block's sum). Where the row kernels
   above (gemm_impl) widen a panel into a buffer and sum each row horizontally, ~7 G multiply-adds/s
   at batch 1 on a Zen 5 core pair, these stream the compact weights at about the speed of memory. */
#if defined(__AVX512F__)
#define FBR 6 /* batch rows per tile: 3 x FBR accumulators + 4 weight vectors fit 32 registers */
static inline vu ld_nibble_pairs(const uint8_t *p) { /* 16 rows x 2 bytes, zero-extended to 32 bits */
    return (vu)_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
}
static inline vf ld_fp16s(const uint8_t *p) { return (vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
#else
#define FBR 4 /* 16 registers: 12 accumulators and the weights (4 rows measured ~10% faster than 3) */
static inline vu ld_nibble_pairs(const uint8_t *p) {
    return (vu)_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
}
static inline vf ld_fp16s(const uint8_t *p) { return (vf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
#endif
static inline vu ld_vu(const uint8_t *p) {
    vu v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline vf u_to_f(vu v) { return __builtin_convertvector((vi)v, vf); }

/* xs [B, K / 32]: the float32 sum of each block of 32 inputs of x [B, K] (Q4_1's m term) */
static inline void block_sums(const float *x, int64_t B, int64_t K, float *xs) {
    const int64_t blocks = K / 32;
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < blocks; j++) {
            vf s = (vf){};
            for (int v = 0; v < NV; v++) s += load_vf(x + b * K + j * 32 + v * VL);
            xs[b * blocks + j] = hsum(s);
        }
}

/* y[b, r0 + lane] = acc[b] (+ bias[r0 + lane]) for b < br and the lanes of rows below nr: a tile's
   accumulators (one vector lane per output row) written out */
static inline void store_tile(const vf *acc, int br, float *y, int64_t ldy, int64_t r0, int64_t nr,
                              const float *bias) {
    const int64_t lanes = nr - r0 < VL ? nr - r0 : VL;
    for (int b = 0; b < br; b++) {
        float *yb = y + b * ldy + r0;
        if (lanes == VL) {
            const vf out = bias ? acc[b] + load_vf(bias + r0) : acc[b];
            memcpy(yb, &out, sizeof out);
        } else {
            for (int64_t i = 0; i < lanes; i++) yb[i] = acc[b][i] + (bias ? bias[r0 + i] : 0.f);
        }
    }
}

/* y[b, r0 + lane] for the panel's rows r0 .. r0 + VL (lanes < nr), b < br: panel P times float32 rows
   x [br, K], xs [br, K / 32] their block sums (Q4_1's m term). pf: prefetch the weights ahead, or NULL. */
static inline __attribute__((always_inline)) void fma_tile(int fmt, const uint8_t *P, int64_t r0, const float *x,
                                                           const float *xs, int64_t K, int br, float *y,
                                                           int64_t ldy, int64_t nr, const float *bias,
                                                           const uint8_t *pf) {
    const int64_t blocks = K / 32, pbb = panel_block_bytes(fmt);
    vf acc[FBR];
#pragma GCC unroll 8
    for (int b = 0; b < FBR; b++) acc[b] = (vf){};
    for (int64_t j = 0; j < blocks; j++) {
        const uint8_t *pb = P + j * pbb;
        const float *xj = x + j * 32;
        if (pf)
            for (int64_t l = 0; l < pbb; l += 64) __builtin_prefetch(pf + j * pbb + l, 0, 3);
        vf a0[FBR], a1[FBR];
#pragma GCC unroll 8
        for (int b = 0; b < FBR; b++) a0[b] = a1[b] = (vf){};
        if (fmt == FMT_Q4_1) {
#pragma GCC unroll 8
            for (int pp = 0; pp < 8; pp++) {
                const vu v = ld_nibble_pairs(pb + 64 + 32 * pp + 2 * r0);
                const vf w0 = u_to_f(v & 15), w16 = u_to_f((v >> 4) & 15);
                const vf w1 = u_to_f((v >> 8) & 15), w17 = u_to_f((v >> 12) & 15);
#pragma GCC unroll 8
                for (int b = 0; b < FBR; b++) {
                    if (b < br) {
                        const float *xb = xj + b * K;
                        a0[b] += w0 * xb[2 * pp];
                        a1[b] += w16 * xb[16 + 2 * pp];
                        a0[b] += w1 * xb[2 * pp + 1];
                        a1[b] += w17 * xb[17 + 2 * pp];
                    }
                }
            }
            const vf d = ld_fp16s(pb + 2 * r0), m = ld_fp16s(pb + 32 + 2 * r0);
#pragma GCC unroll 8
            for (int b = 0; b < FBR; b++) {
                if (b < br) {
                    acc[b] += (a0[b] + a1[b]) * d;
                    acc[b] += m * xs[b * blocks + j];
                }
            }
        } else {
            const uint8_t *q = pb + (fmt == FMT_Q8_0 ? 32 : 0);
#pragma GCC unroll 16
            for (int pp = 0; pp < 16; pp++) {
                const vu v = ld_vu(q + 64 * pp + 4 * r0);
                vf we, wo; /* the pair's bfloat16 values, widened: a shift, a mask */
                const vu ue = v << 16, uo = v & 0xFFFF0000u;
                memcpy(&we, &ue, sizeof we);
                memcpy(&wo, &uo, sizeof wo);
#pragma GCC unroll 8
                for (int b = 0; b < FBR; b++) {
                    if (b < br) {
                        a0[b] += we * xj[b * K + 2 * pp];
                        a1[b] += wo * xj[b * K + 2 * pp + 1];
                    }
                }
            }
            const vf d = fmt == FMT_Q8_0 ? ld_fp16s(pb + 2 * r0) : (vf){} + 1.f;
#pragma GCC unroll 8
            for (int b = 0; b < FBR; b++)
                if (b < br) acc[b] += (a0[b] + a1[b]) * d;
        }
    }
    store_tile(acc, br, y, ldy, r0, nr, bias);
}

static inline __attribute__((always_inline)) void gemm_fma_impl(int fmt, const uint8_t *W, const float *x,
                                                                float *y, const float *bias, int64_t B,
                                                                int64_t K, int64_t N) {
    const int64_t blocks = K / 32, panels = (N + 15) / 16, pstride = blocks * panel_block_bytes(fmt);
    float *xs = NULL;
    if (fmt == FMT_Q4_1) { /* every thread sums the blocks itself (a few microseconds): no barrier */
        xs = aligned_alloc(64, (size_t)(B * blocks * 4 + 63) / 64 * 64);
        block_sums(x, B, K, xs);
    }
#pragma omp for schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        const int64_t n0 = p * 16, nr = N - n0 < 16 ? N - n0 : 16;
        const uint8_t *P = W + p * pstride;
        const float *pbias = bias ? bias + n0 : NULL;
        for (int64_t r0 = 0; r0 < nr; r0 += VL) {
            const uint8_t *pf = r0 ? NULL : P + PF_AHEAD;
            int64_t b0 = 0;
            for (; b0 + FBR <= B; b0 += FBR)
                fma_tile(fmt, P, r0, x + b0 * K, xs ? xs + b0 * blocks : NULL, K, FBR, y + b0 * N + n0, N, nr,
                         pbias, b0 ? NULL : pf);
#define FMA_REST(r)                                                                                           \
    case r:                                                                                                   \
        fma_tile(fmt, P, r0, x + b0 * K, xs ? xs + b0 * blocks : NULL, K, r, y + b0 * N + n0, N, nr, pbias,  \
                 b0 ? NULL : pf);                                                                             \
        break;
            switch (B - b0) { /* constant row counts: the tile's loops unroll */
#if FBR > 5
                FMA_REST(5) FMA_REST(4)
#endif
#if FBR > 3
                FMA_REST(3)
#endif
                FMA_REST(2) FMA_REST(1)
            default: break;
            }
#undef FMA_REST
        }
    }
    free(xs);
}

/* y [B, N] = x [B, K] @ W^T (+ bias), float32 x, for W packed by pack_panels */
GEMM_ENTRY(gemm_fma_q4_1p, gemm_fma_impl, FMT_Q4_1)
GEMM_ENTRY(gemm_fma_q8_0p, gemm_fma_impl, FMT_Q8_0)
GEMM_ENTRY(gemm_fma_bf16p, gemm_fma_impl, FMT_BF16)

/* ------------------------------------------------------------------ int16 dot products over the panels

   For CPUs without AVX512_BF16 (AVX2 ones, AVX-512 ones before Zen 4 / Cooper Lake), where float32 FMAs
   bound a decode step from batch 4 up: vpmaddwd multiplies 16-bit integers in pairs and sums each
   pair into a 32-bit lane, twice the float32 FMA rate. The nibbles are 16-bit integers as they are;
   the input row b is carried as int16 with one scale, x ~= s_b * x16 (s_b = max |x_b| / 32767, so each
   element is off by at most s_b / 2: a relative 2^-16 of the row's largest, where bfloat16 rounds
   each element by up to 2^-9 of itself). The integer sums are exact (|sum| < 2^24 per block), and

     y[n] = sum_j d[n,j] * s_b * sum_i q[n,j,i] x16[j,i]  +  m[n,j] * sum_i x[j,i]

   (the minimum's term from the float32 inputs). Q4_1 panels as pack_panels makes them; Q8_0 ones packed
   with PANEL_INT16 (the integers as int16, not bfloat16: |sum| < 2^27 per block). */
#if defined(__AVX512F__)
#define IBR 8 /* batch rows per tile: IBR float + 2 IBR int32 accumulators + the weights, 32 registers */
typedef __m512i vint;
static inline vint i16_pairs(const uint8_t *p) { /* VL rows x 2 bytes -> 16-bit lanes */
    return _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
}
#define MADD(a, b) _mm512_madd_epi16(a, b)
#define ADD32(a, b) _mm512_add_epi32(a, b)
#define SET1_32(v) _mm512_set1_epi32(v)
#define AND16(a, m) _mm512_and_si512(a, _mm512_set1_epi16(m))
#define SRL16(a, n) _mm512_srli_epi16(a, n)
#define ZERO_I() _mm512_setzero_si512()
#define I2F(a) ((vf)_mm512_cvtepi32_ps(a))
#else
#define IBR 4
typedef __m256i vint;
static inline vint i16_pairs(const uint8_t *p) {
    return _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
}
#define MADD(a, b) _mm256_madd_epi16(a, b)
#define ADD32(a, b) _mm256_add_epi32(a, b)
#define SET1_32(v) _mm256_set1_epi32(v)
#define AND16(a, m) _mm256_and_si256(a, _mm256_set1_epi16(m))
#define SRL16(a, n) _mm256_srli_epi16(a, n)
#define ZERO_I() _mm256_setzero_si256()
#define I2F(a) ((vf)_mm256_cvtepi32_ps(a))
#endif

/* The int16 rows of x (one scale each, sc) and their float32 block sums (xs), as every thread of a
   gemm_i16 call makes them itself (a few microseconds: no barrier). */
static inline void quantize_rows_i16(const float *x, int64_t B, int64_t K, int16_t *x16, float *sc, float *xs) {
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * K;
        float amax = 0.f;
        for (int64_t i = 0; i < K; i++) amax = fabsf(xb[i]) > amax ? fabsf(xb[i]) : amax;
        sc[b] = amax > 0.f ? amax * (1.f / 32767.f) : 1.f; /* a product, as -freciprocal-math would make it */
        const float inv = 1.f / sc[b];
        for (int64_t i = 0; i < K; i++) {
            const float q = nearbyintf(xb[i] * inv);
            x16[b * K + i] = (int16_t)(q > 32767.f ? 32767.f : q < -32767.f ? -32767.f : q);
        }
    }
    block_sums(x, B, K, xs);
}

/* Rows r0 .. r0 + VL of a Q4_1 panel times int16 rows x16 [br, K] (scales sc [br]; xs [br, K / 32] the
   float32 block sums), as fma_tile otherwise, and the threaded loop over the panels. Built twice:
   STEP(acc, w, x) is vpmaddwd + vpaddd, or the one VNNI vpdpwssd (TARGET enables it; the Python side
   calls that copy only where the CPU has VNNI). The same integer sums either way. */
#define I16_KERNELS(SUFFIX, TARGET, STEP)                                                                       \
    TARGET static inline __attribute__((always_inline)) void i16_tile##SUFFIX(                                  \
        int fmt, const uint8_t *P, int64_t r0, const int16_t *x16, const float *sc, const float *xs, int64_t K,   \
        int br, float *y, int64_t ldy, int64_t nr, const float *bias, const uint8_t *pf) {                       \
        const int64_t blocks = K / 32, pbb = panel_block_bytes(fmt);                                            \
        vf acc[IBR];                                                                                            \
        _Pragma("GCC unroll 8") for (int b = 0; b < IBR; b++) acc[b] = (vf){};                                  \
        for (int64_t j = 0; j < blocks; j++) {                                                                  \
            const uint8_t *pb = P + j * pbb;                                                                    \
            if (pf)                                                                                             \
                for (int64_t l = 0; l < pbb; l += 64) __builtin_prefetch(pf + j * pbb + l, 0, 3);               \
            vint a0[IBR], a1[IBR];                                                                              \
            _Pragma("GCC unroll 8") for (int b = 0; b < IBR; b++) a0[b] = a1[b] = ZERO_I();                     \
            if (fmt == FMT_Q8_0) { /* int16 pairs as stored; even pairs into a0, odd into a1 */                  \
                _Pragma("GCC unroll 16") for (int pp = 0; pp < 16; pp++) {                                      \
                    vint w;                                                                                     \
                    memcpy(&w, pb + 32 + 64 * pp + 4 * r0, sizeof w);                                           \
                    _Pragma("GCC unroll 8") for (int b = 0; b < IBR; b++) {                                     \
                        if (b < br) {                                                                           \
                            int32_t xv;                                                                         \
                            memcpy(&xv, x16 + b * K + j * 32 + 2 * pp, 4);                                      \
                            if (pp % 2) a1[b] = STEP(a1[b], w, SET1_32(xv));                                    \
                            else a0[b] = STEP(a0[b], w, SET1_32(xv));                                           \
                        }                                                                                       \
                    }                                                                                           \
                }                                                                                               \
                const vf d = ld_fp16s(pb + 2 * r0);                                                             \
                _Pragma("GCC unroll 8") for (int b = 0; b < IBR; b++)                                           \
                    if (b < br) acc[b] += I2F(ADD32(a0[b], a1[b])) * (d * sc[b]);                               \
                continue;                                                                                       \
            }                                                                                                   \
            _Pragma("GCC unroll 8") for (int pp = 0; pp < 8; pp++) {                                            \
                const vint v = i16_pairs(pb + 64 + 32 * pp + 2 * r0);                                           \
                const vint wl = AND16(v, 0x000F), wh = AND16(SRL16(v, 4), 0x000F);                              \
                _Pragma("GCC unroll 8") for (int b = 0; b < IBR; b++) {                                         \
                    if (b < br) { /* the input pairs (2p, 2p + 1) and (2p + 16, 2p + 17) */                     \
                        int32_t xl, xh;                                                                         \
                        memcpy(&xl, x16 + b * K + j * 32 + 2 * pp, 4);                                          \
                        memcpy(&xh, x16 + b * K + j * 32 + 16 + 2 * pp, 4);                                     \
                        a0[b] = STEP(a0[b], wl, SET1_32(xl));                                                   \
                        a1[b] = STEP(a1[b], wh, SET1_32(xh));                                                   \
                    }                                                                                           \
                }                                                                                               \
            }                                                                                                   \
            const vf d = ld_fp16s(pb + 2 * r0), m = ld_fp16s(pb + 32 + 2 * r0);                                 \
            _Pragma("GCC unroll 8") for (int b = 0; b < IBR; b++) {                                             \
                if (b < br) {                                                                                   \
                    acc[b] += I2F(ADD32(a0[b], a1[b])) * (d * sc[b]);                                           \
                    acc[b] += m * xs[b * blocks + j];                                                           \
                }                                                                                               \
            }                                                                                                   \
        }                                                                                                       \
        store_tile(acc, br, y, ldy, r0, nr, bias);                                                              \
    }                                                                                                           \
    TARGET static inline __attribute__((always_inline)) void gemm_i16_impl##SUFFIX(                             \
        int fmt, const uint8_t *W, const float *x, float *y, const float *bias, int64_t B, int64_t K, int64_t N) { \
        const int64_t blocks = K / 32, panels = (N + 15) / 16;                                                  \
        int16_t *x16 = aligned_alloc(64, (size_t)(B * K * 2 + 63) / 64 * 64);                                   \
        float *xs = aligned_alloc(64, (size_t)(B * blocks * 4 + 63) / 64 * 64);                                 \
        float *sc = aligned_alloc(64, (size_t)(B * 4 + 63) / 64 * 64);                                          \
        quantize_rows_i16(x, B, K, x16, sc, xs);                                                                \
        _Pragma("omp for schedule(static)") for (int64_t p = 0; p < panels; p++) {                              \
            const int64_t n0 = p * 16, nr = N - n0 < 16 ? N - n0 : 16;                                          \
            const uint8_t *P = W + p * blocks * panel_block_bytes(fmt);                                         \
            const float *pb = bias ? bias + n0 : NULL;                                                          \
            for (int64_t r0 = 0; r0 < nr; r0 += VL)                                                             \
                for (int64_t b0 = 0; b0 < B; b0 += IBR) {                                                       \
                    const uint8_t *pf = b0 || r0 ? NULL : P + PF_AHEAD;                                         \
                    const int64_t r = B - b0 < IBR ? B - b0 : IBR;                                              \
                    const int16_t *xr = x16 + b0 * K;                                                           \
                    float *yr = y + b0 * N + n0;                                                                \
                    /* constant row counts: the tile's loops unroll */                                          \
                    if (r == IBR) i16_tile##SUFFIX(fmt, P, r0, xr, sc + b0, xs + b0 * blocks, K, IBR, yr, N, nr, pb, pf); \
                    else if (r == 1) i16_tile##SUFFIX(fmt, P, r0, xr, sc + b0, xs + b0 * blocks, K, 1, yr, N, nr, pb, pf); \
                    else if (r == 2) i16_tile##SUFFIX(fmt, P, r0, xr, sc + b0, xs + b0 * blocks, K, 2, yr, N, nr, pb, pf); \
                    else i16_tile##SUFFIX(fmt, P, r0, xr, sc + b0, xs + b0 * blocks, K, (int)r, yr, N, nr, pb, pf);   \
                }                                                                                               \
        }                                                                                                       \
        free(x16);                                                                                              \
        free(xs);                                                                                               \
        free(sc);                                                                                               \
    }                                                                                                           \
    /* y [B, N] = (x [B, K] as int16 rows) @ W^T (+ bias) for W packed by pack_panels (Q8_0: PANEL_INT16) */    \
    TARGET void gemm_i16##SUFFIX##_q4_1p(const uint8_t *W, const float *x, float *y, const float *bias, int64_t B, \
                                        int64_t K, int64_t N) {                                                 \
        _Pragma("omp parallel") gemm_i16_impl##SUFFIX(FMT_Q4_1, W, x, y, bias, B, K, N);                        \
    }                                                                                                           \
    TARGET void gemm_i16##SUFFIX##_q8_0p(const uint8_t *W, const float *x, float *y, const float *bias, int64_t B, \
                                        int64_t K, int64_t N) {                                                 \
        _Pragma("omp parallel") gemm_i16_impl##SUFFIX(FMT_Q8_0, W, x, y, bias, B, K, N);                        \
    }

#define STEP_MADD(a, w, x) ADD32(a, MADD(w, x))
I16_KERNELS(, , STEP_MADD)
#if defined(__AVX512F__)
#define STEP_VNNI(a, w, x) _mm512_dpwssd_epi32(a, w, x)
I16_KERNELS(v, __attribute__((target("avx512vnni"))), STEP_VNNI)
#else
#define STEP_VNNI(a, w, x) _mm256_dpwssd_avx_epi32(a, w, x)
I16_KERNELS(v, __attribute__((target("avxvnni"))), STEP_VNNI)
#endif
#else
int kernels_have_panels(void) { return 0; }
#endif

/* ------------------------------------------------------------------ bfloat16 dot-product matmuls

   On a CPU with AVX512_BF16 (vdpbf16ps: 32 bfloat16 products summed into 16 float32 lanes per
   instruction, twice the float32 FMA rate) over the same panels: the matmul input x is rounded to
   bfloat16 (as the amx path rounds it), the weights stay exact, and the inner loop is one vdpbf16ps
   per pair of inputs (the pair broadcast to every lane). A Q4_1 nibble q becomes the bfloat16
   128 + q by one OR (0x4300 | q), so the sum carries 128 * sum x, taken back with m' = m - 128 d. */
#if defined(__AVX512F__)
#define DOT_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c,fma")))
#ifndef DBR
#define DBR 8
#endif /* batch rows per register tile: 3 x DBR accumulators + the weights fit 32 registers */

/* y[b, n0 + r] for r < nr, b < br: one panel P times bfloat16 rows xb [br, K], with xs [br, K / 32]
   the block sums of xb (Q4_1's m term) */
DOT_TARGET static inline __attribute__((always_inline)) void dot_tile(int fmt, const uint8_t *P, const uint16_t *xb,
                                                                      const float *xs, int64_t K, int br, float *y,
                                                                      int64_t ldy, int64_t nr, const float *bias,
                                                                      const uint8_t *pf) {
    const int64_t blocks = K / 32, pbb = panel_block_bytes(fmt);
    __m512 acc[DBR], a0[DBR], a1[DBR];
#pragma GCC unroll 8
    for (int b = 0; b < DBR; b++) acc[b] = _mm512_setzero_ps();
    const __m512i lo4 = _mm512_set1_epi16(0x000F), off = _mm512_set1_epi16(0x4300);
    for (int64_t j = 0; j < blocks; j++) {
        const uint8_t *pb = P + j * pbb;
        if (pf) /* the weights stream from memory once a step: ask for them ahead of the loads */
            for (int64_t l = 0; l < pbb; l += 64) __builtin_prefetch(pf + j * pbb + l, 0, 3);
#pragma GCC unroll 8
        for (int b = 0; b < DBR; b++) a0[b] = a1[b] = _mm512_setzero_ps();
        if (fmt == FMT_Q4_1) {
#pragma GCC unroll 8
            for (int pp = 0; pp < 8; pp++) {
                const __m512i wz = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(pb + 64 + 32 * pp)));
                const __m512i wl = _mm512_ternarylogic_epi32(wz, lo4, off, 0xEA); /* (wz & 15) | 0x4300 */
                const __m512i wh = _mm512_ternarylogic_epi32(_mm512_srli_epi16(wz, 4), lo4, off, 0xEA);
#pragma GCC unroll 8
                for (int b = 0; b < DBR; b++) {
                    if (b < br) {
                        int32_t xl, xh;
                        memcpy(&xl, xb + b * K + j * 32 + 2 * pp, 4);
                        memcpy(&xh, xb + b * K + j * 32 + 16 + 2 * pp, 4);
                        a0[b] = _mm512_dpbf16_ps(a0[b], (__m512bh)wl, (__m512bh)_mm512_set1_epi32(xl));
                        a1[b] = _mm512_dpbf16_ps(a1[b], (__m512bh)wh, (__m512bh)_mm512_set1_epi32(xh));
                    }
                }
            }
            const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)pb));
            const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(pb + 32)));
            const __m512 mp = _mm512_fmadd_ps(d, _mm512_set1_ps(-128.f), m);
#pragma GCC unroll 8
            for (int b = 0; b < DBR; b++) {
                if (b < br) {
                    acc[b] = _mm512_fmadd_ps(_mm512_add_ps(a0[b], a1[b]), d, acc[b]);
                    acc[b] = _mm512_fmadd_ps(mp, _mm512_set1_ps(xs[b * blocks + j]), acc[b]);
                }
            }
        } else {
            const uint8_t *q = pb + (fmt == FMT_Q8_0 ? 32 : 0);
#pragma GCC unroll 16
            for (int pp = 0; pp < 16; pp++) {
                const __m512i w = _mm512_loadu_si512((const void *)(q + 64 * pp));
#pragma GCC unroll 8
                for (int b = 0; b < DBR; b++) {
                    if (b < br) {
                        int32_t xv;
                        memcpy(&xv, xb + b * K + j * 32 + 2 * pp, 4);
                        if (pp % 2)
                            a1[b] = _mm512_dpbf16_ps(a1[b], (__m512bh)w, (__m512bh)_mm512_set1_epi32(xv));
                        else
                            a0[b] = _mm512_dpbf16_ps(a0[b], (__m512bh)w, (__m512bh)_mm512_set1_epi32(xv));
                    }
                }
            }
            if (fmt == FMT_Q8_0) {
                const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)pb));
#pragma GCC unroll 8
                for (int b = 0; b < DBR; b++)
                    if (b < br) acc[b] = _mm512_fmadd_ps(_mm512_add_ps(a0[b], a1[b]), d, acc[b]);
            } else {
#pragma GCC unroll 8
                for (int b = 0; b < DBR; b++)
                    if (b < br) acc[b] = _mm512_add_ps(acc[b], _mm512_add_ps(a0[b], a1[b]));
            }
        }
    }
    const __mmask16 mask = nr >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nr) - 1);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int b = 0; b < DBR; b++)
        if (b < br) _mm512_mask_storeu_ps(y + b * ldy, mask, _mm512_add_ps(acc[b], bv));
}

DOT_TARGET static inline __attribute__((always_inline)) void gemm_dot_impl(int fmt, const uint8_t *W, const float *x,
                                                                           float *y, const float *bias, int64_t B,
                                                                           int64_t K, int64_t N) {
    const int64_t blocks = K / 32, panels = (N + 15) / 16, pstride = blocks * panel_block_bytes(fmt);
    /* every thread rounds x itself (a few microseconds): no barrier before the panels */
    uint16_t *xb = aligned_alloc(64, (size_t)(B * K * 2 + 63) / 64 * 64);
    float *xs = aligned_alloc(64, (size_t)(B * blocks * 4 + 63) / 64 * 64);
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < blocks; j++) {
            const __m512 v0 = _mm512_loadu_ps(x + b * K + j * 32), v1 = _mm512_loadu_ps(x + b * K + j * 32 + 16);
            const __m256bh h0 = _mm512_cvtneps_pbh(v0), h1 = _mm512_cvtneps_pbh(v1);
            _mm256_storeu_si256((__m256i *)(xb + b * K + j * 32), (__m256i)h0);
            _mm256_storeu_si256((__m256i *)(xb + b * K + j * 32 + 16), (__m256i)h1);
            const __m512 r0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h0), 16));
            const __m512 r1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h1), 16));
            xs[b * blocks + j] = _mm512_reduce_add_ps(_mm512_add_ps(r0, r1));
        }
#pragma omp for schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        const int64_t n0 = p * 16, nr = N - n0 < 16 ? N - n0 : 16;
        const uint8_t *P = W + p * pstride;
        const float *pbias = bias ? bias + n0 : NULL;
        int64_t b0 = 0;
        for (; b0 + DBR <= B; b0 += DBR)
            dot_tile(fmt, P, xb + b0 * K, xs + b0 * blocks, K, DBR, y + b0 * N + n0, N, nr, pbias,
                     b0 ? NULL : P + PF_AHEAD);
#define DOT_REST(r)                                                                                  \
    case r:                                                                                          \
        dot_tile(fmt, P, xb + b0 * K, xs + b0 * blocks, K, r, y + b0 * N + n0, N, nr, pbias,        \
                 b0 ? NULL : P + PF_AHEAD);                                                          \
        break;
        switch (B - b0) { /* constant row counts: the tile's loops unroll */
            DOT_REST(7) DOT_REST(6) DOT_REST(5) DOT_REST(4) DOT_REST(3) DOT_REST(2) DOT_REST(1)
        default: break;
        }
#undef DOT_REST
    }
    free(xb);
    free(xs);
}

/* y [B, N] = bf16(x [B, K]) @ W^T (+ bias) for W packed by pack_panels; only where the CPU has
   AVX512_BF16 (cpu_isa.py checks) */
DOT_TARGET void gemm_dot_q4_1p(const uint8_t *W, const float *x, float *y, const float *bias, int64_t B, int64_t K,
                               int64_t N) {
#pragma omp parallel
    gemm_dot_impl(FMT_Q4_1, W, x, y, bias, B, K, N);
}
DOT_TARGET void gemm_dot_q8_0p(const uint8_t *W, const float *x, float *y, const float *bias, int64_t B, int64_t K,
                               int64_t N) {
#pragma omp parallel
    gemm_dot_impl(FMT_Q8_0, W, x, y, bias, B, K, N);
}
DOT_TARGET void gemm_dot_bf16p(const uint8_t *W, const float *x, float *y, const float *bias, int64_t B, int64_t K,
                               int64_t N) {
#pragma omp parallel
    gemm_dot_impl(FMT_BF16, W, x, y, bias, B, K, N);
}
int kernels_have_dot(void) { return 1; }
#else
int kernels_have_dot(void) { return 0; }
#endif

/* ------------------------------------------------------------------ a whole decode step's layers

   decode_layers runs every layer of a decode-only step (one new token per sequence, B rows, float32
   activations: the avx512 / avx2 paths) in one call and one OpenMP region. Per layer: the qkv
   matmul, the attention (decode_attention_items), o_proj, gate_up, down_proj, each an orphaned
   `omp for` whose closing barrier orders it before the next; add_rmsnorm and silu_mul run in every
   thread on its own copy of the rows (a few microseconds), so a layer has 5 barriers. Against a
   ctypes call and a parallel region per kernel (11 fork / join / barrier points a layer) this saves
   the calls (~1 ms a step) and, on a busy box, most of the stalls: every barrier waits for the
   slowest thread, and on 2 cores shared with the server's other processes one is often preempted.
   Bit-identical to the kernel-per-op loop (the same row functions, not inlined).

   desc: DESC_FIELDS int64s per layer (cpu_forward.py fills them):
     for each of qkv, o, gate_up, down: format (FMT_* of gemm_*, or FMA_FMT / DOT_FMT / I16_FMT /
     I16V_FMT + FMT_* for the panels of gemm_fma_* / gemm_dot_* / gemm_i16_* / gemm_i16v_*), weight pointer, bias pointer (or 0); then post_norm, next_norm, q_norm (or 0),
     k_norm (or 0), k_pool, v_pool of the layer.
   On entry x = rmsnorm(residual) * the first layer's input norm; on return x = the final norm of the
   updated residual (for the logits), and residual updated. */
#define DESC_FIELDS 18
#define DOT_FMT 4
#define FMA_FMT 8
#define I16_FMT 12
#define I16V_FMT 16

static void gemm_body_f32(const uint8_t *W, const float *x, float *y, const float *b, int64_t B, int64_t K, int64_t N) {
    gemm_impl(FMT_F32, W, x, y, b, B, K, N);
}
static void gemm_body_bf16(const uint8_t *W, const float *x, float *y, const float *b, int64_t B, int64_t K, int64_t N) {
    gemm_impl(FMT_BF16, W, x, y, b, B, K, N);
}
static void gemm_body_q8_0(const uint8_t *W, const float *x, float *y, const float *b, int64_t B, int64_t K, int64_t N) {
    gemm_impl(FMT_Q8_0, W, x, y, b, B, K, N);
}
static void gemm_body_q4_1(const uint8_t *W, const float *x, float *y, const float *b, int64_t B, int64_t K, int64_t N) {
    gemm_impl(FMT_Q4_1, W, x, y, b, B, K, N);
}
#if defined(__AVX2__)
static void gemm_i16_body(int fmt, const uint8_t *W, const float *x, float *y, const float *b, int64_t B,
                          int64_t K, int64_t N) {
    if (fmt == FMT_Q8_0) gemm_i16_impl(FMT_Q8_0, W, x, y, b, B, K, N);
    else gemm_i16_impl(FMT_Q4_1, W, x, y, b, B, K, N);
}
/* not inlined: the caller is built without VNNI, and only runs this where the CPU has it */
#if defined(__AVX512F__)
__attribute__((target("avx512vnni"), noinline))
#else
__attribute__((target("avxvnni"), noinline))
#endif
static void gemm_i16v_body(int fmt, const uint8_t *W, const float *x, float *y, const float *b, int64_t B,
                           int64_t K, int64_t N) {
    if (fmt == FMT_Q8_0) gemm_i16_implv(FMT_Q8_0, W, x, y, b, B, K, N);
    else gemm_i16_implv(FMT_Q4_1, W, x, y, b, B, K, N);
}
static void gemm_fma_body(int fmt, const uint8_t *W, const float *x, float *y, const float *b, int64_t B, int64_t K,
                          int64_t N) {
    switch (fmt) { /* a constant format in each: the tile's loops specialize */
    case FMT_Q4_1: gemm_fma_impl(FMT_Q4_1, W, x, y, b, B, K, N); break;
    case FMT_Q8_0: gemm_fma_impl(FMT_Q8_0, W, x, y, b, B, K, N); break;
    default: gemm_fma_impl(FMT_BF16, W, x, y, b, B, K, N); break;
    }
}
#endif
#if defined(__AVX512F__)
/* not inlined: the caller is built without AVX512_BF16, and only runs these where the CPU has it */
DOT_TARGET __attribute__((noinline)) static void gemm_dot_body(int fmt, const uint8_t *W, const float *x, float *y,
                                                               const float *b, int64_t B, int64_t K, int64_t N) {
    switch (fmt) { /* a constant format in each: the tile's loops specialize */
    case FMT_Q4_1: gemm_dot_impl(FMT_Q4_1, W, x, y, b, B, K, N); break;
    case FMT_Q8_0: gemm_dot_impl(FMT_Q8_0, W, x, y, b, B, K, N); break;
    default: gemm_dot_impl(FMT_BF16, W, x, y, b, B, K, N); break;
    }
}
#endif

static void gemm_any(const int64_t *d, const float *x, float *y, int64_t B, int64_t K, int64_t N) {
    const uint8_t *W = (const uint8_t *)(intptr_t)d[1];
    const float *bias = (const float *)(intptr_t)d[2];
    switch (d[0]) {
    case FMT_F32: gemm_body_f32(W, x, y, bias, B, K, N); break;
    case FMT_BF16: gemm_body_bf16(W, x, y, bias, B, K, N); break;
    case FMT_Q8_0: gemm_body_q8_0(W, x, y, bias, B, K, N); break;
    case FMT_Q4_1: gemm_body_q4_1(W, x, y, bias, B, K, N); break;
    default:
#if defined(__AVX2__)
        if (d[0] >= I16V_FMT) {
            gemm_i16v_body((int)(d[0] - I16V_FMT), W, x, y, bias, B, K, N);
            break;
        }
        if (d[0] >= I16_FMT) {
            gemm_i16_body((int)(d[0] - I16_FMT), W, x, y, bias, B, K, N);
            break;
        }
        if (d[0] >= FMA_FMT) {
            gemm_fma_body((int)(d[0] - FMA_FMT), W, x, y, bias, B, K, N);
            break;
        }
#endif
#if defined(__AVX512F__)
        gemm_dot_body((int)(d[0] - DOT_FMT), W, x, y, bias, B, K, N);
#endif
        break; /* cpu_forward.py only hands this build the formats it has */
    }
}

/* decode_attention_impl as one parallel loop over (sequence, kv head): each item prepares the new
   k / v of its own kv head and the queries of its group, then attends; no item reads what another
   writes, so one barrier a layer instead of two. The same per-head operations, so the same bits. */
static inline __attribute__((always_inline)) void decode_attention_items(
    const float *qkv, const float *q_norm_w, const float *k_norm_w, float eps, const float *cos_sin,
    const int64_t *positions, float *k_pool, float *v_pool, const int64_t *write_slots, const int64_t *table,
    int64_t table_stride, const int64_t *lens, float *out, float *scratch, int64_t B, int64_t H, int64_t Hkv,
    int64_t D, float scale) {
    const int64_t G = H / Hkv, width = (H + 2 * Hkv) * D, kv_row = Hkv * D;
    float *q_all = scratch, *scores_all = scratch + B * H * D;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < B * Hkv; item++) {
        const int64_t b = item / Hkv, kv = item % Hkv;
        const float *src = qkv + b * width;
        const float *cs = cos_sin + positions[b] * 2 * D;
        float *qg = q_all + (b * H + kv * G) * D;
        for (int64_t g = 0; g < G; g++) {
            float *q = qg + g * D;
            memcpy(q, src + (kv * G + g) * D, D * sizeof(float));
            if (q_norm_w) rmsnorm_inplace(q, q_norm_w, D, eps);
            rope_inplace(q, cs, D);
        }
        float *k_new = k_pool + write_slots[b] * kv_row + kv * D, *v_new = v_pool + write_slots[b] * kv_row + kv * D;
        memcpy(k_new, src + H * D + kv * D, D * sizeof(float));
        memcpy(v_new, src + H * D + kv_row + kv * D, D * sizeof(float));
        if (k_norm_w) rmsnorm_inplace(k_new, k_norm_w, D, eps);
        rope_inplace(k_new, cs, D);
        float *scores = scores_all + (b * H + kv * G) * table_stride;
        const int64_t *slots = table + b * table_stride;
        float *o = out + b * H * D + kv * G * D;
        if (D == 64 && G <= 8)
            ATTEND_64[G - 1](qg, k_pool, v_pool, slots, lens[b], kv * D, kv_row, scores, o, scale, 0);
        else if (D == 128 && G <= 8)
            ATTEND_128[G - 1](qg, k_pool, v_pool, slots, lens[b], kv * D, kv_row, scores, o, scale, 0);
        else
            attend(qg, k_pool, v_pool, slots, lens[b], kv * D, kv_row, scores, o, G, D, scale, 0);
    }
}

void decode_layers(const int64_t *desc, int64_t n_layers, float *residual, float *x, float *qkv, float *attn,
                   float *o, float *gate_up, float *act, float *down, int64_t B, int64_t hidden, int64_t inter,
                   int64_t H, int64_t Hkv, int64_t D, float eps, const float *cos_sin, const int64_t *positions,
                   const int64_t *write_slots, const int64_t *table, int64_t table_stride, const int64_t *lens,
                   float *scratch, float scale) {
    const int64_t n_qkv = (H + 2 * Hkv) * D;
    (void)act;
    /* Each thread keeps its own copy of the residual stream and of each matmul's input, and does the
       row ops (add_rmsnorm, silu_mul: a few microseconds) itself, right after the matmul they follow:
       the barriers left are the five the matmuls and the attention need (their outputs are split
       between the threads). */
#pragma omp parallel
    {
        float *r = malloc((size_t)(B * hidden) * sizeof(float));
        float *xin = malloc((size_t)(B * (hidden > inter ? hidden : inter)) * sizeof(float));
        memcpy(r, residual, (size_t)(B * hidden) * sizeof(float));
        memcpy(xin, x, (size_t)(B * hidden) * sizeof(float));
        for (int64_t l = 0; l < n_layers; l++) {
            const int64_t *d = desc + l * DESC_FIELDS;
            const float *post_norm = (const float *)(intptr_t)d[12], *next_norm = (const float *)(intptr_t)d[13];
            const float *q_norm = (const float *)(intptr_t)d[14], *k_norm = (const float *)(intptr_t)d[15];
            float *k_pool = (float *)(intptr_t)d[16], *v_pool = (float *)(intptr_t)d[17];
            gemm_any(d, xin, qkv, B, hidden, n_qkv);
            decode_attention_items(qkv, q_norm, k_norm, eps, cos_sin, positions, k_pool, v_pool, write_slots, table,
                                   table_stride, lens, attn, scratch, B, H, Hkv, D, scale);
            gemm_any(d + 3, attn, o, B, H * D, hidden);
            for (int64_t t = 0; t < B; t++) add_rmsnorm_row_f32(r + t * hidden, o, post_norm, xin, t, hidden, eps);
            gemm_any(d + 6, xin, gate_up, B, hidden, 2 * inter);
            for (int64_t t = 0; t < B; t++) silu_mul_row_f32(gate_up, xin, t, inter);
            gemm_any(d + 9, xin, down, B, inter, hidden);
            for (int64_t t = 0; t < B; t++) add_rmsnorm_row_f32(r + t * hidden, down, next_norm, xin, t, hidden, eps);
        }
#pragma omp single nowait
        {
            memcpy(residual, r, (size_t)(B * hidden) * sizeof(float));
            memcpy(x, xin, (size_t)(B * hidden) * sizeof(float));
        }
        free(r);
        free(xin);
    }
}
