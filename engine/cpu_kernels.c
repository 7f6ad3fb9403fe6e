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
/* One row, all heads: stream the row's tokens once for K (each token's [Hk, D] is contiguous)
 * and once for V. D is a compile-time constant in the specialised copies below. */
static inline void decode_row(const float *restrict qb, const float *restrict k_cache,
                              const float *restrict v_cache, int64_t block_stride,
                              int64_t token_stride, const int64_t *restrict table, int64_t len,
                              float *restrict ob, float *restrict scores, int64_t Hq, int64_t G,
                              const int64_t D, int64_t bs, float scale) {
    for (int64_t t = 0; t < len; t++) {
        const float *kt = k_cache + table[t / bs] * block_stride + (t % bs) * token_stride;
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
        float sum = 0.0f;
        for (int64_t t = 0; t < len; t++) {
            s[t] = expf(s[t] - m);
            sum += s[t];
        }
        const float inv = 1.0f / sum;
        for (int64_t t = 0; t < len; t++) s[t] *= inv;
        for (int64_t d = 0; d < D; d++) ob[h * D + d] = 0.0f;
    }
    for (int64_t t = 0; t < len; t++) {
        const float *vt = v_cache + table[t / bs] * block_stride + (t % bs) * token_stride;
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
