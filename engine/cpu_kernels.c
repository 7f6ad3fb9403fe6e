/* CPU kernels for the engine's hot path (fp32). Built by engine/cpu_kernels.py with the system C
 * compiler at engine start (no torch headers: about a second) and called through ctypes on the
 * data pointers of torch tensors. Every function touches only the memory its arguments describe;
 * callers check shapes, dtypes, contiguity and devices.
 *
 * Threads: every kernel takes `nt`, the thread count (torch.get_num_threads()), and splits its
 * rows (tokens, or decode rows) over that many OpenMP threads. The library links libgomp.so.1,
 * which resolves to the copy torch has already loaded (same soname), so these parallel regions
 * use torch's one thread pool: no second pool spinning against torch's on the same cores. Small
 * inputs run on the calling thread (a parallel region costs a few microseconds; more when a
 * core is shared).
 *
 * Determinism: each output element is computed by one thread, in a fixed order that depends only
 * on that row's own inputs (never on the batch, the block size, the thread count or which thread
 * runs it), so results are batch invariant.
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
/* 8: 66-68 ms vs 76-81 ms at 4 for 30 layers x 64 rows x 320 tokens on one thread (dev box). */
#ifndef PREFETCH_TOKENS
#define PREFETCH_TOKENS 8
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
                               int64_t Hk, int64_t D, int64_t bs, float scale, int nt) {
    const int64_t G = Hq / Hk;
    int64_t max_len = 0;
    for (int64_t b = 0; b < B; b++)
        if (seq_lens[b] > max_len) max_len = seq_lens[b];
    int failed = 0;
    /* rows are independent: one row per iteration, dynamically handed out (context lengths
     * differ); each thread has its own scores scratch */
#pragma omp parallel num_threads(nt) if (nt > 1 && B > 1)
    {
        float *scores = malloc(sizeof(float) * (size_t)(Hq * max_len));
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < B; b++) {
            if (scores == NULL) continue;
            const float *qb = q + b * Hq * D;
            float *ob = out + b * Hq * D;
            const int64_t *table = block_tables + b * table_width;
            const int64_t len = seq_lens[b];
            /* constant D lets the compiler unroll the dot products into whole vectors */
            if (D == 64)
                decode_row(qb, k_cache, v_cache, block_stride, token_stride, table, len, ob,
                           scores, Hq, G, 64, bs, scale);
            else if (D == 128)
                decode_row(qb, k_cache, v_cache, block_stride, token_stride, table, len, ob,
                           scores, Hq, G, 128, bs, scale);
            else
                decode_row(qb, k_cache, v_cache, block_stride, token_stride, table, len, ob,
                           scores, Hq, G, D, bs, scale);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}

/* Prefill attention (causal, grouped-query) read in place from the paged KV pool, after the
 * chunk's own K/V have been written there.
 *
 * Why not torch SDPA: its CPU flash kernel computes every 256 x 256 chunk's full score matrix
 * and masks half of it (~15 GFLOP/s on the dev box), and a chunk that continues a prefix needed
 * its context gathered out of the pool and a [chunk, context] mask built. This kernel computes
 * only the causal half, over the pool in place, with the G query heads of one KV head sharing
 * every K/V load.
 *
 * One work item: one span, one KV head, PF_ROWS consecutive query tokens (their G heads each:
 * nq = rows * G "query vectors"). Three passes, as the decode kernel:
 *   1. scores: K tiles of PF_KEYS tokens transposed into kt[D][PF_KEYS], PF_QV query vectors at
 *      a time (fmaf over d: PF_QV x PF_KEYS accumulators in registers);
 *   2. exact softmax per query vector over its own keys [0, pos]; probabilities past it are 0;
 *   3. out = P V, keys in order, PF_QV query vectors sharing each V row load.
 * Determinism: a query vector's output depends only on its q and keys [0, pos]: every sum runs
 * over t (or d) in a fixed order, the tile's extra keys contribute exact +0.0 terms, and the
 * softmax sum uses PF_KEYS fixed lanes. So it is the same whatever the chunking, the block size,
 * the batch or the thread (it is not bit-equal to the decode kernel's arithmetic).
 */
#define PF_ROWS 32
#define PF_KEYS 16
#define PF_QV 8 /* query vectors per register tile in pass 1 (a multiple of PF_QV3) */

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* Pass 1 for one tile of PF_QV query vectors x PF_KEYS keys:
 * acc[a][j] = fmaf(q[a][d], kt[d][j], acc[a][j]) over d = 0..D-1, in that order. */
static inline void scores_tile(const float *restrict qbuf, const float *restrict kt, int64_t D,
                               float acc[PF_QV][PF_KEYS]) {
#if defined(__AVX512F__)
    __m512 r[PF_QV];
    for (int a = 0; a < PF_QV; a++) r[a] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d++) {
        const __m512 k = _mm512_loadu_ps(kt + d * PF_KEYS);
        for (int a = 0; a < PF_QV; a++)
            r[a] = _mm512_fmadd_ps(_mm512_set1_ps(qbuf[a * D + d]), k, r[a]);
    }
    for (int a = 0; a < PF_QV; a++) _mm512_storeu_ps(acc[a], r[a]);
#else
    for (int a = 0; a < PF_QV; a++)
        for (int j = 0; j < PF_KEYS; j++) acc[a][j] = 0.0f;
    for (int64_t d = 0; d < D; d++)
        for (int a = 0; a < PF_QV; a++) {
            const float qa = qbuf[a * D + d];
#pragma omp simd
            for (int j = 0; j < PF_KEYS; j++) acc[a][j] = fmaf(qa, kt[d * PF_KEYS + j], acc[a][j]);
        }
#endif
}

/* Pass 3 for QV query vectors: o[a][d] = sum over t < len, in order, of fmaf(P[a][t], v_t[d], .).
 * P rows are `p_stride` apart; V is walked block by block (no division per token). */
static inline void pv_rows(const float *restrict P, int64_t p_stride, int QV,
                           const float *restrict v_cache, int64_t block_stride,
                           int64_t token_stride, const int64_t *restrict table, int64_t len,
                           int64_t bs, const int64_t D, float *restrict o) {
#if defined(__AVX512F__)
    if (D == 64 && QV == 4) { /* 16 accumulators in registers */
        __m512 r[4][4];
        for (int a = 0; a < 4; a++)
            for (int c = 0; c < 4; c++) r[a][c] = _mm512_setzero_ps();
        for (int64_t t0 = 0; t0 < len; t0 += bs) {
            const float *vb = v_cache + table[t0 / bs] * block_stride;
            const int64_t nt = len - t0 < bs ? len - t0 : bs;
            for (int64_t u = 0; u < nt; u++) {
                const float *vp = vb + u * token_stride;
                const __m512 v0 = _mm512_loadu_ps(vp), v1 = _mm512_loadu_ps(vp + 16);
                const __m512 v2 = _mm512_loadu_ps(vp + 32), v3 = _mm512_loadu_ps(vp + 48);
                for (int a = 0; a < 4; a++) {
                    const __m512 p = _mm512_set1_ps(P[a * p_stride + t0 + u]);
                    r[a][0] = _mm512_fmadd_ps(p, v0, r[a][0]);
                    r[a][1] = _mm512_fmadd_ps(p, v1, r[a][1]);
                    r[a][2] = _mm512_fmadd_ps(p, v2, r[a][2]);
                    r[a][3] = _mm512_fmadd_ps(p, v3, r[a][3]);
                }
            }
        }
        for (int a = 0; a < 4; a++)
            for (int c = 0; c < 4; c++) _mm512_storeu_ps(o + a * D + c * 16, r[a][c]);
        return;
    }
#endif
    for (int64_t i = 0; i < QV * D; i++) o[i] = 0.0f;
    for (int64_t t0 = 0; t0 < len; t0 += bs) {
        const float *vb = v_cache + table[t0 / bs] * block_stride;
        const int64_t nt = len - t0 < bs ? len - t0 : bs;
        for (int64_t u = 0; u < nt; u++) {
            const float *vp = vb + u * token_stride;
            for (int a = 0; a < QV; a++) {
                const float p = P[a * p_stride + t0 + u];
                float *oa = o + a * D;
#pragma omp simd
                for (int64_t d = 0; d < D; d++) oa[d] = fmaf(p, vp[d], oa[d]);
            }
        }
    }
}

#define PF_QV3 4 /* query vectors per pass over V */

static inline void prefill_tile(const float *restrict q, int64_t q_stride,
                                const float *restrict k_cache, const float *restrict v_cache,
                                int64_t block_stride, int64_t token_stride,
                                const int64_t *restrict table, int64_t row0, int64_t nrows,
                                int64_t computed, int64_t kh, int64_t Hq, int64_t G,
                                const int64_t D, int64_t bs, float scale, float *restrict out,
                                float *restrict qbuf, float *restrict S, float *restrict kt,
                                float *restrict obuf) {
    const int64_t nq = nrows * G;
    const int64_t nq_pad = (nq + PF_QV - 1) / PF_QV * PF_QV;
    const int64_t len_max = computed + row0 + nrows; /* keys of the tile's last token */
    for (int64_t i = 0; i < nq_pad; i++) {
        float *qi = qbuf + i * D;
        if (i < nq)
            memcpy(qi, q + (row0 + i / G) * q_stride + (kh * G + i % G) * D, sizeof(float) * D);
        else
            memset(qi, 0, sizeof(float) * D);
    }
    /* 1. scores S[i][t] = (q_i . k_t) * scale for t < len_max; rows nq..nq_pad are padding */
    for (int64_t t0 = 0; t0 < len_max; t0 += PF_KEYS) {
        const int64_t nk = len_max - t0 < PF_KEYS ? len_max - t0 : PF_KEYS;
        for (int64_t j = 0; j < PF_KEYS; j++) {
            if (j < nk) {
                const int64_t t = t0 + j;
                const float *kp = k_cache + table[t / bs] * block_stride + (t % bs) * token_stride +
                                  kh * D;
                for (int64_t d = 0; d < D; d++) kt[d * PF_KEYS + j] = kp[d];
            } else {
                for (int64_t d = 0; d < D; d++) kt[d * PF_KEYS + j] = 0.0f;
            }
        }
        for (int64_t i = 0; i < nq_pad; i += PF_QV) {
            float acc[PF_QV][PF_KEYS];
            scores_tile(qbuf + i * D, kt, D, acc);
            for (int a = 0; a < PF_QV; a++)
                for (int64_t j = 0; j < nk; j++) S[(i + a) * len_max + t0 + j] = acc[a][j] * scale;
        }
    }
    /* 2. softmax of each query vector over its own keys [0, computed + row0 + r] */
    for (int64_t i = 0; i < nq_pad; i++) {
        float *si = S + i * len_max;
        if (i >= nq) { /* padding rows: all-zero probabilities */
            memset(si, 0, sizeof(float) * (size_t)len_max);
            continue;
        }
        const int64_t len = computed + row0 + i / G + 1;
        float m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (int64_t t = 0; t < len; t++) m = si[t] > m ? si[t] : m;
#pragma omp simd
        for (int64_t t = 0; t < len; t++) si[t] = exp_f32(si[t] - m);
        float lanes[PF_KEYS] = {0.0f};
        int64_t t = 0;
        for (; t + PF_KEYS <= len; t += PF_KEYS)
#pragma omp simd
            for (int j = 0; j < PF_KEYS; j++) lanes[j] += si[t + j];
        for (int j = 0; t + j < len; j++) lanes[j] += si[t + j];
        float sum = 0.0f;
        for (int j = 0; j < PF_KEYS; j++) sum += lanes[j];
        const float inv = 1.0f / sum;
#pragma omp simd
        for (int64_t u = 0; u < len; u++) si[u] *= inv;
        for (int64_t u = len; u < len_max; u++) si[u] = 0.0f;
    }
    /* 3. out_i = sum_t P[i][t] v_t, PF_QV3 query vectors per pass over V */
    for (int64_t i = 0; i < nq; i += PF_QV3) {
        const int64_t last = (i + PF_QV3 - 1 < nq ? i + PF_QV3 - 1 : nq - 1);
        const int64_t len = computed + row0 + last / G + 1; /* the group's longest context */
        pv_rows(S + i * len_max, len_max, PF_QV3, v_cache + kh * D, block_stride, token_stride,
                table, len, bs, D, obuf);
        for (int64_t a = 0; a < PF_QV3 && i + a < nq; a++) {
            const int64_t r = (i + a) / G, h = kh * G + (i + a) % G;
            memcpy(out + (row0 + r) * Hq * D + h * D, obuf + a * D, sizeof(float) * D);
        }
    }
}

/* q:          [N, Hq, D] rows q_stride floats apart (each token's [Hq, D] contiguous), rotated
 * k/v_cache:  as for the decode kernel; the spans' new K/V are already written
 * tables:     [S, table_width] int64, span s's block table
 * bounds:     [S, 3] int64: (first token of the span in q/out, its tokens, context before it)
 * out:        [N, Hq, D] contiguous; only the spans' rows are written
 * Returns 0, or -1 when scratch memory cannot be allocated. */
int paged_prefill_attention_f32(const float *q, int64_t q_stride, const float *k_cache,
                                const float *v_cache, int64_t block_stride, int64_t token_stride,
                                const int64_t *tables, int64_t table_width,
                                const int64_t *bounds, float *out, int64_t S, int64_t Hq,
                                int64_t Hk, int64_t D, int64_t bs, float scale, int nt) {
    const int64_t G = Hq / Hk;
    int64_t max_ctx = 0, items = 0;
    for (int64_t s = 0; s < S; s++) {
        const int64_t ctx = bounds[s * 3 + 1] + bounds[s * 3 + 2];
        if (ctx > max_ctx) max_ctx = ctx;
        items += (bounds[s * 3 + 1] + PF_ROWS - 1) / PF_ROWS * Hk;
    }
    const int64_t nq_pad = (PF_ROWS * G + PF_QV - 1) / PF_QV * PF_QV;
    int failed = 0;
#pragma omp parallel num_threads(nt) if (nt > 1 && items > 1)
    {
        float *qbuf = malloc(sizeof(float) * (size_t)(nq_pad * D));
        float *scores = malloc(sizeof(float) * (size_t)(nq_pad * max_ctx));
        float *kt = malloc(sizeof(float) * (size_t)(D * PF_KEYS));
        float *obuf = malloc(sizeof(float) * (size_t)(PF_QV3 * D));
        const int ok = qbuf != NULL && scores != NULL && kt != NULL && obuf != NULL;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
        /* items in span order, KV head, row tile: later tiles have more keys, so hand them out
         * dynamically */
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            if (!ok) continue;
            int64_t s = 0, rem = it, tiles = 0;
            for (;; s++) {
                tiles = (bounds[s * 3 + 1] + PF_ROWS - 1) / PF_ROWS;
                if (rem < tiles * Hk) break;
                rem -= tiles * Hk;
            }
            const int64_t kh = rem / tiles, row0 = rem % tiles * PF_ROWS;
            const int64_t first = bounds[s * 3], n = bounds[s * 3 + 1];
            const int64_t nrows = n - row0 < PF_ROWS ? n - row0 : PF_ROWS;
            const float *qs = q + first * q_stride;
            float *os = out + first * Hq * D;
            const int64_t *table = tables + s * table_width;
            const int64_t computed = bounds[s * 3 + 2];
            if (D == 64)
                prefill_tile(qs, q_stride, k_cache, v_cache, block_stride, token_stride, table,
                             row0, nrows, computed, kh, Hq, G, 64, bs, scale, os, qbuf, scores,
                             kt, obuf);
            else if (D == 128)
                prefill_tile(qs, q_stride, k_cache, v_cache, block_stride, token_stride, table,
                             row0, nrows, computed, kh, Hq, G, 128, bs, scale, os, qbuf, scores,
                             kt, obuf);
            else
                prefill_tile(qs, q_stride, k_cache, v_cache, block_stride, token_stride, table,
                             row0, nrows, computed, kh, Hq, G, D, bs, scale, os, qbuf, scores, kt,
                             obuf);
        }
        free(qbuf);
        free(scores);
        free(kt);
        free(obuf);
    }
    return failed ? -1 : 0;
}

/* Parallelise an elementwise kernel only above this many floats of output: below it the
 * parallel region's fork/join costs about what the work does (a decode step's 64 x 576 RMSNorm is
 * ~5 us on one thread, its 64 x 1536 SiLU ~20 us), and on a shared core every region is a
 * barrier that waits for a descheduled thread. 256 Ki: decode-sized calls (64 rows x 1536 =
 * 96 Ki) stay on the calling thread, prefill-sized ones (2,048 x 576 = 1.1 Mi) split. */
#define PAR_MIN_FLOATS (1 << 18)

static inline void rms_norm_row(const float *restrict xn, const float *restrict weight,
                                float *restrict on, int64_t H, float eps) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t h = 0; h < H; h++) ss += xn[h] * xn[h];
    const float r = 1.0f / sqrtf(ss / (float)H + eps);
#pragma omp simd
    for (int64_t h = 0; h < H; h++) on[h] = weight[h] * (xn[h] * r);
}

/* x [N, H] with rows `x_stride` floats apart -> out [N, H] contiguous:
 * out = weight * x / sqrt(mean(x^2) + eps)   (Llama RMSNorm in float32) */
void rms_norm_f32(const float *x, int64_t x_stride, const float *weight, float *out, int64_t N,
                  int64_t H, float eps, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && N * H >= PAR_MIN_FLOATS)
    for (int64_t n = 0; n < N; n++) rms_norm_row(x + n * x_stride, weight, out + n * H, H, eps);
}

/* The residual add fused into the norm that follows it: sum = x + residual (both [N, H]
 * contiguous; written to sum_out), out = rms_norm(sum). Same roundings as torch's add and then
 * rms_norm_f32: one pass instead of two, and no torch op. sum_out may alias residual. */
void add_rms_norm_f32(const float *x, const float *residual, const float *weight, float *sum_out,
                      float *out, int64_t N, int64_t H, float eps, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && N * H >= PAR_MIN_FLOATS)
    for (int64_t n = 0; n < N; n++) {
        const float *xn = x + n * H;
        const float *rn = residual + n * H;
        float *sn = sum_out + n * H;
#pragma omp simd
        for (int64_t h = 0; h < H; h++) sn[h] = xn[h] + rn[h];
        rms_norm_row(sn, weight, out + n * H, H, eps);
    }
}

/* gate_up [N, 2I] contiguous (gate then up) -> out [N, I]: silu(gate) * up */
void silu_mul_f32(const float *gate_up, float *out, int64_t N, int64_t I, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && N * I >= PAR_MIN_FLOATS)
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
              const float *sin_table, int64_t N, int64_t H, int64_t D, int nt) {
    const int64_t half = D / 2;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && N * H * D >= PAR_MIN_FLOATS)
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
                  int64_t row_len, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && N * row_len >= PAR_MIN_FLOATS)
    for (int64_t n = 0; n < N; n++) {
        const int64_t at = slot_blocks[n] * block_stride + slot_offsets[n] * token_stride;
        memcpy(k_cache + at, k + n * k_stride, sizeof(float) * (size_t)row_len);
        memcpy(v_cache + at, v + n * v_stride, sizeof(float) * (size_t)row_len);
    }
}
