/* Kernels for decoding on CPU, fp32: the single-row matrix-vector product y = W x (+ bias), W row-major [m,
 * n], single-query attention over a KV cache, and the rest of a Llama decoder layer for one token around
 * them; for continuous batching, a few-row product, row-wise RMSNorm, RoPE + attention and SiLU, and a whole
 * batched decode step and a whole prompt prefill of a Llama model built from them.
 *
 * Batch-1 decoding reads every weight once per token, so its speed is the rate at which W streams from
 * memory. torch's F.linear on a [1, n] input reaches about half the machine's single-core read bandwidth
 * for Llama-sized layers (768-3072 columns); one sequential pass over W with four independent vector
 * accumulators per row reaches ~90% of it (llmopt.serve._native measures both). Built by llmopt at first
 * use with the system C compiler (-O3 -march=native); llmopt falls back to torch where it cannot build.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <unistd.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

/* The vector operations the batched kernels use, at the build's width: 16 floats (AVX-512) or 8 (AVX2 + FMA,
 * where AMD's EPYCs before Zen 4 and Intel's client CPUs stop). One source for both, so each kernel's order of
 * operations per output element is the same at either width; LLMOPT_SIMD is 0 where neither is available. */
#if defined(__AVX512F__)
#define LLMOPT_SIMD 1
#define VW 16
typedef __m512 vf;
typedef __mmask16 vmask;
#define vzero() _mm512_setzero_ps()
#define vload(p) _mm512_loadu_ps(p)
#define vload_aligned(p) _mm512_load_ps(p)
#define vstore(p, a) _mm512_storeu_ps(p, a)
#define vstore_aligned(p, a) _mm512_store_ps(p, a)
#define vset1(x) _mm512_set1_ps(x)
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vfnma(a, b, c) _mm512_fnmadd_ps(a, b, c)
#define vadd(a, b) _mm512_add_ps(a, b)
#define vsub(a, b) _mm512_sub_ps(a, b)
#define vmul(a, b) _mm512_mul_ps(a, b)
#define vmax(a, b) _mm512_max_ps(a, b)
#define vsum(a) _mm512_reduce_add_ps(a)
#define vmask_first(n) ((__mmask16)((1u << (n)) - 1u))
#define vload_masked(m, p) _mm512_maskz_loadu_ps(m, p)
#define vstore_masked(p, m, a) _mm512_mask_storeu_ps(p, m, a)
#define vkeep(m, a) _mm512_maskz_mov_ps(m, a)
#define vround(a) _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vscale2(a, n) _mm512_scalef_ps(a, n)
#elif defined(__AVX2__) && defined(__FMA__)
#define LLMOPT_SIMD 1
#define VW 8
typedef __m256 vf;
typedef __m256i vmask;
#define vzero() _mm256_setzero_ps()
#define vload(p) _mm256_loadu_ps(p)
#define vload_aligned(p) _mm256_load_ps(p)
#define vstore(p, a) _mm256_storeu_ps(p, a)
#define vstore_aligned(p, a) _mm256_store_ps(p, a)
#define vset1(x) _mm256_set1_ps(x)
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vfnma(a, b, c) _mm256_fnmadd_ps(a, b, c)
#define vadd(a, b) _mm256_add_ps(a, b)
#define vsub(a, b) _mm256_sub_ps(a, b)
#define vmul(a, b) _mm256_mul_ps(a, b)
#define vmax(a, b) _mm256_max_ps(a, b)
static inline float vsum(__m256 a) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_hadd_ps(h, h);
    return _mm_cvtss_f32(_mm_hadd_ps(h, h));
}
/* Lanes [0, n) set (0 <= n <= 8). */
static inline __m256i vmask_first(long n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#define vload_masked(m, p) _mm256_maskload_ps(p, m)
#define vstore_masked(p, m, a) _mm256_maskstore_ps(p, m, a)
#define vkeep(m, a) _mm256_and_ps(_mm256_castsi256_ps(m), a)
#define vround(a) _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
/* a * 2^n for integral n in [-126, 127] (AVX2 has no scalef): n's float built from its exponent bits. */
static inline __m256 vscale2(__m256 a, __m256 n) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(a, _mm256_castsi256_ps(e));
}
#else
#define LLMOPT_SIMD 0
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

/* ---- Threads ---------------------------------------------------------------------------------------
 *
 * A replica with a share of several CPUs splits its products over that many threads (llmopt_set_threads,
 * from torch's thread count, which follows the replica's CPU share): the batched products' output columns,
 * the rows of a batched step's or a prefill's attention, and the rows of a large single-row product. Each
 * output element is computed by exactly the same instructions whatever the split, so results do not depend
 * on the thread count. Workers wait for work by spinning briefly (the gaps between a step's products are a
 * few microseconds), then on a condition variable, so an idle replica takes no CPU. One caller at a time
 * uses the pool; another caller meanwhile (a second engine in the same process) runs its parts itself.
 * torch's own pool is not used: its at::parallel_for is C++ only, and a second OpenMP runtime in the
 * process would oversubscribe its cores. */
#define LLMOPT_MAX_THREADS 16
#define LLMOPT_SPIN 2000 /* ~50 us of pause instructions here */

typedef void (*llmopt_task)(void *ctx, long part, long parts);

static struct {
    pthread_mutex_t busy, lock;
    pthread_cond_t start, done;
    atomic_long generation; /* a region's number << 8 | its parts */
    atomic_int pending;
    llmopt_task fn;
    void *ctx;
    int workers, threads;
    pid_t pid;
    long started_at[LLMOPT_MAX_THREADS]; /* the region number when each worker was started */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
          PTHREAD_COND_INITIALIZER, 0, 0, NULL, NULL, 0, 1, 0, {0}};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void *pool_worker(void *arg) {
    const long id = (long)arg;
    long seen = pool.started_at[id]; /* not the current number: a region may have begun since */
    for (;;) {
        long gen = atomic_load(&pool.generation);
        for (int spin = 0; gen == seen && spin < LLMOPT_SPIN; spin++) {
            cpu_relax();
            gen = atomic_load(&pool.generation);
        }
        if (gen == seen) {
            pthread_mutex_lock(&pool.lock);
            while ((gen = atomic_load(&pool.generation)) == seen) pthread_cond_wait(&pool.start, &pool.lock);
            pthread_mutex_unlock(&pool.lock);
        }
        seen = gen;
        /* The parts come with the region's number: a worker without a part here (fewer parts than workers)
         * reads nothing else of it, and the caller waits only for the others, which read fn and ctx before
         * they acknowledge. */
        const long parts = gen & 255;
        if (id >= parts) continue;
        pool.fn(pool.ctx, id, parts);
        if (atomic_fetch_sub(&pool.pending, 1) == 1) {
            pthread_mutex_lock(&pool.lock);
            pthread_cond_signal(&pool.done);
            pthread_mutex_unlock(&pool.lock);
        }
    }
    return NULL;
}

/* Use n threads (the caller's plus n - 1 workers, started on first need) in the split products and
 * attention; returns the number in use, which is 1 where workers cannot start. */
int llmopt_set_threads(int n) {
    n = n < 1 ? 1 : n > LLMOPT_MAX_THREADS ? LLMOPT_MAX_THREADS : n;
    pthread_mutex_lock(&pool.busy);
    if (pool.pid != getpid()) pool.workers = 0; /* a forked child has none of its parent's threads */
    pool.pid = getpid();
    while (pool.workers < n - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pool.started_at[pool.workers + 1] = atomic_load(&pool.generation);
        const int failed = pthread_create(&t, &attr, pool_worker, (void *)(long)(pool.workers + 1));
        pthread_attr_destroy(&attr);
        if (failed) break;
        pool.workers++;
    }
    pool.threads = n < pool.workers + 1 ? n : pool.workers + 1;
    pthread_mutex_unlock(&pool.busy);
    return pool.threads;
}

int llmopt_get_threads(void) { return pool.threads; }

/* fn(ctx, part, parts) for every part of `parts` (at most the pool's threads), in parallel when the pool is
 * free, else all on the caller's thread. */
static void parallel(llmopt_task fn, void *ctx, long parts) {
    parts = parts > pool.threads ? pool.threads : parts < 1 ? 1 : parts;
    if (parts == 1 || pool.pid != getpid() || pthread_mutex_trylock(&pool.busy) != 0) {
        for (long p = 0; p < parts; p++) fn(ctx, p, parts);
        return;
    }
    pool.fn = fn, pool.ctx = ctx;
    atomic_store(&pool.pending, (int)parts - 1);
    pthread_mutex_lock(&pool.lock);
    atomic_store(&pool.generation, ((atomic_load(&pool.generation) >> 8) + 1) << 8 | parts);
    pthread_cond_broadcast(&pool.start);
    pthread_mutex_unlock(&pool.lock);
    fn(ctx, 0, parts);
    for (int spin = 0; atomic_load(&pool.pending) > 0 && spin < LLMOPT_SPIN; spin++) cpu_relax();
    if (atomic_load(&pool.pending) > 0) {
        pthread_mutex_lock(&pool.lock);
        while (atomic_load(&pool.pending) > 0) pthread_cond_wait(&pool.done, &pool.lock);
        pthread_mutex_unlock(&pool.lock);
    }
    pthread_mutex_unlock(&pool.busy);
}

static inline float row_dot(const float *restrict r, const float *restrict x, long n) {
    long i = 0;
    float s = 0.f;
#if LLMOPT_SIMD
    vf a = vzero(), b = a, c = a, d = a;
    for (; i + 4 * VW <= n; i += 4 * VW) {
        a = vfma(vload(r + i), vload(x + i), a);
        b = vfma(vload(r + i + VW), vload(x + i + VW), b);
        c = vfma(vload(r + i + 2 * VW), vload(x + i + 2 * VW), c);
        d = vfma(vload(r + i + 3 * VW), vload(x + i + 3 * VW), d);
    }
    for (; i + VW <= n; i += VW) a = vfma(vload(r + i), vload(x + i), a);
    s = vsum(vadd(vadd(a, b), vadd(c, d)));
#endif
    for (; i < n; i++) s += r[i] * x[i];
    return s;
}

struct gemv {
    const float *W, *x, *bias;
    float *y;
    long m, n;
};

static void gemv_part(void *ctx, long part, long parts) {
    const struct gemv *t = ctx;
    for (long o = t->m * part / parts; o < t->m * (part + 1) / parts; o++)
        t->y[o] = row_dot(t->W + o * t->n, t->x, t->n) + (t->bias ? t->bias[o] : 0.f);
}

/* y = W x (+ bias); a matrix of 2 MiB or more (a ~100M model's layers, not the tiny presets') is split by
 * rows over the pool's threads, each streaming its part of W. */
void llmopt_gemv(const float *restrict W, const float *restrict x, const float *restrict bias,
                 float *restrict y, long m, long n) {
    struct gemv t = {W, x, bias, y, m, n};
    parallel(gemv_part, &t, (m * n) >> 18);
}

/* Attention of one query position over `len` cached positions: out[h] = softmax(scale * K_h q_h) V_h.
 *
 * q and out are [heads, dim]; head h reads KV head h / (heads / kv_heads) (grouped-query attention). k and v
 * hold each KV head's positions contiguously (position stride `dim`, KV-head stride `head_stride`): the
 * layout of a [1, kv_heads, capacity, dim] cache buffer. torch's SDPA spent 60-90 us per layer on this at
 * 100 positions inside a decode loop (17 us when called repeatedly on warm data); this is one pass.
 */
#if LLMOPT_SIMD
/* e^x for x <= 0 (scores minus their maximum), a vector at a time: Cephes' expf (range reduction by ln 2 in
 * two parts, a degree-6 polynomial, times 2^n; within 2 ulp). The scalar expf of libm took most of the
 * attention's time at ~100 positions: 12k calls per layer for 32 rows. */
static inline vf exp_nonpositive(vf x) {
    x = vmax(x, vset1(-87.3f));
    const vf n = vround(vmul(x, vset1(1.44269504088896341f)));
    vf r = vfnma(n, vset1(0.693359375f), x);
    r = vfnma(n, vset1(-2.12194440e-4f), r);
    vf p = vset1(1.9875691500e-4f);
    p = vfma(p, r, vset1(1.3981999507e-3f));
    p = vfma(p, r, vset1(8.3334519073e-3f));
    p = vfma(p, r, vset1(4.1665795894e-2f));
    p = vfma(p, r, vset1(1.6666665459e-1f));
    p = vfma(p, r, vset1(5.0000001201e-1f));
    p = vfma(p, vmul(r, r), vadd(r, vset1(1.f)));
    return vscale2(p, n);
}

/* One head's attention with `dim` a multiple of the vector width: the scores, then a vector softmax, then
 * the weighted sum of values a vector of dimensions at a time in a register. */
static void attend_head_vec(const float *restrict qh, const float *restrict kh, const float *restrict vh,
                            float *restrict oh, long len, long dim, float scale, float *restrict scores) {
    float top = -INFINITY;
    for (long i = 0; i < len; i++) {
        const float *ki = kh + i * dim;
        vf a = vmul(vload(ki), vload(qh));
        for (long d = VW; d < dim; d += VW) a = vfma(vload(ki + d), vload(qh + d), a);
        const float s = vsum(a) * scale;
        scores[i] = s;
        top = s > top ? s : top;
    }
    const vf shift = vset1(top);
    vf sum = vzero();
    long i = 0;
    for (; i + VW <= len; i += VW) {
        const vf e = exp_nonpositive(vsub(vload(scores + i), shift));
        vstore(scores + i, e);
        sum = vadd(sum, e);
    }
    if (i < len) {
        const vmask tail = vmask_first(len - i);
        const vf e = exp_nonpositive(vsub(vload_masked(tail, scores + i), shift));
        vstore_masked(scores + i, tail, e);
        sum = vadd(sum, vkeep(tail, e));
    }
    const vf inv = vset1(1.f / vsum(sum));
    long d = 0;
    for (; d + 4 * VW <= dim; d += 4 * VW) {  // four independent accumulators: one chain would wait on each FMA
        vf a0 = vzero(), a1 = a0, a2 = a0, a3 = a0;
        for (long j = 0; j < len; j++) {
            const vf p = vset1(scores[j]);
            const float *vj = vh + j * dim + d;
            a0 = vfma(p, vload(vj), a0);
            a1 = vfma(p, vload(vj + VW), a1);
            a2 = vfma(p, vload(vj + 2 * VW), a2);
            a3 = vfma(p, vload(vj + 3 * VW), a3);
        }
        vstore(oh + d, vmul(a0, inv));
        vstore(oh + d + VW, vmul(a1, inv));
        vstore(oh + d + 2 * VW, vmul(a2, inv));
        vstore(oh + d + 3 * VW, vmul(a3, inv));
    }
    for (; d < dim; d += VW) {
        vf a0 = vzero(), a1 = a0;
        long j = 0;
        for (; j + 2 <= len; j += 2) {
            a0 = vfma(vset1(scores[j]), vload(vh + j * dim + d), a0);
            a1 = vfma(vset1(scores[j + 1]), vload(vh + (j + 1) * dim + d), a1);
        }
        if (j < len) a0 = vfma(vset1(scores[j]), vload(vh + j * dim + d), a0);
        vstore(oh + d, vmul(vadd(a0, a1), inv));
    }
}
#endif

void llmopt_attend(const float *restrict q, const float *restrict k, const float *restrict v,
                   float *restrict out, long heads, long kv_heads, long len, long dim, long head_stride,
                   float scale, float *restrict scores) {
    long group = heads / kv_heads;
    for (long h = 0; h < heads; h++) {
        const float *qh = q + h * dim, *kh = k + (h / group) * head_stride, *vh = v + (h / group) * head_stride;
#if LLMOPT_SIMD
        if (dim % VW == 0) {
            attend_head_vec(qh, kh, vh, out + h * dim, len, dim, scale, scores);
            continue;
        }
#endif
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

/* RoPE on one position's fused q|k|v row (q, then k, then v: `heads` and `kv_heads` heads of `dim`), and
 * its k and v written at that position of the cache: k and v point at the position in KV head 0 (KV-head
 * stride `head_stride`). */
static void rope_and_store(float *qkv, const float *cos, const float *sin, long heads, long kv_heads,
                           long dim, float *k, float *v, long head_stride) {
    float *kn = qkv + heads * dim;
    const float *vn = kn + kv_heads * dim;
    rotate_half(qkv, cos, sin, heads, dim);
    rotate_half(kn, cos, sin, kv_heads, dim);
    for (long h = 0; h < kv_heads; h++)
        for (long d = 0; d < dim; d++) {
            k[h * head_stride + d] = kn[h * dim + d];
            v[h * head_stride + d] = vn[h * dim + d];
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

/* ---- Batched decode steps: a small batch of rows (continuous batching) ------------------------------
 *
 * torch's F.linear on 2-64 rows (MKL's SGEMM) packs the whole weight matrix on every call, a cost that does
 * not shrink with the rows: on the tiny preset, 17 rows took 2.4 ms per decode step and 32 rows 3.4 ms. This
 * product reads W in its own row-major [n, k] layout (no packed copy, no extra memory): the rows of x are
 * transposed into a [k, 32] panel once per call, and each output column n accumulates W[n, k] * panel[k]
 * over k for 32 rows in two 16-wide vectors; 12 output columns at a time keep 24 accumulators in registers.
 */
#if LLMOPT_SIMD
/* Columns n0 .. n0 + nb (nb <= NR) of the product for the VEC vectors of rows of `panel` [K, 32] into out [N,
 * 32] (out[n, j] = row j's column n). A last panel of 16 rows or fewer takes half the vectors per column.
 * NR x VEC accumulators plus VEC panel vectors fill the register file: 32 registers at AVX-512 (12 x 2), 16
 * at AVX2 (3 x 4). */
#define LLMOPT_GEMM_BLOCK(NAME, VEC, NR)                                                                   \
    static void NAME(const float *restrict panel, const float *restrict W, long n0, long nb, long K,      \
                     float *restrict out) {                                                               \
        const float *w[NR];                                                                               \
        for (long i = 0; i < NR; i++) w[i] = W + (n0 + (i < nb ? i : 0)) * K;                            \
        vf acc[NR][VEC];                                                                                  \
        for (long i = 0; i < NR; i++)                                                                     \
            for (long h = 0; h < VEC; h++) acc[i][h] = vzero();                                           \
        for (long k = 0; k < K; k++) {                                                                    \
            vf a[VEC];                                                                                    \
            for (long h = 0; h < VEC; h++) a[h] = vload_aligned(panel + k * 32 + h * VW);                 \
            for (long i = 0; i < NR; i++) {                                                               \
                const vf b = vset1(w[i][k]);                                                              \
                for (long h = 0; h < VEC; h++) acc[i][h] = vfma(b, a[h], acc[i][h]);                      \
            }                                                                                             \
        }                                                                                                 \
        for (long i = 0; i < nb; i++)                                                                     \
            for (long h = 0; h < VEC; h++) vstore_aligned(out + (n0 + i) * 32 + h * VW, acc[i][h]);      \
    }
#if VW == 16
#define GEMM_NR 12
#else
#define GEMM_NR 3
#endif
LLMOPT_GEMM_BLOCK(gemm_block32, 32 / VW, GEMM_NR)
LLMOPT_GEMM_BLOCK(gemm_block16, 16 / VW, GEMM_NR)

/* The product on 32-row panels of x ([K, 32] each, rows transposed; a last panel zero-filled), columns
 * split into parts of whole blocks of GEMM_NR columns. Each block of W rows is read once, from memory, for
 * every panel while it sits in L1/L2: a 64-token prompt of the ~100M preset read its 450 MB of weights twice
 * when the panels ran one after the other. */
struct gemm_panels {
    const float *panels, *W, *bias;
    float *y, *out; /* out: [N, 32] per panel */
    long rows, N, K;
    int accumulate;
};

static void gemm_part(void *ctx, long part, long parts) {
    const struct gemm_panels *t = ctx;
    const long nr = GEMM_NR, blocks = (t->N + nr - 1) / nr, count = (t->rows + 31) / 32;
    const long lo = blocks * part / parts * nr, end = blocks * (part + 1) / parts * nr;
    const long hi = end < t->N ? end : t->N;
    for (long n0 = lo; n0 < hi; n0 += nr) {
        const long nb = hi - n0 < nr ? hi - n0 : nr;
        for (long p = 0; p < count; p++) {
            const float *panel = t->panels + p * 32 * t->K;
            float *out = t->out + p * 32 * t->N;
            if (t->rows - 32 * p > 16)
                gemm_block32(panel, t->W, n0, nb, t->K, out);
            else
                gemm_block16(panel, t->W, n0, nb, t->K, out);
        }
    }
    for (long m = 0; m < t->rows; m++) {
        const float *out = t->out + m / 32 * 32 * t->N + m % 32;
        float *yr = t->y + m * t->N;
        for (long n = lo; n < hi; n++) {
            const float v = out[n * 32] + (t->bias ? t->bias[n] : 0.f);
            yr[n] = t->accumulate ? yr[n] + v : v;
        }
    }
}
#endif

/* ---- Few rows: a product that reads W once, as the GEMV does -------------------------------------------
 *
 * The panel product above computes 32 (or 16) rows whatever the batch, so below ~24 rows it lost to torch's;
 * and both stream W at well under the memory's rate once the model outgrows the caches: on base-100m
 * (450 MB of fp32 weights) an 8-row decode step took 82 ms with the panel product and 98 ms with torch's,
 * where a single-row step (GEMV) takes ~40. Here each pair of W rows is read once, in the GEMV's sequential
 * order, and multiplied with up to 8 rows of x at a time while it sits in L1 (16 accumulators), so the step
 * costs about one pass over the weights for any batch up to GEMM_SMALL_ROWS rows. */
#define GEMM_SMALL_ROWS 16

#if LLMOPT_SIMD
/* Rows m of x [MB, K] (row stride K) times W rows w0 and w1: s0[m] = x[m] . w0, s1[m] = x[m] . w1. One
 * function per group size, so that a batch of 3 does 3 rows' work, not 8. A group's 2 x MB accumulators and
 * three operands stay in registers: up to 8 rows at AVX-512 (32 registers), 6 at AVX2 (16). */
#if VW == 16
#define GEMM_SMALL_GROUP 8
#else
#define GEMM_SMALL_GROUP 6
#endif
#define LLMOPT_GEMM_SMALL(NAME, MB)                                                                        \
    static void NAME(const float *restrict xr, const float *restrict w0, const float *restrict w1, long K,  \
                     float *restrict s0, float *restrict s1) {                                             \
        const long Kv = K / VW * VW;                                                                      \
        vf a0[MB], a1[MB];                                                                                \
        for (int j = 0; j < MB; j++) a0[j] = a1[j] = vzero();                                             \
        for (long k = 0; k < Kv; k += VW) {                                                               \
            const vf v0 = vload(w0 + k), v1 = vload(w1 + k);                                              \
            for (int j = 0; j < MB; j++) {                                                                \
                const vf xv = vload(xr + j * K + k);                                                      \
                a0[j] = vfma(v0, xv, a0[j]);                                                              \
                a1[j] = vfma(v1, xv, a1[j]);                                                              \
            }                                                                                             \
        }                                                                                                 \
        if (Kv < K) {                                                                                     \
            const vmask tail = vmask_first(K - Kv);                                                       \
            const vf v0 = vload_masked(tail, w0 + Kv), v1 = vload_masked(tail, w1 + Kv);                  \
            for (int j = 0; j < MB; j++) {                                                                \
                const vf xv = vload_masked(tail, xr + j * K + Kv);                                        \
                a0[j] = vfma(v0, xv, a0[j]);                                                              \
                a1[j] = vfma(v1, xv, a1[j]);                                                              \
            }                                                                                             \
        }                                                                                                 \
        for (int j = 0; j < MB; j++) s0[j] = vsum(a0[j]), s1[j] = vsum(a1[j]);                            \
    }
LLMOPT_GEMM_SMALL(gemm_small1, 1)
LLMOPT_GEMM_SMALL(gemm_small2, 2)
LLMOPT_GEMM_SMALL(gemm_small3, 3)
LLMOPT_GEMM_SMALL(gemm_small4, 4)
LLMOPT_GEMM_SMALL(gemm_small5, 5)
LLMOPT_GEMM_SMALL(gemm_small6, 6)
#if GEMM_SMALL_GROUP == 8
LLMOPT_GEMM_SMALL(gemm_small7, 7)
LLMOPT_GEMM_SMALL(gemm_small8, 8)
#endif
typedef void (*gemm_small_fn)(const float *, const float *, const float *, long, float *, float *);
static const gemm_small_fn gemm_small_group[GEMM_SMALL_GROUP + 1] = {
    0, gemm_small1, gemm_small2, gemm_small3, gemm_small4, gemm_small5, gemm_small6,
#if GEMM_SMALL_GROUP == 8
    gemm_small7, gemm_small8,
#endif
};

struct gemm_small {
    const float *x, *W, *bias;
    float *y;
    long rows, N, K;
    int accumulate;
};

static void gemm_small_part(void *ctx, long part, long parts) {
    const struct gemm_small *t = ctx;
    const long K = t->K, pairs = (t->N + 1) / 2;
    const long lo = pairs * part / parts * 2, end = pairs * (part + 1) / parts * 2;
    const long hi = end < t->N ? end : t->N;
    float s0[GEMM_SMALL_GROUP], s1[GEMM_SMALL_GROUP];
    for (long n = lo; n < hi; n += 2) {
        const int two = n + 1 < hi;
        const float *w0 = t->W + n * K, *w1 = two ? w0 + K : w0;
        for (long m0 = 0; m0 < t->rows; m0 += GEMM_SMALL_GROUP) {
            const long mb = t->rows - m0 < GEMM_SMALL_GROUP ? t->rows - m0 : GEMM_SMALL_GROUP;
            gemm_small_group[mb](t->x + m0 * K, w0, w1, K, s0, s1);
            for (long j = 0; j < mb; j++) {
                float *yr = t->y + (m0 + j) * t->N + n;
                const float v0 = s0[j] + (t->bias ? t->bias[n] : 0.f);
                yr[0] = t->accumulate ? yr[0] + v0 : v0;
                if (two) {
                    const float v1 = s1[j] + (t->bias ? t->bias[n + 1] : 0.f);
                    yr[1] = t->accumulate ? yr[1] + v1 : v1;
                }
            }
        }
    }
}
#endif

/* y[m, n] = sum_k x[m, k] W[n, k] (+ bias[n]) (+ y[m, n] when `accumulate`), x [rows, K], W [N, K], y [rows,
 * N], all row-major, on the pool's threads when the product is large enough. `scratch` holds
 * llmopt_gemm_scratch(rows, N, K) floats. Returns 0 where this build has no vector path (the caller keeps
 * torch's product). */
long llmopt_gemm_scratch(long rows, long N, long K) { return (rows + 31) / 32 * 32 * (K + N) + 16; }

int llmopt_gemm(const float *x, const float *W, const float *bias, float *y, long rows, long N, long K,
                int accumulate, float *scratch) {
#if LLMOPT_SIMD
    if (rows <= GEMM_SMALL_ROWS) {
        struct gemm_small t = {x, W, bias, y, rows, N, K, accumulate};
        parallel(gemm_small_part, &t, rows * N * K >> 16);
        return 1;
    }
    const long count = (rows + 31) / 32;
    float *panels = (float *)(((size_t)scratch + 63) & ~(size_t)63), *out = panels + count * 32 * K;
    for (long p = 0; p < count; p++) {
        float *panel = panels + p * 32 * K;
        const long m0 = 32 * p, mb = rows - m0 < 32 ? rows - m0 : 32;
        for (long k = 0; k < K; k++)
            for (long j = 0; j < 32; j++) panel[k * 32 + j] = j < mb ? x[(m0 + j) * K + k] : 0.f;
    }
    struct gemm_panels t = {panels, W, bias, y, out, rows, N, K, accumulate};
    parallel(gemm_part, &t, count * 32 * N * K >> 16); /* a part per ~64K multiply-adds */
    return 1;
#else
    (void)x, (void)W, (void)bias, (void)y, (void)rows, (void)N, (void)K, (void)accumulate, (void)scratch;
    return 0;
#endif
}

/* RMSNorm of each of `rows` rows of x [rows, n] into out. */
void llmopt_rms_norm_rows(const float *x, const float *weight, float eps, float *out, long rows, long n) {
    for (long r = 0; r < rows; r++) rms_norm(x + r * n, weight, eps, out + r * n, n);
}

/* The attention part of a batched decode step, per row b of qkv [batch, (heads + 2 kv_heads) dim] (q, k and
 * v of the new token side by side, as one fused projection gives them): RoPE on q and k with row b's cos and
 * sin [batch, dim], k and v written into the cache at position `pos`, then attention over positions
 * [starts[b], pos] into out [batch, heads dim]. k and v point at position 0 of row 0 of the cache views
 * (KV-head stride `head_stride`, row stride `row_stride`, position stride dim). */
struct decode_attention {
    float *qkv, *k, *v, *out, *scores;
    const float *cos, *sin;
    const long *starts;
    long batch, heads, kv_heads, dim, head_stride, row_stride, pos, width;
    float scale;
};

/* Rows [batch * part / parts, batch * (part + 1) / parts), with the part's own scores (`width` floats). */
static void decode_attention_part(void *ctx, long part, long parts) {
    const struct decode_attention *t = ctx;
    const long heads = t->heads, kv_heads = t->kv_heads, dim = t->dim, pos = t->pos;
    const long width = (heads + 2 * kv_heads) * dim;
    float *scores = t->scores + part * t->width;
    for (long b = t->batch * part / parts; b < t->batch * (part + 1) / parts; b++) {
        float *q = t->qkv + b * width, *kr = t->k + b * t->row_stride, *vr = t->v + b * t->row_stride;
        rope_and_store(q, t->cos + b * dim, t->sin + b * dim, heads, kv_heads, dim, kr + pos * dim,
                       vr + pos * dim, t->head_stride);
        const long offset = t->starts[b] * dim;
        llmopt_attend(q, kr + offset, vr + offset, t->out + b * heads * dim, heads, kv_heads,
                      pos + 1 - t->starts[b], dim, t->head_stride, t->scale, scores);
    }
}

void llmopt_decode_attention(float *qkv, long batch, long heads, long kv_heads, long dim, const float *cos,
                             const float *sin, float *k, float *v, long head_stride, long row_stride,
                             long pos, const long *starts, float scale, float *out, float *scores) {
    struct decode_attention t = {qkv,  k,        v,   out,         scores,     cos, sin, starts, batch,
                                 heads, kv_heads, dim, head_stride, row_stride, pos, pos + 1, scale};
    decode_attention_part(&t, 0, 1);
}

/* out[r, i] = SiLU(gu[r, i]) * gu[r, inter + i]: the gated MLP's activation on a fused gate|up product. */
void llmopt_silu_mul_rows(const float *gu, float *out, long rows, long inter) {
    for (long r = 0; r < rows; r++) {
        const float *g = gu + r * 2 * inter, *u = g + inter;
        float *o = out + r * inter;
        for (long i = 0; i < inter; i++) o[i] = g[i] / (1.f + expf(-g[i])) * u[i];
    }
}

#if LLMOPT_SIMD
/* The parts of a Llama layer on `rows` rows that a decode step and a prefill share, around their attention:
 * `layer_in` is RMSNorm and the fused q|k|v product into qkv; `layer_out` adds the output product of the
 * attention output `a` to x, then the gated MLP (RMSNorm, fused gate|up product, SiLU * up, down product).
 * w holds the layer's ten weight pointers, eps its two epsilons (see llmopt_decode_step). */
static void layer_in(const float *x, long rows, long hidden, long qkv_width, const float *const *w,
                     const float *eps, float *h, float *qkv, float *gemm_scratch) {
    llmopt_rms_norm_rows(x, w[0], eps[0], h, rows, hidden);
    llmopt_gemm(h, w[1], w[2], qkv, rows, qkv_width, hidden, 0, gemm_scratch);
}

static void layer_out(float *x, long rows, long hidden, long attn_width, long inter, const float *const *w,
                      const float *eps, const float *a, float *h, float *gu, float *g, float *gemm_scratch) {
    llmopt_gemm(a, w[3], w[4], x, rows, hidden, attn_width, 1, gemm_scratch);
    llmopt_rms_norm_rows(x, w[5], eps[1], h, rows, hidden);
    llmopt_gemm(h, w[6], w[7], gu, rows, 2 * inter, hidden, 0, gemm_scratch);
    llmopt_silu_mul_rows(gu, g, rows, inter);
    llmopt_gemm(g, w[8], w[9], x, rows, hidden, inter, 1, gemm_scratch);
}
#endif

/* A whole batched decode step of a Llama model in one call, without the GIL: every layer (RMSNorm, fused
 * q|k|v product, RoPE + cache write + attention, output product, RMSNorm, fused gate|up product, SiLU * up,
 * down product, both residuals), then the final RMSNorm and the output head into logits [batch, vocab].
 * Called through ctypes, which releases the GIL for the whole step: the engine thread does not wait for
 * the serving replica's event loop between ~60 torch and native calls per step.
 *
 * x [batch, hidden] holds the new tokens' embeddings and is overwritten. Per layer l, `weights[10 l ..]`
 * are: input norm, W_qkv, b_qkv, W_o, b_o, post-attention norm, W_gate|up, b_gate|up, W_down, b_down (a
 * bias may be NULL), `eps[2 l]`, `eps[2 l + 1]` the two norms' epsilons, and `caches[2 l]`, `caches[2 l +
 * 1]` the keys and values at position 0 of row 0, with `strides[3 l ..]` = KV-head stride, row stride and
 * the new position `pos`. `scratch` holds `llmopt_decode_step_scratch(...)` floats. Returns 0, doing nothing,
 * on a build without a vector path (AVX2 + FMA or AVX-512). */
long llmopt_decode_step_scratch(long batch, long hidden, long heads, long kv_heads, long dim, long inter,
                                long vocab, long width) {
    const long qkv = (heads + 2 * kv_heads) * dim;
    long big = 2 * inter > vocab ? 2 * inter : vocab;
    big = qkv > big ? qkv : big;
    long k_max = inter > hidden ? inter : hidden;
    k_max = heads * dim > k_max ? heads * dim : k_max;
    return batch * (hidden + qkv + heads * dim + 2 * inter + inter) + width * LLMOPT_MAX_THREADS +
           llmopt_gemm_scratch(batch, big, k_max) + 64;
}

int llmopt_decode_step(float *x, long batch, long hidden, long heads, long kv_heads, long dim, long inter,
                       long layers, const float *const *weights, const float *eps, float *const *caches,
                       const long *strides, const long *starts, const float *cos, const float *sin,
                       float scale, const float *final_norm, float final_eps, const float *head,
                       const float *head_bias, long vocab, float *logits, float *scratch) {
#if LLMOPT_SIMD
    const long qkv_width = (heads + 2 * kv_heads) * dim;
    float *h = scratch, *qkv = h + batch * hidden, *a = qkv + batch * qkv_width, *gu = a + batch * heads * dim;
    float *g = gu + batch * 2 * inter, *scores = g + batch * inter;
    long width = 0;
    for (long l = 0; l < layers; l++) width = strides[3 * l + 2] + 1 > width ? strides[3 * l + 2] + 1 : width;
    float *gemm_scratch = scores + width * LLMOPT_MAX_THREADS;
    for (long l = 0; l < layers; l++) {
        const float *const *w = weights + 10 * l;
        layer_in(x, batch, hidden, qkv_width, w, eps + 2 * l, h, qkv, gemm_scratch);
        struct decode_attention t = {qkv,   caches[2 * l],  caches[2 * l + 1], a,     scores,
                                     cos,   sin,            starts,            batch, heads,
                                     kv_heads, dim,         strides[3 * l],    strides[3 * l + 1],
                                     strides[3 * l + 2],    width,             scale};
        parallel(decode_attention_part, &t, batch * width * heads * dim >> 14);
        layer_out(x, batch, hidden, heads * dim, inter, w, eps + 2 * l, a, h, gu, g, gemm_scratch);
    }
    llmopt_rms_norm_rows(x, final_norm, final_eps, h, batch, hidden);
    llmopt_gemm(h, head, head_bias, logits, batch, vocab, hidden, 0, gemm_scratch);
    return 1;
#else
    (void)x, (void)batch, (void)hidden, (void)heads, (void)kv_heads, (void)dim, (void)inter, (void)layers;
    (void)weights, (void)eps, (void)caches, (void)strides, (void)starts, (void)cos, (void)sin, (void)scale;
    (void)final_norm, (void)final_eps, (void)head, (void)head_bias, (void)vocab, (void)logits, (void)scratch;
    return 0;
#endif
}

/* The prefill of `count` prompts of a Llama model in one call, without the GIL (the decode step's
 * counterpart): every layer on all prompts' positions at once (`rows`, their lengths' sum, so each weight is
 * read once for the whole wave), with causal attention within each prompt, and each layer's keys and values
 * written left-padded to `width` positions: `caches[2 l]` and `caches[2 l + 1]` are [count, kv_heads, width,
 * dim] each, prompt s at positions [width - lengths[s], width) (the layout of the engine's batch cache);
 * then the final RMSNorm and the output head on each prompt's last position, into logits [count, vocab].
 * x [rows, hidden] holds the prompts' embeddings one after another and is overwritten; cos and sin are [rows,
 * dim] (each prompt's positions from 0); weights and eps as in llmopt_decode_step. `scratch` holds
 * `llmopt_prefill_scratch(rows, ...)` floats. Returns 0, doing nothing, without a vector path. */
struct prefill_attention {
    const float *qkv, *k, *v;
    float *a, *scores;
    const long *lengths;
    long count, width, heads, kv_heads, dim;
    float scale;
};

/* Causal attention of rows part, part + parts, ... of all prompts (interleaved: later positions attend to
 * more), each over its own prompt's keys and values. */
static void prefill_attention_part(void *ctx, long part, long parts) {
    const struct prefill_attention *p = ctx;
    const long qkv_width = (p->heads + 2 * p->kv_heads) * p->dim, row_stride = p->kv_heads * p->width * p->dim;
    long r = 0;
    for (long s = 0; s < p->count; s++) {
        const long len = p->lengths[s], first = (p->width - len) * p->dim;
        const float *k = p->k + s * row_stride + first, *v = p->v + s * row_stride + first;
        for (long t = 0; t < len; t++, r++)
            if (r % parts == part)
                llmopt_attend(p->qkv + r * qkv_width, k, v, p->a + r * p->heads * p->dim, p->heads, p->kv_heads,
                              t + 1, p->dim, p->width * p->dim, p->scale, p->scores + part * p->width);
    }
}

/* RoPE, the cache write and causal attention of a prefill's layer on fused q|k|v rows [rows, (heads + 2
 * kv_heads) dim] of `count` prompts (lengths, width, caches k and v of one layer as in llmopt_prefill; cos and
 * sin [rows, dim]), into a [rows, heads dim]; `scores` holds `width` floats per thread. */
static void prefill_attend(float *qkv, long count, const long *lengths, long width, long heads, long kv_heads,
                           long dim, const float *cos, const float *sin, float *k, float *v, float scale,
                           float *a, float *scores) {
    const long qkv_width = (heads + 2 * kv_heads) * dim, head_stride = width * dim;
    const long row_stride = kv_heads * head_stride;
    long work = 0;
    for (long s = 0, r = 0; s < count; s++) {
        const long first = width - lengths[s];
        for (long t = 0; t < lengths[s]; t++, r++)
            rope_and_store(qkv + r * qkv_width, cos + r * dim, sin + r * dim, heads, kv_heads, dim,
                           k + s * row_stride + (first + t) * dim, v + s * row_stride + (first + t) * dim,
                           head_stride);
        work += lengths[s] * lengths[s];
    }
    struct prefill_attention t = {qkv, k, v, a, scores, lengths, count, width, heads, kv_heads, dim, scale};
    parallel(prefill_attention_part, &t, work * heads * dim >> 15);
}

long llmopt_prefill_scratch(long rows, long hidden, long heads, long kv_heads, long dim, long inter, long vocab) {
    return llmopt_decode_step_scratch(rows, hidden, heads, kv_heads, dim, inter, vocab, rows);
}

int llmopt_prefill(float *x, long count, const long *lengths, long width, long hidden, long heads, long kv_heads,
                   long dim, long inter, long layers, const float *const *weights, const float *eps,
                   float *const *caches, const float *cos, const float *sin, float scale, const float *final_norm,
                   float final_eps, const float *head, const float *head_bias, long vocab, float *logits,
                   float *scratch) {
#if LLMOPT_SIMD
    long rows = 0;
    for (long s = 0; s < count; s++) rows += lengths[s];
    const long qkv_width = (heads + 2 * kv_heads) * dim;
    float *h = scratch, *qkv = h + rows * hidden, *a = qkv + rows * qkv_width, *gu = a + rows * heads * dim;
    float *g = gu + rows * 2 * inter, *scores = g + rows * inter;
    float *gemm_scratch = scores + rows * LLMOPT_MAX_THREADS;
    for (long l = 0; l < layers; l++) {
        const float *const *w = weights + 10 * l;
        layer_in(x, rows, hidden, qkv_width, w, eps + 2 * l, h, qkv, gemm_scratch);
        prefill_attend(qkv, count, lengths, width, heads, kv_heads, dim, cos, sin, caches[2 * l],
                       caches[2 * l + 1], scale, a, scores);
        layer_out(x, rows, hidden, heads * dim, inter, w, eps + 2 * l, a, h, gu, g, gemm_scratch);
    }
    for (long s = 0, r = 0; s < count; s++) {
        r += lengths[s];
        llmopt_rms_norm_rows(x + (r - 1) * hidden, final_norm, final_eps, h + s * hidden, 1, hidden);
    }
    if (count == 1)
        llmopt_gemv(head, h, head_bias, logits, vocab, hidden);
    else
        llmopt_gemm(h, head, head_bias, logits, count, vocab, hidden, 0, gemm_scratch);
    return 1;
#else
    (void)x, (void)count, (void)lengths, (void)width, (void)hidden, (void)heads, (void)kv_heads, (void)dim;
    (void)inter, (void)layers, (void)weights, (void)eps, (void)caches, (void)cos, (void)sin, (void)scale;
    (void)final_norm, (void)final_eps, (void)head, (void)head_bias, (void)vocab, (void)logits, (void)scratch;
    return 0;
#endif
}
