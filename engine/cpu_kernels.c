/* CPU kernels for the engine's hot path (fp32). Built by engine/cpu_kernels.py with the system C
 * compiler at engine start (no torch headers: about a second) and called through ctypes on the
 * data pointers of torch tensors. Every function is single-threaded and touches only the memory
 * its arguments describe; callers check shapes, dtypes, contiguity and devices.
 *
 * Determinism: each output element is computed in a fixed order that depends only on that row's
 * own inputs (never on the batch, the block size or the thread), so results are batch invariant.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* exp(x) for float, in plain arithmetic so that loops over it vectorise (glibc's expf does not
 * without -ffast-math). Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, degree-5 polynomial;
 * within 2 ulp of expf over the clamped range; exp(x < -87.3) flushes to ~0 as expf does. */
static inline float exp_f32(float x) {
    x = x > 88.72f ? 88.72f : x;
    x = x < -87.33f ? -87.33f : x;
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * r * r + r + 1.0f;
    union {
        int32_t i;
        float f;
    } scale = {.i = ((int32_t)n + 127) << 23}; /* 2^n */
    return y * scale.f;
}

/* Decode attention (one new query token per row) read in place from the paged KV pool.
 *
 * q:            [B, Hq, D] contiguous, already rotated
 * k/v_cache:    one layer's K or V view of the pool: element (blk, t, h, d) lives at
 *               blk * block_stride + t * token_stride + h * D + d   (units: floats)
 * block_tables: [B, table_width] int64; row b's token t is in block block_tables[b, t / bs]
 * seq_lens:     [B] int64, tokens of context per row, including the new one (>= 1)
 * out:          [B, Hq, D] contiguous
 * Query head h attends with KV head h / (Hq / Hk) (grouped-query attention).
 * Returns 0, or -1 when scratch memory cannot be allocated.
 */
#ifndef PREFETCH_TOKENS
#define PREFETCH_TOKENS 4
#endif

/* Prefetch one token's [Hk, D] floats (contiguous) into cache, 64-byte line by line. */
static inline void prefetch_token(const float *p, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(p + i, 0, 3);
}

/* One row, all heads: stream the row's tokens once for K (each token's [Hk, D] is contiguous)
 * and once for V. D is a compile-time constant in the specialised copies below. */
static inline void decode_row(const float *restrict qb, const float *restrict k_cache,
                              const float *restrict v_cache, int64_t block_stride,
                              int64_t token_stride, const int64_t *restrict table, int64_t len,
                              float *restrict ob, float *restrict scores, int64_t Hq, int64_t G,
                              const int64_t D, int64_t bs, float scale) {
    /* The context is memory-bound (every K/V byte is read once per step): prefetch a few
     * tokens ahead, across block boundaries the hardware prefetcher cannot foresee. */
    for (int64_t t = 0; t < len; t++) {
        const float *kt = k_cache + table[t / bs] * block_stride + (t % bs) * token_stride;
        if (t + PREFETCH_TOKENS < len) {
            const int64_t u = t + PREFETCH_TOKENS;
            prefetch_token(k_cache + table[u / bs] * block_stride + (u % bs) * token_stride,
                           Hq / G * D);
        }
        for (int64_t h = 0; h < Hq; h++) {
            const float *qh = qb + h * D;
            const float *kh = kt + (h / G) * D;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t d = 0; d < D; d++) acc += qh[d] * kh[d];
            scores[h * len + t] = acc * scale;
        }
    }
    for (int64_t h = 0; h < Hq; h++) {
        float *s = scores + h * len;
        float m = -INFINITY;
        for (int64_t t = 0; t < len; t++) m = s[t] > m ? s[t] : m;
#pragma omp simd
        for (int64_t t = 0; t < len; t++) s[t] = exp_f32(s[t] - m);
        float sum = 0.0f;
        for (int64_t t = 0; t < len; t++) sum += s[t];
        const float inv = 1.0f / sum;
        for (int64_t t = 0; t < len; t++) s[t] *= inv;
        for (int64_t d = 0; d < D; d++) ob[h * D + d] = 0.0f;
    }
    for (int64_t t = 0; t < len; t++) {
        const float *vt = v_cache + table[t / bs] * block_stride + (t % bs) * token_stride;
        if (t + PREFETCH_TOKENS < len) {
            const int64_t u = t + PREFETCH_TOKENS;
            prefetch_token(v_cache + table[u / bs] * block_stride + (u % bs) * token_stride,
                           Hq / G * D);
        }
        for (int64_t h = 0; h < Hq; h++) {
            const float p = scores[h * len + t];
            const float *vh = vt + (h / G) * D;
            float *oh = ob + h * D;
#pragma omp simd
            for (int64_t d = 0; d < D; d++) oh[d] += p * vh[d];
        }
    }
}

int paged_decode_attention_f32(const float *q, const float *k_cache, const float *v_cache,
                               int64_t block_stride, int64_t token_stride,
                               const int64_t *block_tables, int64_t table_width,
                               const int64_t *seq_lens, float *out, int64_t B, int64_t Hq,
                               int64_t Hk, int64_t D, int64_t bs, float scale) {
    const int64_t G = Hq / Hk;
    int64_t max_len = 0;
    for (int64_t b = 0; b < B; b++)
        if (seq_lens[b] > max_len) max_len = seq_lens[b];
    float *scores = malloc(sizeof(float) * (size_t)(Hq * max_len));
    if (scores == NULL) return -1;
    for (int64_t b = 0; b < B; b++) {
        const float *qb = q + b * Hq * D;
        float *ob = out + b * Hq * D;
        const int64_t *table = block_tables + b * table_width;
        const int64_t len = seq_lens[b];
        /* constant D lets the compiler unroll the dot products into whole vectors */
        if (D == 64)
            decode_row(qb, k_cache, v_cache, block_stride, token_stride, table, len, ob, scores,
                       Hq, G, 64, bs, scale);
        else if (D == 128)
            decode_row(qb, k_cache, v_cache, block_stride, token_stride, table, len, ob, scores,
                       Hq, G, 128, bs, scale);
        else
            decode_row(qb, k_cache, v_cache, block_stride, token_stride, table, len, ob, scores,
                       Hq, G, D, bs, scale);
    }
    free(scores);
    return 0;
}

/* x [N, H] with rows `x_stride` floats apart -> out [N, H] contiguous:
 * out = weight * x / sqrt(mean(x^2) + eps)   (Llama RMSNorm in float32) */
void rms_norm_f32(const float *x, int64_t x_stride, const float *weight, float *out, int64_t N,
                  int64_t H, float eps) {
    for (int64_t n = 0; n < N; n++) {
        const float *xn = x + n * x_stride;
        float *on = out + n * H;
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t h = 0; h < H; h++) ss += xn[h] * xn[h];
        const float r = 1.0f / sqrtf(ss / (float)H + eps);
#pragma omp simd
        for (int64_t h = 0; h < H; h++) on[h] = weight[h] * (xn[h] * r);
    }
}

/* gate_up [N, 2I] contiguous (gate then up) -> out [N, I]: silu(gate) * up */
void silu_mul_f32(const float *gate_up, float *out, int64_t N, int64_t I) {
    for (int64_t n = 0; n < N; n++) {
        const float *restrict g = gate_up + n * 2 * I;
        const float *restrict u = gate_up + n * 2 * I + I;
        float *restrict o = out + n * I;
#pragma omp simd
        for (int64_t i = 0; i < I; i++) o[i] = g[i] / (1.0f + exp_f32(-g[i])) * u[i];
    }
}

/* Rotate-half RoPE in place. x: N tokens of H heads of D floats; token n's head h starts at
 * x + n * token_stride + h * D. cos/sin: [max_positions, D] tables; positions [N] int64.
 * Same arithmetic as x * cos + rotate_half(x) * sin, element by element. */
void rope_f32(float *x, int64_t token_stride, const int64_t *positions, const float *cos_table,
              const float *sin_table, int64_t N, int64_t H, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t n = 0; n < N; n++) {
        const float *c = cos_table + positions[n] * D;
        const float *s = sin_table + positions[n] * D;
        for (int64_t h = 0; h < H; h++) {
            float *xh = x + n * token_stride + h * D;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                const float x1 = xh[i], x2 = xh[i + half];
                xh[i] = x1 * c[i] - x2 * s[i];
                xh[i + half] = x2 * c[i + half] + x1 * s[i + half];
            }
        }
    }
}

/* Write N new tokens' K and V into the pool: token n goes to block slot_blocks[n], offset
 * slot_offsets[n]. k/v: rows of row_len floats (contiguous), `k_stride`/`v_stride` apart. */
void kv_write_f32(const float *k, int64_t k_stride, const float *v, int64_t v_stride,
                  float *k_cache, float *v_cache, int64_t block_stride, int64_t token_stride,
                  const int64_t *slot_blocks, const int64_t *slot_offsets, int64_t N,
                  int64_t row_len) {
    for (int64_t n = 0; n < N; n++) {
        const int64_t at = slot_blocks[n] * block_stride + slot_offsets[n] * token_stride;
        memcpy(k_cache + at, k + n * k_stride, sizeof(float) * (size_t)row_len);
        memcpy(v_cache + at, v + n * v_stride, sizeof(float) * (size_t)row_len);
    }
}
