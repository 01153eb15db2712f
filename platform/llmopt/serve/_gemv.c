/* Kernels for batch-1 decoding on CPU, fp32: the single-row matrix-vector product y = W x (+ bias), W
 * row-major [m, n], single-query attention over a KV cache, and the rest of a Llama decoder layer for one
 * token around them.
 *
 * Batch-1 decoding reads every weight once per token, so its speed is the rate at which W streams from
 * memory. torch's F.linear on a [1, n] input reaches about half the machine's single-core read bandwidth
 * for Llama-sized layers (768-3072 columns); one sequential pass over W with four independent vector
 * accumulators per row reaches ~90% of it (llmopt.serve._native measures both). Built by llmopt at first
 * use with the system C compiler (-O3 -march=native); llmopt falls back to torch where it cannot build.
 */
#include <math.h>
#include <stddef.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

/* The vector width this build uses: 512, 256, or 0 (no SIMD path; llmopt then keeps torch's kernel). */
int llmopt_gemv_isa(void) {
#if defined(__AVX512F__)
    return 512;
#elif defined(__AVX2__) && defined(__FMA__)
    return 256;
#else
    return 0;
#endif
}

static inline float row_dot(const float *restrict r, const float *restrict x, long n) {
    long i = 0;
    float s = 0.f;
#if defined(__AVX512F__)
    __m512 a = _mm512_setzero_ps(), b = a, c = a, d = a;
    for (; i + 64 <= n; i += 64) {
        a = _mm512_fmadd_ps(_mm512_loadu_ps(r + i), _mm512_loadu_ps(x + i), a);
        b = _mm512_fmadd_ps(_mm512_loadu_ps(r + i + 16), _mm512_loadu_ps(x + i + 16), b);
        c = _mm512_fmadd_ps(_mm512_loadu_ps(r + i + 32), _mm512_loadu_ps(x + i + 32), c);
        d = _mm512_fmadd_ps(_mm512_loadu_ps(r + i + 48), _mm512_loadu_ps(x + i + 48), d);
    }
    for (; i + 16 <= n; i += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(r + i), _mm512_loadu_ps(x + i), a);
    s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 a = _mm256_setzero_ps(), b = a, c = a, d = a;
    for (; i + 32 <= n; i += 32) {
        a = _mm256_fmadd_ps(_mm256_loadu_ps(r + i), _mm256_loadu_ps(x + i), a);
        b = _mm256_fmadd_ps(_mm256_loadu_ps(r + i + 8), _mm256_loadu_ps(x + i + 8), b);
        c = _mm256_fmadd_ps(_mm256_loadu_ps(r + i + 16), _mm256_loadu_ps(x + i + 16), c);
        d = _mm256_fmadd_ps(_mm256_loadu_ps(r + i + 24), _mm256_loadu_ps(x + i + 24), d);
    }
    for (; i + 8 <= n; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(r + i), _mm256_loadu_ps(x + i), a);
    __m256 t = _mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    h = _mm_hadd_ps(h, h);
    h = _mm_hadd_ps(h, h);
    s = _mm_cvtss_f32(h);
#endif
    for (; i < n; i++) s += r[i] * x[i];
    return s;
}

void llmopt_gemv(const float *restrict W, const float *restrict x, const float *restrict bias,
                 float *restrict y, long m, long n) {
    for (long o = 0; o < m; o++) y[o] = row_dot(W + o * n, x, n) + (bias ? bias[o] : 0.f);
}

/* Attention of one query position over `len` cached positions: out[h] = softmax(scale * K_h q_h) V_h.
 *
 * q and out are [heads, dim]; head h reads KV head h / (heads / kv_heads) (grouped-query attention). k and v
 * hold each KV head's positions contiguously (position stride `dim`, KV-head stride `head_stride`): the
 * layout of a [1, kv_heads, capacity, dim] cache buffer. torch's SDPA spent 60-90 us per layer on this at
 * 100 positions inside a decode loop (17 us when called repeatedly on warm data); this is one pass.
 */
void llmopt_attend(const float *restrict q, const float *restrict k, const float *restrict v,
                   float *restrict out, long heads, long kv_heads, long len, long dim, long head_stride,
                   float scale, float *restrict scores) {
    long group = heads / kv_heads;
    for (long h = 0; h < heads; h++) {
        const float *qh = q + h * dim, *kh = k + (h / group) * head_stride, *vh = v + (h / group) * head_stride;
        float top = -INFINITY;
        for (long i = 0; i < len; i++) {
            float s = row_dot(kh + i * dim, qh, dim) * scale;
            scores[i] = s;
            top = s > top ? s : top;
        }
        float total = 0.f;
        for (long i = 0; i < len; i++) {
            scores[i] = expf(scores[i] - top);
            total += scores[i];
        }
        float *oh = out + h * dim;
        for (long d = 0; d < dim; d++) oh[d] = 0.f;
        for (long i = 0; i < len; i++) {
            const float p = scores[i] / total, *vi = vh + i * dim;
            for (long d = 0; d < dim; d++) oh[d] += p * vi[d];
        }
    }
}

/* llmopt_attend for each row of a batch whose cache is left-padded: row b attends to positions
 * [starts[b], width) of its own keys and values (row b starts `row_stride` floats after row b - 1); q and
 * out are [batch, heads, dim]. The engine's lean step decodes a batch with it in one call per layer.
 */
void llmopt_attend_rows(const float *q, const float *k, const float *v, float *out, long batch, long heads,
                        long kv_heads, long width, long dim, long head_stride, long row_stride,
                        const long *starts, float scale, float *scores) {
    for (long b = 0; b < batch; b++) {
        long offset = b * row_stride + starts[b] * dim;
        llmopt_attend(q + b * heads * dim, k + offset, v + offset, out + b * heads * dim, heads, kv_heads,
                      width - starts[b], dim, head_stride, scale, scores);
    }
}

/* The rest of a Llama decoder layer for one token of one row, around the two steps that stay in Python
 * (the cache update and llmopt_attend_rows): one call before attention and one after, instead of ~25 torch
 * operations per layer whose Python took 2.4-2.8 ms per token on the ~100M preset. Same operations, same
 * order and fp32 throughout as transformers' LlamaDecoderLayer (RMSNorm, rotate-half RoPE, SiLU MLP).
 * A bias pointer may be NULL.
 */
static void rms_norm(const float *restrict x, const float *restrict weight, float eps, float *restrict out,
                     long n) {
    double total = 0.0;
    for (long i = 0; i < n; i++) total += (double)x[i] * x[i];
    const float scale = 1.f / sqrtf((float)(total / (double)n) + eps);
    for (long i = 0; i < n; i++) out[i] = weight[i] * (x[i] * scale);
}

static void rotate_half(float *restrict t, const float *restrict cos, const float *restrict sin, long rows,
                        long dim) {
    const long half = dim / 2;
    for (long r = 0; r < rows; r++, t += dim) {
        for (long i = 0; i < half; i++) {
            const float a = t[i], b = t[i + half];
            t[i] = a * cos[i] - b * sin[i];
            t[i + half] = b * cos[i + half] + a * sin[i + half];
        }
    }
}

/* h = RMSNorm(x); q, k, v = the projections of h; RoPE on q and k. q is [heads, dim], k and v [kv_heads,
 * dim]; cos and sin [dim] for this token's position; h is `hidden` floats of scratch. */
void llmopt_layer_qkv(const float *x, long hidden, const float *norm, float eps, const float *wq,
                      const float *bq, const float *wk, const float *bk, const float *wv, const float *bv,
                      long heads, long kv_heads, long dim, const float *cos, const float *sin, float *q,
                      float *k, float *v, float *h) {
    rms_norm(x, norm, eps, h, hidden);
    llmopt_gemv(wq, h, bq, q, heads * dim, hidden);
    llmopt_gemv(wk, h, bk, k, kv_heads * dim, hidden);
    llmopt_gemv(wv, h, bv, v, kv_heads * dim, hidden);
    rotate_half(q, cos, sin, heads, dim);
    rotate_half(k, cos, sin, kv_heads, dim);
}

/* x += o_proj(a); x += down(SiLU(gate(h)) * up(h)) with h = RMSNorm(x), in place. a is the attention output
 * [attn_width]; scratch holds hidden + 2 * inter floats. */
void llmopt_layer_out(float *x, long hidden, const float *a, long attn_width, const float *wo,
                      const float *bo, const float *norm, float eps, const float *wg, const float *bg,
                      const float *wu, const float *bu, const float *wd, const float *bd, long inter,
                      float *scratch) {
    float *h = scratch, *g = scratch + hidden, *u = g + inter;
    llmopt_gemv(wo, a, bo, h, hidden, attn_width);
    for (long i = 0; i < hidden; i++) x[i] += h[i];
    rms_norm(x, norm, eps, h, hidden);
    llmopt_gemv(wg, h, bg, g, inter, hidden);
    llmopt_gemv(wu, h, bu, u, inter, hidden);
    for (long i = 0; i < inter; i++) g[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    llmopt_gemv(wd, g, bd, h, hidden, inter);
    for (long i = 0; i < hidden; i++) x[i] += h[i];
}
