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

Activations between matmuls are bfloat16 (the matmuls' dtype); everything is computed in float32 and
rounded to bfloat16 once (round to nearest even, as torch's .to(torch.bfloat16)). The residual stream
and the KV pool are float32. Loops over sequences and heads run on OpenMP threads when the library is
built against the OpenMP runtime torch itself uses (one thread pool for both; see cpu_kernels.py).
*/
#include <math.h>
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

static void rmsnorm_inplace(float *x, const float *w, int64_t n, float eps) {
    const float inv = rms_scale(x, n, eps);
#pragma omp simd
    for (int64_t i = 0; i < n; i++) x[i] = x[i] * inv * w[i];
}

/* residual [T, D] float32 (updated in place); delta [T, D] bfloat16 or NULL; w [D]; out [T, D] bf16 */
void add_rmsnorm(float *residual, const uint16_t *delta, const float *w, uint16_t *out, int64_t T, int64_t D,
                 float eps) {
#pragma omp parallel for schedule(static) if (T * D >= 16384)
    for (int64_t t = 0; t < T; t++) {
        float *r = residual + t * D;
        uint16_t *o = out + t * D;
        if (delta) {
            const uint16_t *d = delta + t * D;
#pragma omp simd
            for (int64_t i = 0; i < D; i++) r[i] += bf16_to_f32(d[i]);
        }
        const float inv = rms_scale(r, D, eps);
#pragma omp simd
        for (int64_t i = 0; i < D; i++) o[i] = f32_to_bf16(r[i] * inv * w[i]);
    }
}

/* gate_up [T, 2I] bf16 (gate | up); out [T, I] bf16 */
void silu_mul(const uint16_t *gate_up, uint16_t *out, int64_t T, int64_t I) {
#pragma omp parallel for schedule(static) if (T * I >= 16384)
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *g = gate_up + t * 2 * I, *u = g + I;
        uint16_t *o = out + t * I;
#pragma omp simd
        for (int64_t i = 0; i < I; i++) {
            const float x = bf16_to_f32(g[i]);
            o[i] = f32_to_bf16(x / (1.f + exp_fast(-x)) * bf16_to_f32(u[i]));
        }
    }
}

/* x [D] float32, rotated in place (neox style); cs = cos|cos then -sin|sin, 2 * D floats */
static void rope_inplace(float *x, const float *cs, int64_t D) {
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

/* Attention of query heads qg [G, D] (one kv head) over L keys/values read through `slots`. */
static inline __attribute__((always_inline)) void attend(const float *qg, const float *k_pool,
                                                         const float *v_pool, const int64_t *slots, int64_t L,
                                                         int64_t kv_off, int64_t kv_row, float *scores,
                                                         uint16_t *out, int64_t G, int64_t D, float scale) {
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
        for (int64_t i = 0; i < D; i++) out[g * D + i] = f32_to_bf16(acc[g * D + i]);
    }
}

/*
 qkv      [B, (H + 2 Hkv) D] bf16: q heads | k heads | v heads, the qkv matmul's output
 q_norm_w, k_norm_w [D] or NULL (Qwen3's per-head RMSNorm before RoPE)
 cos_sin  [max_pos, 2, D] float32; positions [B]
 k_pool, v_pool [slots, Hkv, D] float32; write_slots [B]: where this step's k/v go
 table    [B, table_stride]: table[b, l] is the slot of token l of sequence b; lens [B] (this token included)
 out      [B, H D] bf16
 scratch  float32, at least B * H * (D + table_stride) floats
 Query heads h = kv * G + g share kv head `kv` (grouped-query attention). Two parallel loops: first
 every sequence's q/k/v (the new k/v land in the pool), then the (sequence, kv head) pairs.
*/
void decode_attention(const uint16_t *qkv, const float *q_norm_w, const float *k_norm_w, float eps,
                      const float *cos_sin, const int64_t *positions, float *k_pool, float *v_pool,
                      const int64_t *write_slots, const int64_t *table, int64_t table_stride, const int64_t *lens,
                      uint16_t *out, float *scratch, int64_t B, int64_t H, int64_t Hkv, int64_t D, float scale) {
    const int64_t G = H / Hkv, width = (H + 2 * Hkv) * D, kv_row = Hkv * D;
    float *q_all = scratch;               /* [B, H, D] */
    float *scores_all = scratch + B * H * D; /* [B, H, table_stride] */
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) {
            const uint16_t *src = qkv + b * width;
            float *q = q_all + b * H * D;
            float *k_new = k_pool + write_slots[b] * kv_row, *v_new = v_pool + write_slots[b] * kv_row;
            for (int64_t i = 0; i < H * D; i++) q[i] = bf16_to_f32(src[i]);
            for (int64_t i = 0; i < kv_row; i++) {
                k_new[i] = bf16_to_f32(src[H * D + i]);
                v_new[i] = bf16_to_f32(src[H * D + kv_row + i]);
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
            uint16_t *o = out + b * H * D + kv * G * D;
            const int64_t *slots = table + b * table_stride;
            /* constant head dims let the compiler unroll the dot products */
            if (D == 64)
                attend(qg, k_pool, v_pool, slots, lens[b], kv * D, kv_row, scores, o, G, 64, scale);
            else if (D == 128)
                attend(qg, k_pool, v_pool, slots, lens[b], kv * D, kv_row, scores, o, G, 128, scale);
            else
                attend(qg, k_pool, v_pool, slots, lens[b], kv * D, kv_row, scores, o, G, D, scale);
        }
    }
}
