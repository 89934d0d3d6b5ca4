/* C kernels of the int8 backend's lean forward (engine/lean.py, engine/kernels.py).

   A one-token step of a small model on a CPU spends more time dispatching small tensor ops (norms,
   per-row quantization, rescaling, rotary embedding, attention, cache writes: about 80 per layer) than
   in its integer products, and oneDNN's int8 product reaches a fraction of memory bandwidth at one row.
   These functions do that work straight over the rows; `forward_rows` runs every layer in one call.

   Invariant: every output row depends on its own input row only, computed by the same code whatever
   the number of rows, so a token verified in a tree gets the very bits it gets alone. Built with
   -ffp-contract=off: no fused multiply-adds, every operation rounds as written. Quantization and
   rescaling reproduce engine/int8.py's torch code bit for bit; the RMS norm sums its squares in
   double, in a fixed order of its own, so it differs from torch's in the last bit now and then. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define QMAX 127.0f

/* Vectors of VEC floats: AVX-512, AVX2 or plain floats (VEC 1), one set of macros for every kernel. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define VEC 16
typedef __m512 vec;
#define vzero() _mm512_setzero_ps()
#define vload(p) _mm512_loadu_ps(p)
#define vstore(p, v) _mm512_storeu_ps(p, v)
#define vset(x) _mm512_set1_ps(x)
#define vadd(a, b) _mm512_add_ps(a, b)
#define vmul(a, b) _mm512_mul_ps(a, b)
#define vsum(v) _mm512_reduce_add_ps(v)
#define vmax(a, b) _mm512_max_ps(a, b)
#define vabs(v) _mm512_abs_ps(v)
#define vfloor(v) _mm512_roundscale_ps(v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)
#define vpow2(n) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23))
#define vdiv(a, b) _mm512_div_ps(a, b)
#define vif_nonnegative(g, a, b) _mm512_mask_blend_ps(_mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_GE_OQ), b, a)
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
/* out lane 4k + m = the sum of v[4m + k]'s lanes, for 16 vectors: halves, then quarters, then pairs. */
static inline vec vsums(const vec *v) {
    vec w[8], u[4], t[2];
    for (int p = 0; p < 8; p++)
        w[p] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int p = 0; p < 4; p++)
        u[p] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * p], w[2 * p + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(w[2 * p], w[2 * p + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int p = 0; p < 2; p++)
        t[p] = _mm512_add_ps(_mm512_unpacklo_ps(u[2 * p], u[2 * p + 1]), _mm512_unpackhi_ps(u[2 * p], u[2 * p + 1]));
    return _mm512_add_ps(_mm512_shuffle_ps(t[0], t[1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t[0], t[1], _MM_SHUFFLE(3, 2, 3, 2)));
}
#elif defined(__AVX2__)
#include <immintrin.h>
#define VEC 8
typedef __m256 vec;
#define vzero() _mm256_setzero_ps()
#define vload(p) _mm256_loadu_ps(p)
#define vstore(p, v) _mm256_storeu_ps(p, v)
#define vset(x) _mm256_set1_ps(x)
#define vadd(a, b) _mm256_add_ps(a, b)
#define vmul(a, b) _mm256_mul_ps(a, b)
#define vmax(a, b) _mm256_max_ps(a, b)
#define vabs(v) _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v)
#define vfloor(v) _mm256_floor_ps(v)
#define vpow2(n) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23))
#define vdiv(a, b) _mm256_div_ps(a, b)
#define vif_nonnegative(g, a, b) _mm256_blendv_ps(b, a, _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_GE_OQ))
static inline float vsum(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}
#ifdef __FMA__
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#else
#define vfma(a, b, c) _mm256_add_ps(_mm256_mul_ps(a, b), c)
#endif
/* out lane 4k + m = the sum of v[2m + k]'s lanes, for 8 vectors: halves, then pairs. */
static inline vec vsums(const vec *v) {
    vec w[4], t[2];
    for (int p = 0; p < 4; p++)
        w[p] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * p], v[2 * p + 1], 0x20),
                             _mm256_permute2f128_ps(v[2 * p], v[2 * p + 1], 0x31));
    for (int p = 0; p < 2; p++)
        t[p] = _mm256_add_ps(_mm256_unpacklo_ps(w[2 * p], w[2 * p + 1]), _mm256_unpackhi_ps(w[2 * p], w[2 * p + 1]));
    return _mm256_add_ps(_mm256_shuffle_ps(t[0], t[1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm256_shuffle_ps(t[0], t[1], _MM_SHUFFLE(3, 2, 3, 2)));
}
#else
#define VEC 1
typedef float vec;
#define vzero() 0.0f
#define vload(p) (*(p))
#define vstore(p, v) (*(p) = (v))
#define vset(x) (x)
#define vadd(a, b) ((a) + (b))
#define vmul(a, b) ((a) * (b))
#define vsum(v) (v)
#define vmax(a, b) ((a) > (b) ? (a) : (b))
#define vabs(v) fabsf(v)
#define vfloor(v) floorf(v)
#define vdiv(a, b) ((a) / (b))
#define vif_nonnegative(g, a, b) ((g) >= 0.0f ? (a) : (b))
#define vfma(a, b, c) ((a) * (b) + (c))
static inline float vpow2(float n) {
    union { int32_t i; float f; } u = {.i = ((int32_t)n + 127) << 23};
    return u.f;
}
#endif
static inline float vmax_lanes(vec v) {
    float lanes[VEC], m;
    vstore(lanes, v);
    m = lanes[0];
    for (long l = 1; l < VEC; l++) m = lanes[l] > m ? lanes[l] : m;
    return m;
}

/* Symmetric int8 quantization of one row, as engine/int8.py's quantize_rows:
   scale = max(max |h|, 1e-12) / 127, q = round-half-even(h / scale). */
static void quantize_row(const float *h, long K, int8_t *q, float *scale) {
    float amax = 0.0f;  /* a maximum is exact in any order: VEC lanes, then the lanes, then the tail */
    long k = 0;
#if VEC > 1
    vec m = vzero();
    for (; k + VEC <= K; k += VEC) m = vmax(vabs(vload(h + k)), m);  /* a NaN is skipped, as below */
    amax = vmax_lanes(m);
#endif
    for (; k < K; k++) {
        float a = fabsf(h[k]);
        amax = a > amax ? a : amax;
    }
    float s = (amax < 1e-12f ? 1e-12f : amax) / QMAX;
    for (k = 0; k < K; k++) q[k] = (int8_t)nearbyintf(h[k] / s);
    *scale = s;
}

/* (acc * wscale) * xscale (+ bias), as Int8Linear.forward rescales. */
static inline float rescale(int32_t acc, float wscale, float xscale, const float *bias, long j) {
    float y = ((float)acc * wscale) * xscale;
    return bias ? y + bias[j] : y;
}

/* 1 / sqrt(mean(x^2) + eps): the squares summed in double, in SUMS interleaved partial sums (value k
   into sum k % SUMS, in order) that are then added in order; the same for every row. */
#define SUMS 8
static float inverse_rms(const float *x, long K, float eps) {
    double part[SUMS] = {0.0}, sum = 0.0;
    long k = 0;
    for (; k + SUMS <= K; k += SUMS)
        for (long l = 0; l < SUMS; l++) part[l] += (double)x[k + l] * (double)x[k + l];
    for (; k < K; k++) part[k % SUMS] += (double)x[k] * (double)x[k];
    for (long l = 0; l < SUMS; l++) sum += part[l];
    return 1.0f / sqrtf((float)(sum / (double)K) + eps);
}

/* h = rms_norm(x) * w for each of n rows of K into `h` (float) */
void rms_norm_rows(const float *x, const float *w, float eps, long n, long K, float *h) {
    for (long i = 0; i < n; i++) {
        const float *xi = x + i * K;
        float r = inverse_rms(xi, K, eps);
        for (long k = 0; k < K; k++) h[i * K + k] = (xi[k] * r) * w[k];
    }
}

/* q, scale = quantize(rms_norm(x) * w), row by row; `h` is scratch of K floats. */
void rms_quantize(const float *x, const float *w, float eps, long n, long K, float *h, int8_t *q, float *scale) {
    for (long i = 0; i < n; i++) {
        rms_norm_rows(x + i * K, w, eps, 1, K, h);
        quantize_row(h, K, q + i * K, scale + i);
    }
}

void quantize_rows(const float *x, long n, long K, int8_t *q, float *scale) {
    for (long i = 0; i < n; i++) quantize_row(x + i * K, K, q + i * K, scale + i);
}

/* y (n, N) = rescaled acc */
void rescale_rows(const int32_t *acc, const float *wscale, const float *xscale, const float *bias, long n, long N,
                  float *y) {
    for (long i = 0; i < n; i++)
        for (long j = 0; j < N; j++) y[i * N + j] = rescale(acc[i * N + j], wscale[j], xscale[i], bias, j);
}

/* x += rescaled acc (the residual add); then, when w is given, q, scale = quantize(rms_norm(x) * w).
   `h` is scratch of K floats. */
void residual_rms_quantize(const int32_t *acc, const float *wscale, const float *xscale, const float *bias,
                           float *x, const float *w, float eps, long n, long K, float *h, int8_t *q,
                           float *scale) {
    for (long i = 0; i < n; i++) {
        float *xi = x + i * K;
        for (long k = 0; k < K; k++) xi[k] = xi[k] + rescale(acc[i * K + k], wscale[k], xscale[i], bias, k);
        if (w) rms_quantize(xi, w, eps, 1, K, h, q + i * K, scale + i);
    }
}

/* x * cos + rotate_half(x) * sin for one head of hd values (transformers' rotate_half convention). */
static void rotate(const float *v, const float *cos, const float *sin, long hd, float *out) {
    long half = hd / 2;
    for (long d = 0; d < hd; d++) {
        float rotated = d < half ? -v[d + half] : v[d - half];
        out[d] = v[d] * cos[d] + rotated * sin[d];
    }
}

/* The fused q/k/v product's rows, rescaled: q and k rotated (cos, sin: (n, hd)); q written to
   q_out (heads, n, hd) and k, v to this layer's cache (kv_heads, capacity, hd) at past + i.
   `v` is scratch of hd floats. */
static void qkv_rotate_span(const int32_t *acc, const float *wscale, const float *xscale, const float *bias,
                            const float *cos, const float *sin, long n, long i0, long i1, long heads, long kv_heads,
                            long hd, float *q_out, float *keys, float *values, long capacity, long past, float *v) {
    long width = (heads + 2 * kv_heads) * hd;
    for (long i = i0; i < i1; i++) {
        const int32_t *row = acc + i * width;
        const float *c = cos + i * hd, *s = sin + i * hd;
        for (long h = 0; h < heads + 2 * kv_heads; h++) {
            for (long d = 0; d < hd; d++) {
                long j = h * hd + d;
                v[d] = rescale(row[j], wscale[j], xscale[i], bias, j);
            }
            if (h < heads) {
                rotate(v, c, s, hd, q_out + (h * n + i) * hd);
            } else if (h < heads + kv_heads) {
                rotate(v, c, s, hd, keys + ((h - heads) * capacity + past + i) * hd);
            } else {
                float *dst = values + ((h - heads - kv_heads) * capacity + past + i) * hd;
                for (long d = 0; d < hd; d++) dst[d] = v[d];
            }
        }
    }
}

void qkv_rotate_store(const int32_t *acc, const float *wscale, const float *xscale, const float *bias,
                      const float *cos, const float *sin, long n, long heads, long kv_heads, long hd,
                      float *q_out, float *keys, float *values, long capacity, long past, float *v) {
    qkv_rotate_span(acc, wscale, xscale, bias, cos, sin, n, 0, n, heads, kv_heads, hd, q_out, keys, values, capacity,
                    past, v);
}

/* ---- attention whose every row is computed alone ----

   Query i attends to the keys it may see, taken in cache order; every sum over keys (the softmax's
   denominator, the weighted values) runs over that ordered list one key at a time, and every sum
   over a head's dimensions in one fixed order. So a query's output depends only on its own vector and
   the keys and values it sees, never on which other queries or hidden keys share the call: a tree
   node gets the bits a one-token step over its own path gets (its ancestors precede it in the tree,
   as its path's tokens precede it in the cache). Loops that only map (scores, exponentials) or that
   keep one sum per lane are written so the compiler vectorizes them without reordering a sum. */

#define MAX_CHUNKS 16 /* head_dim up to 16 * VEC in registers */

/* q . k over hd values (hd % VEC == 0): per lane a running sum over the chunks, then one fixed
   reduction of the lanes. */
static inline float dot(const float *q, const float *k, long hd) {
    vec acc = vmul(vload(q), vload(k));
    for (long d = VEC; d < hd; d += VEC) acc = vadd(acc, vmul(vload(q + d), vload(k + d)));
    return vsum(acc);
}

/* e^x for x <= 0 (to float32 rounding, about 2 ulp), VEC values at a time: 2^n * p(r) with
   n = floor(x / ln 2 + 1/2), r = x - n ln 2 (ln 2 in two parts), p the degree-6 Taylor polynomial. */
static inline vec exp_nonpositive(vec x) {
    x = vmax(x, vset(-87.0f));
    vec n = vfloor(vadd(vmul(x, vset(1.44269504f)), vset(0.5f)));
    vec r = vadd(vadd(x, vmul(n, vset(-0.693145752f))), vmul(n, vset(-1.42860677e-06f)));
    vec p = vset(0.00138888892f);
    p = vadd(vmul(p, r), vset(0.00833333377f));
    p = vadd(vmul(p, r), vset(0.0416666679f));
    p = vadd(vmul(p, r), vset(0.166666672f));
    p = vadd(vmul(p, r), vset(0.5f));
    p = vadd(vmul(p, r), vset(1.0f));
    p = vadd(vmul(p, r), vset(1.0f));
    return vmul(p, vpow2(n));
}

#define MAX_GROUP 4 /* query heads per task */

/* One query row's share of a task: its query heads q[0 .. nh - 1] (which read one kv head), their outputs,
   the keys it sees (`seen`, count, in cache order), its scores `s` (nh rows of `stride` floats: count
   rounded up to VEC), each head's running maximum, lane by lane, and its denominator. */
typedef struct {
    const float *q[MAX_GROUP];
    float *out[MAX_GROUP];
    const long *seen;
    long count;
    float *s;
    float tops[MAX_GROUP][VEC];
    float total[MAX_GROUP];  /* each head's softmax denominator */
} query_t;

/* Scores of the keys at places t .. t + VEC - 1 of r's seen list, for its nh heads: out of the cache
   directly where `direct` (those places are keys t .. t + VEC - 1, seen by every row of the call). With
   vectors, key j of the block is summed in vector `slot(j)`, so that one transposing reduction (`vsums`)
   puts its score in lane j; a block past the last key repeats that key and its lanes are dropped. A key's
   score depends only on the query and the key, and its lane only on its place in `seen`. */
#if VEC > 1
#define slot(j) ((VEC / 4) * ((j) % 4) + (j) / 4)
#endif
static inline __attribute__((always_inline)) void score_block(query_t *r, const float *keys, long t, int direct,
                                                             const long hd, const long nh, float scale, long stride) {
#if VEC > 1
    const long chunks = hd / VEC;
    for (long h = 0; h < nh; h++) {
        vec qc[MAX_CHUNKS], part[VEC];
        qc[0] = vload(r->q[h]);  /* hd >= VEC (attention_fits) */
        for (long c = 1; c < chunks; c++) qc[c] = vload(r->q[h] + c * VEC);
#pragma GCC unroll 16
        for (long j = 0; j < VEC; j++) {
            long key = direct ? t + j : r->seen[t + j < r->count ? t + j : r->count - 1];
            const float *k = keys + key * hd;
            vec acc = vmul(qc[0], vload(k));
            for (long c = 1; c < chunks; c++) acc = vfma(qc[c], vload(k + c * VEC), acc);
            part[slot(j)] = acc;
        }
        vec block = vmul(vsums(part), vset(scale));
        vstore(r->s + h * stride + t, block);
        vstore(r->tops[h], vmax(vload(r->tops[h]), block));  /* lanes past the last key repeat a real score */
    }
#else
    (void)direct;
    for (long h = 0; h < nh; h++) {
        float x = r->s[h * stride + t] = dot(r->q[h], keys + r->seen[t] * hd, hd) * scale;
        r->tops[h][0] = x > r->tops[h][0] ? x : r->tops[h][0];
    }
#endif
}

/* r's weighted values over places t0 .. t1 - 1 of its seen list, added to its outputs: each value row
   read once for the heads, every head's sums one key at a time in seen order. */
static inline __attribute__((always_inline)) void value_span(query_t *r, const float *values, long t0, long t1,
                                                            int direct, const long hd, const long nh, long stride) {
    const long chunks = hd / VEC;
    vec acc[MAX_GROUP][MAX_CHUNKS];
    for (long h = 0; h < nh; h++)
        for (long c = 0; c < chunks; c++) acc[h][c] = vload(r->out[h] + c * VEC);
    for (long t = t0; t < t1; t++) {
        const float *v = values + (direct ? t : r->seen[t]) * hd;
        for (long c = 0; c < chunks; c++) {
            vec vc = vload(v + c * VEC);
            for (long h = 0; h < nh; h++) acc[h][c] = vfma(vset(r->s[h * stride + t]), vc, acc[h][c]);
        }
    }
    for (long h = 0; h < nh; h++)
        for (long c = 0; c < chunks; c++) vstore(r->out[h] + c * VEC, acc[h][c]);
}

#define VALUE_SPAN (4 * VEC) /* keys whose values the rows of a task take in turn, from L1 */

/* Rows rows[0 .. nr - 1] of one kv head's heads: out[h] (hd) = softmax(q[h] k * scale) v. The first
   `shared` keys (a multiple of VEC), which every row sees, are taken a block at a time for all the rows,
   so that a block read from memory serves the other rows and heads from L1; each row then goes on over
   the rest of its own keys. Each row's sums run in the same order either way: its result depends on
   nothing but its own query and the keys and values it sees. */
static inline __attribute__((always_inline)) void attend(query_t *rows, long nr, long shared, const float *keys,
                                                        const float *values, const long hd, const long nh,
                                                        float scale, long stride) {
    for (long i = 0; i < nr; i++)
        for (long h = 0; h < nh; h++)
            for (long l = 0; l < VEC; l++) rows[i].tops[h][l] = -INFINITY;
    for (long t = 0; t < shared; t += VEC)
        for (long i = 0; i < nr; i++) score_block(rows + i, keys, t, 1, hd, nh, scale, stride);
    for (long i = 0; i < nr; i++)
        for (long t = shared; t < rows[i].count; t += VEC) score_block(rows + i, keys, t, 0, hd, nh, scale, stride);
    for (long i = 0; i < nr; i++) {  /* exponentials, summed VEC at a time */
        query_t *r = rows + i;
        for (long h = 0; h < nh; h++) {
            float *sh = r->s + h * stride, top = vmax_lanes(vload(r->tops[h]));
            for (long t = r->count; t % VEC; t++) sh[t] = -INFINITY;
            vec sums = vzero();
            for (long t = 0; t < r->count; t += VEC) {
                vec e = exp_nonpositive(vadd(vload(sh + t), vset(-top)));
                vstore(sh + t, e);
                sums = vadd(sums, e);
            }
            for (long c = 0; c < hd / VEC; c++) vstore(r->out[h] + c * VEC, vzero());
            r->total[h] = vsum(sums);
        }
    }
    for (long t = 0; t < shared; t += VALUE_SPAN) {
        long t1 = t + VALUE_SPAN < shared ? t + VALUE_SPAN : shared;
        for (long i = 0; i < nr; i++) value_span(rows + i, values, t, t1, 1, hd, nh, stride);
    }
    for (long i = 0; i < nr; i++) {
        query_t *r = rows + i;
        value_span(r, values, shared, r->count, 0, hd, nh, stride);
        for (long h = 0; h < nh; h++)
            for (long d = 0; d < hd; d++) r->out[h][d] = r->out[h][d] / r->total[h];
    }
}

/* attend with constant head counts and the common head sizes, so that the sums stay in registers */
static void attend_heads(query_t *rows, long nr, long shared, const float *keys, const float *values, long hd,
                         long nh, float scale, long stride) {
#define HEADS_CASE(n)                                                                         \
    case n:                                                                                   \
        if (hd == 64)                                                                         \
            attend(rows, nr, shared, keys, values, 64, n, scale, stride);                     \
        else if (hd == 128)                                                                   \
            attend(rows, nr, shared, keys, values, 128, n, scale, stride);                    \
        else                                                                                  \
            attend(rows, nr, shared, keys, values, hd, n, scale, stride);                     \
        break;
    switch (nh) { HEADS_CASE(1) HEADS_CASE(2) HEADS_CASE(3) HEADS_CASE(4) }
#undef HEADS_CASE
}

/* Whether attention_rows runs for this head size (else the caller uses torch). */
int attention_fits(long hd) { return hd % VEC == 0 && hd / VEC <= MAX_CHUNKS; }

/* out (n, heads * hd) = softmax(q k^T * scale) v per head, over keys/values (kv_heads, capacity, hd),
   entries 0 .. end; visible (n, end) bytes (1: query i may see key j), or NULL: every key.
   Query heads g * group .. g * group + group - 1 read kv head g (transformers' order). A task takes up
   to MAX_GROUP of the heads that share a kv head, for one of `blocks` runs of consecutive rows (as many
   runs as threads, so that a tree's rows split over them while each kv head's keys serve several rows). */
void attention_rows(const float *q, const float *keys, const float *values, long capacity, long end, long n,
                    long heads, long kv_heads, long hd, const uint8_t *visible, float scale, float *out,
                    int threads) {
    long group = heads / kv_heads, per = group < MAX_GROUP ? group : MAX_GROUP, parts = (group + per - 1) / per;
    long stride = (end + VEC - 1) / VEC * VEC, blocks = n < threads ? n : threads > 1 ? threads : 1;
    long *seen = malloc(n * end * sizeof(long)), *count = malloc(n * sizeof(long)), shared = end;
    for (long i = 0; i < n; i++) {  /* every row's visible keys, and how many leading keys all rows see */
        long c = 0, lead = -1;
        for (long j = 0; j < end; j++) {
            if (!visible || visible[i * end + j])
                seen[i * end + c++] = j;
            else if (lead < 0)
                lead = j;
        }
        count[i] = c;
        lead = lead < 0 ? end : lead;
        shared = lead < shared ? lead : shared;
    }
    shared -= shared % VEC;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && kv_heads * parts * blocks > 1)
    for (long task = 0; task < kv_heads * parts * blocks; task++) {
        long part = task / blocks, b = task % blocks, g = part / parts, h0 = g * group + part % parts * per;
        long rest = (g + 1) * group - h0, nh = rest < per ? rest : per;
        long r0 = b * n / blocks, nr = (b + 1) * n / blocks - r0;
        query_t *rows = malloc(nr * sizeof(query_t));
        float *s = malloc(nr * nh * stride * sizeof(float));
        for (long i = 0; i < nr; i++) {
            query_t *r = rows + i;
            long row = r0 + i;
            r->seen = seen + row * end, r->count = count[row], r->s = s + i * nh * stride;
            for (long h = 0; h < nh; h++)
                r->q[h] = q + ((h0 + h) * n + row) * hd, r->out[h] = out + row * heads * hd + (h0 + h) * hd;
        }
        attend_heads(rows, nr, shared, keys + g * capacity * hd, values + g * capacity * hd, hd, nh, scale, stride);
        free(rows), free(s);
    }
    free(seen), free(count);
}

/* The MLP's middle: from the fused gate/up product's rows acc (n, 2 I), gate and up rescaled, then
   silu(gate) * up quantized into q (n, I), scale (n). silu(g) = g * sigmoid(g), the sigmoid through
   e = e^-|g|: 1 / (1 + e) for g >= 0, e / (1 + e) below. `h` is scratch of I + VEC floats. */
void silu_mul_quantize(const int32_t *acc, const float *wscale, const float *xscale, const float *bias, long n,
                       long I, float *h, int8_t *q, float *scale) {
    for (long i = 0; i < n; i++) {
        const int32_t *row = acc + i * 2 * I;
        for (long j = 0; j < I; j++) h[j] = rescale(row[j], wscale[j], xscale[i], bias, j);  /* gate */
        for (long j = I; j < I + VEC; j++) h[j] = 0.0f;
        for (long j = 0; j < I; j += VEC) {  /* every value through the same vector code */
            vec g = vload(h + j);
            vec e = exp_nonpositive(vmul(vmax(g, vmul(g, vset(-1.0f))), vset(-1.0f)));
            vec sigmoid = vdiv(vif_nonnegative(g, vset(1.0f), e), vadd(vset(1.0f), e));
            vstore(h + j, vmul(g, sigmoid));
        }
        for (long j = 0; j < I; j++) h[j] = h[j] * rescale(row[I + j], wscale[I + j], xscale[i], bias, I + j);
        quantize_row(h, I, q + i * I, scale + i);
    }
}

/* ---- int8 x int8 -> int32 products, equal to torch._int_mm bit for bit (integer sums are exact) ----

   oneDNN's int8 GEMM, behind torch._int_mm, reaches a fraction of memory bandwidth for the few rows a
   decode step or a small tree has. These kernels stream each weight once per call and keep every row's
   sums in registers. Weights are packed once (`gemm_pack`) into blocks of LANES output channels, each
   block K/4 groups of LANES x 4 bytes: lane j of group g holds w[n0 + j][4g .. 4g + 3], the four
   products one instruction sums into lane j's int32.
     AVX-512 VNNI: vpdpbusd multiplies unsigned by signed bytes, so a row is fed as a + 128 (a byte
       xor) and 128 * sum_k w[n][k] is subtracted at the end (`corr`);
     AVX2: |a| times w with a's sign (vpsignb), pairs summed in int16 (vpmaddubsw; at most
       2 * 127 * 127, so it never saturates), then in int32 (vpmaddwd).
   Rows are taken ROWS at a time against TILE blocks; OpenMP splits the tiles over the threads (the
   library links the OpenMP runtime torch already loaded). */

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define GEMM_ISA 2
#define LANES 16
#define TILE 4 /* blocks per tile: 4 x 16 channels */
#define ROWS 6 /* 24 sums + 4 weight vectors in 32 registers */
/* A tile's weights (4 x 16 x K bytes: 36 KB at K = 576) outgrow a 32 KB L1, so the next tile is fetched
   into L2: into L1 it evicted the current tile's lines (Zen 4, 2 threads: a one-row product set 5.9 ms
   with T0, 4.8 ms with T1; docs/experiments.md). */
#define PREFETCH_HINT _MM_HINT_T1
#elif defined(__AVX2__)
#include <immintrin.h>
#define GEMM_ISA 1
#define LANES 8
#define TILE 2
#define ROWS 4 /* 8 sums + 2 weight vectors + temporaries in 16 registers */
#define PREFETCH_HINT _MM_HINT_T0 /* a tile is 2 x 8 x K bytes: 9 KB at K = 576, it fits L1 */
#else
#define GEMM_ISA 0
#define LANES 8
#define TILE 1
#define ROWS 1
#endif

/* 2: AVX-512 VNNI, 1: AVX2, 0: none (callers use torch._int_mm); negative: built without OpenMP. */
int gemm_isa(void) {
#ifdef _OPENMP
    return GEMM_ISA;
#else
    return -GEMM_ISA;
#endif
}

long gemm_lanes(void) { return LANES; }

/* w (N, K) row-major int8, K % 4 == 0 -> packed (ceil(N / LANES) blocks of K * LANES bytes; channels
   past N are zero) and corr[n] = 128 * sum_k w[n][k] (used by the VNNI kernel). */
void gemm_pack(const int8_t *w, long N, long K, int8_t *packed, int32_t *corr) {
    long blocks = (N + LANES - 1) / LANES, groups = K / 4;
    for (long b = 0; b < blocks; b++)
        for (long g = 0; g < groups; g++)
            for (long j = 0; j < LANES; j++) {
                long n = b * LANES + j;
                int8_t *dst = packed + ((b * groups + g) * LANES + j) * 4;
                for (long t = 0; t < 4; t++) dst[t] = n < N ? w[n * K + 4 * g + t] : 0;
            }
    for (long n = 0; n < N; n++) {
        int32_t s = 0;
        for (long k = 0; k < K; k++) s += w[n * K + k];
        corr[n] = 128 * s;
    }
}

#if GEMM_ISA > 0
/* Into cache: the g-th TILE * LANES * 4 bytes of a tile (its TILE blocks are contiguous, so steps
   0 .. groups - 1 cover it all), one 64-byte line at a time. Forced inline: GCC takes a call to a function
   that only prefetches for one without effects and drops it. */
static inline __attribute__((always_inline)) void prefetch_group(const char *tile, long g) {
    for (long b = 0; b < TILE * LANES * 4; b += 64) _mm_prefetch(tile + g * TILE * LANES * 4 + b, PREFETCH_HINT);
}

/* out[m][n] for rows m0 .. m0 + rows and blocks b0 .. b0 + nb; `x` is the rows as the kernel reads them
   (VNNI: a + 128 as unsigned bytes; AVX2: a itself). Inlined with constant `rows` and `nb` (gemm_rows)
   so that the sums stay in registers. */
static inline __attribute__((always_inline)) void gemm_tile(const uint8_t *x, long K, const int8_t *packed,
                                                            const int32_t *corr, long N, int32_t *out, long m0,
                                                            const long rows, long b0, const long nb) {
    long groups = K / 4;
    int32_t lanes[LANES];
    /* The first row block streams this tile's weights from memory; step by step it also asks for the
       next tile's, so that the later blocks' arithmetic hides that load. */
    const char *ahead = m0 == 0 ? (const char *)(packed + (b0 + nb) * groups * LANES * 4) : NULL;
#if GEMM_ISA == 2
    __m512i acc[ROWS][TILE];
    for (long r = 0; r < rows; r++)
        for (long t = 0; t < nb; t++) acc[r][t] = _mm512_setzero_si512();
    for (long g = 0; g < groups; g++) {
        __m512i w[TILE];
        for (long t = 0; t < nb; t++) w[t] = _mm512_loadu_si512(packed + ((b0 + t) * groups + g) * LANES * 4);
        if (ahead) prefetch_group(ahead, g);
        for (long r = 0; r < rows; r++) {
            int32_t four;
            memcpy(&four, x + (m0 + r) * K + 4 * g, 4);
            __m512i xr = _mm512_set1_epi32(four);
            for (long t = 0; t < nb; t++) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], xr, w[t]);
        }
    }
    for (long r = 0; r < rows; r++)
        for (long t = 0; t < nb; t++) {
            _mm512_storeu_si512(lanes, acc[r][t]);
            for (long j = 0; j < LANES; j++) {
                long n = (b0 + t) * LANES + j;
                if (n < N) out[(m0 + r) * N + n] = lanes[j] - corr[n];
            }
        }
#else
    __m256i acc[ROWS][TILE];
    for (long r = 0; r < rows; r++)
        for (long t = 0; t < nb; t++) acc[r][t] = _mm256_setzero_si256();
    const __m256i ones = _mm256_set1_epi16(1);
    for (long g = 0; g < groups; g++) {
        __m256i w[TILE];
        for (long t = 0; t < nb; t++)
            w[t] = _mm256_loadu_si256((const __m256i *)(packed + ((b0 + t) * groups + g) * LANES * 4));
        if (ahead) prefetch_group(ahead, g);
        for (long r = 0; r < rows; r++) {
            int32_t four;
            memcpy(&four, x + (m0 + r) * K + 4 * g, 4);
            __m256i xr = _mm256_set1_epi32(four), ax = _mm256_abs_epi8(xr);
            for (long t = 0; t < nb; t++) {
                __m256i pairs = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(w[t], xr));
                acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(pairs, ones));
            }
        }
    }
    (void)corr;
    for (long r = 0; r < rows; r++)
        for (long t = 0; t < nb; t++) {
            _mm256_storeu_si256((__m256i *)lanes, acc[r][t]);
            for (long j = 0; j < LANES; j++) {
                long n = (b0 + t) * LANES + j;
                if (n < N) out[(m0 + r) * N + n] = lanes[j];
            }
        }
#endif
}

/* gemm_tile over full tiles for `rows` rows (1 .. ROWS), each count compiled on its own */
static void gemm_rows(const uint8_t *x, long K, const int8_t *packed, const int32_t *corr, long N, int32_t *out,
                      long m0, long rows, long b0) {
    switch (rows) {
#define ROWS_CASE(r) \
    case r: gemm_tile(x, K, packed, corr, N, out, m0, r, b0, TILE); break;
        ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4)
#if ROWS > 4
        ROWS_CASE(5) ROWS_CASE(6)
#endif
#undef ROWS_CASE
    }
}

/* the last tile when it has fewer than TILE blocks: one block and one row at a time */
static void gemm_tail(const uint8_t *x, long K, const int8_t *packed, const int32_t *corr, long N, int32_t *out,
                      long m0, long rows, long b0, long nb) {
    for (long b = b0; b < b0 + nb; b++)
        for (long r = 0; r < rows; r++) gemm_tile(x, K, packed, corr, N, out, m0 + r, 1, b, 1);
}
#endif

/* out (M, N) int32 = a (M, K) int8 @ w^T for w packed by gemm_pack; `threads` OpenMP threads. */
void gemm_int8(const int8_t *a, long M, long K, const int8_t *packed, const int32_t *corr, long N, int32_t *out,
               int threads) {
#if GEMM_ISA > 0
    long blocks = (N + LANES - 1) / LANES, tiles = (blocks + TILE - 1) / TILE;
    uint8_t stack[8192], *x = M * K <= (long)sizeof stack ? stack : malloc(M * K);
    for (long i = 0; i < M * K; i++) x[i] = GEMM_ISA == 2 ? (uint8_t)(a[i] + 128) : (uint8_t)a[i];
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && tiles > 1)
    for (long tile = 0; tile < tiles; tile++) {
        long b0 = tile * TILE, nb = blocks - b0 < TILE ? blocks - b0 : TILE;
        for (long m0 = 0; m0 < M; m0 += ROWS) {
            long rows = M - m0 < ROWS ? M - m0 : ROWS;
            if (nb == TILE)
                gemm_rows(x, K, packed, corr, N, out, m0, rows, b0);
            else
                gemm_tail(x, K, packed, corr, N, out, m0, rows, b0, nb);
        }
    }
    if (x != stack) free(x);
#else
    (void)a, (void)M, (void)K, (void)packed, (void)corr, (void)N, (void)out, (void)threads;
#endif
}

/* ---- the whole int8 forward of a lean model in one call ---- */

#ifndef SPLIT_ROWS
#define SPLIT_ROWS 2 /* rows from which forward_rows splits its steps between products over the threads */
#endif

typedef struct {
    const int8_t *packed; /* gemm_pack's layout */
    const int32_t *corr;
    const float *wscale, *bias; /* (N), (N) or NULL */
    long N, K;
} linear_t;

typedef struct {
    linear_t qkv, o, gate_up, down;
    const float *norm_in, *norm_post;
    float eps_in, eps_post, scaling;
} layer_t;

#if GEMM_ISA > 0
/* Scratch kept between calls, one per calling thread and user: a fresh allocation this size would be
   mapped and zeroed by the kernel on every call. */
typedef struct {
    char *data;
    size_t bytes;
} scratch_t;

static char *grown(scratch_t *s, size_t bytes) {
    if (bytes > s->bytes) {
        free(s->data);
        s->data = malloc(bytes);
        s->bytes = s->data ? bytes : 0;
    }
    return s->data;
}

static __thread scratch_t workspace; /* forward_rows' */

static char *scratch(size_t bytes) { return grown(&workspace, bytes); }

static size_t aligned(size_t bytes) { return (bytes + 63) & ~(size_t)63; }

static void product(const int8_t *q, long n, const linear_t *w, int32_t *acc, int threads) {
    gemm_int8(q, n, w->K, w->packed, w->corr, w->N, acc, threads);
}
#endif

/* What engine/lean.py's per-call path computes (`LeanForward._forward_rows`), the same functions in the
   same order, for n rows through all layers: x (n, H) is the residual stream, updated in place; keys and
   values (layers, kv_heads, capacity, hd) get entries past .. past + n; out (n, H) the final norm's rows.
   Without the first layer's input norm its input is quantized as it is, without a final norm out is x
   (an EAGLE-1/2 draft head's layer). */
void forward_rows(const layer_t *layers, long count, float *x, long n, long H, const float *cos, const float *sin,
                  long heads, long kv_heads, long hd, float *keys, float *values, long capacity, long past,
                  const uint8_t *visible, const float *final_norm, float final_eps, float *out, int threads) {
#if GEMM_ISA > 0
    long widest = H;
    for (long l = 0; l < count; l++) {
        const layer_t *w = layers + l;
        long sizes[] = {w->qkv.N, w->gate_up.N, w->down.K, heads * hd};
        for (int s = 0; s < 4; s++) widest = sizes[s] > widest ? sizes[s] : widest;
    }
    size_t sizes[] = {aligned(n * widest * sizeof(int32_t)), aligned(n * widest), aligned(n * sizeof(float)),
                      aligned((widest + VEC) * sizeof(float)) * (threads > 1 ? threads : 1),
                      aligned(heads * n * hd * sizeof(float))};
    size_t total = 0;
    for (int s = 0; s < 5; s++) total += sizes[s];
    char *base = scratch(total + aligned(n * heads * hd * sizeof(float)));
    if (!base) return;
    int32_t *acc = (int32_t *)base;
    int8_t *q = (int8_t *)(base += sizes[0]);
    float *scale = (float *)(base += sizes[1]);
    float *h = (float *)(base += sizes[2]);
    float *qf = (float *)(base += sizes[3]);
    float *att = (float *)(base + sizes[4]);
    long layer_kv = kv_heads * capacity * hd, end = past + n;
    if (layers[0].norm_in)
        rms_quantize(x, layers[0].norm_in, layers[0].eps_in, n, H, h, q, scale);
    else  /* an EAGLE-1/2 head's layer reads its input without a norm */
        quantize_rows(x, n, H, q, scale);
    long hstride = sizes[3] / (threads > 1 ? threads : 1) / sizeof(float);
    /* The steps between products, row by row: with several rows each thread takes a run of them, with
       its own scratch (a row's result does not depend on which thread computes it). */
#ifdef _OPENMP
#define ROW_SPLIT(step)                                                                                  \
    if (threads > 1 && n >= SPLIT_ROWS) {                                                               \
        _Pragma("omp parallel num_threads(threads)") {                                                   \
            long T = omp_get_num_threads(), t = omp_get_thread_num(), i0 = n * t / T, r = n * (t + 1) / T - i0; \
            float *hh = h + t * hstride;                                                                 \
            (void)hh;                                                                                    \
            step;                                                                                        \
        }                                                                                                \
    } else {                                                                                             \
        long i0 = 0, r = n;                                                                              \
        float *hh = h;                                                                                   \
        (void)hh;                                                                                        \
        step;                                                                                            \
    }
#else
#define ROW_SPLIT(step) { long i0 = 0, r = n; float *hh = h; (void)hh, (void)hstride; step; }
#endif
    for (long l = 0; l < count; l++) {
        const layer_t *w = layers + l;
        float *k = keys + l * layer_kv, *v = values + l * layer_kv;
        long I = w->down.K;
        product(q, n, &w->qkv, acc, threads);
        ROW_SPLIT(qkv_rotate_span(acc, w->qkv.wscale, scale, w->qkv.bias, cos, sin, n, i0, i0 + r, heads, kv_heads,
                                  hd, qf, k, v, capacity, past, hh))
        attention_rows(qf, k, v, capacity, end, n, heads, kv_heads, hd, visible, w->scaling, att, threads);
        ROW_SPLIT(quantize_rows(att + i0 * heads * hd, r, heads * hd, q + i0 * heads * hd, scale + i0))
        product(q, n, &w->o, acc, threads);
        ROW_SPLIT(residual_rms_quantize(acc + i0 * H, w->o.wscale, scale + i0, w->o.bias, x + i0 * H, w->norm_post,
                                        w->eps_post, r, H, hh, q + i0 * H, scale + i0))
        product(q, n, &w->gate_up, acc, threads);
        ROW_SPLIT(silu_mul_quantize(acc + i0 * 2 * I, w->gate_up.wscale, scale + i0, w->gate_up.bias, r, I, hh,
                                    q + i0 * I, scale + i0))
        product(q, n, &w->down, acc, threads);
        const layer_t *next = l + 1 < count ? w + 1 : NULL;
        ROW_SPLIT(residual_rms_quantize(acc + i0 * H, w->down.wscale, scale + i0, w->down.bias, x + i0 * H,
                                        next ? next->norm_in : NULL, next ? next->eps_in : 0.0f, r, H, hh,
                                        q + i0 * H, scale + i0))
    }
#undef ROW_SPLIT
    if (final_norm)
        rms_norm_rows(x, final_norm, final_eps, n, H, out);
    else
        memcpy(out, x, n * H * sizeof(float));
#else
    (void)layers, (void)count, (void)x, (void)n, (void)H, (void)cos, (void)sin, (void)heads, (void)kv_heads;
    (void)hd, (void)keys, (void)values, (void)capacity, (void)past, (void)visible, (void)final_norm;
    (void)final_eps, (void)out, (void)threads;
#endif
}

/* ---- choosing tokens ---- */

#define CHUNK 64 /* values per chunk maximum: a multiple of VEC */

/* out[i] = the first index of row i's largest value (x (n, V), rows without NaN), as torch's argmax:
   the largest chunk maximum (the first chunk holding it), then the first index in that chunk. */
void argmax_rows(const float *x, long n, long V, int64_t *out) {
    for (long i = 0; i < n; i++) {
        const float *row = x + i * V;
        float best = -INFINITY;
        long chunk = -1, at = 0, chunks = V / CHUNK;
        for (long c = 0; c < chunks; c++) {
            vec m = vload(row + c * CHUNK);
            for (long d = VEC; d < CHUNK; d += VEC) m = vmax(m, vload(row + c * CHUNK + d));
            float top = vmax_lanes(m);
            if (top > best) best = top, chunk = c;
        }
        if (chunk >= 0)
            for (at = chunk * CHUNK; row[at] != best; at++) {}
        for (long j = chunks * CHUNK; j < V; j++)  /* the tail after the last whole chunk */
            if (row[j] > best || chunk < 0) best = row[j], at = j, chunk = 0;
        out[i] = at;
    }
}

/* The k largest log-softmax values of each row of x (n, V), V >= k, and their indices, largest first
   (ties: the lower index first): values (n, k), idx (n, k). For drafting: float32 throughout. */
void top_logsoftmax(const float *x, long n, long V, long k, float *values, int64_t *idx) {
    for (long i = 0; i < n; i++) {
        const float *row = x + i * V;
        float *val = values + i * k;
        int64_t *ix = idx + i * k;
        long kept = 0;
        for (long j = 0; j < V; j++) {
            float v = row[j];
            if (kept == k && !(v > val[k - 1])) continue;
            long at = kept < k ? kept++ : k - 1;  /* insert v, keeping val sorted (largest first) */
            while (at > 0 && v > val[at - 1]) val[at] = val[at - 1], ix[at] = ix[at - 1], at--;
            val[at] = v, ix[at] = j;
        }
        float top = val[0];
        vec sums = vzero();
        long j = 0;
        for (; j + VEC <= V; j += VEC) sums = vadd(sums, exp_nonpositive(vadd(vload(row + j), vset(-top))));
        float total = vsum(sums);
        if (j < V) {  /* the tail: one more vector, only its real values summed */
            float lane[VEC], e[VEC];
            for (long l = 0; l < VEC; l++) lane[l] = j + l < V ? row[j + l] - top : 0.0f;
            vstore(e, exp_nonpositive(vload(lane)));
            for (long l = 0; j + l < V; l++) total += e[l];
        }
        float lse = top + logf(total);
        for (long t = 0; t < kept; t++) val[t] -= lse;
    }
}

/* ---- drafting with an EAGLE-1/2 head ---- */

#if GEMM_ISA > 0
static __thread scratch_t draft_space; /* the draft functions' own: they call forward_rows */

static char *draft_scratch(size_t bytes) { return grown(&draft_space, bytes); }
#endif

/* The k largest draft log-probs of each of m rows of hidden (m, H) over lm's rows (a draft vocabulary),
   as engine/draft.py's per-call path computes them (int8 products, log-softmax, top-k): scores and ids
   (m, k), largest first, ids mapped through vocab (NULL: the row index). */
void draft_scores(const float *hidden, long m, long H, const linear_t *lm, const int64_t *vocab, long k,
                  float *scores, int64_t *ids, int threads) {
#if GEMM_ISA > 0
    long V = lm->N;
    size_t sizes[] = {aligned(m * H), aligned(m * sizeof(float)), aligned(m * V * sizeof(int32_t))};
    char *base = draft_scratch(sizes[0] + sizes[1] + sizes[2] + aligned(m * V * sizeof(float)));
    if (!base) return;
    int8_t *q = (int8_t *)base;
    float *scale = (float *)(base += sizes[0]);
    int32_t *acc = (int32_t *)(base += sizes[1]);
    float *logits = (float *)(base + sizes[2]);
    quantize_rows(hidden, m, H, q, scale);
    product(q, m, lm, acc, threads);
    rescale_rows(acc, lm->wscale, scale, lm->bias, m, V, logits);
    top_logsoftmax(logits, m, V, k, scores, ids);
    if (vocab)
        for (long t = 0; t < m * k; t++) ids[t] = vocab[ids[t]];
#else
    (void)hidden, (void)m, (void)H, (void)lm, (void)vocab, (void)k, (void)scores, (void)ids, (void)threads;
#endif
}

/* One step of an EAGLE-1/2 head over n rows in one call, as engine/draft.py's per-call path computes it:
   x = fc([embed[tokens], features]) with int8 products, then the head's layer (forward_rows without an
   input norm), writing keys and values at past .. past + n; hidden (n, H) is its output. Rows see every
   cache entry before `committed`, and entries committed .. past + n as `slots` says ((n, past + n -
   committed) uint8, row-major) or, with slots NULL, causally (entry j for j <= past + i). cos_table and
   sin_table hold the rotary angles of every position (hd wide). Where lm is not NULL, draft_scores then
   scores every row into scores and ids (n, k). */
void draft_rows(const layer_t *layer, const linear_t *fc, const float *embed, const int64_t *tokens,
                const float *features, long n, long H, const float *cos_table, const float *sin_table,
                const int64_t *positions, long heads, long kv_heads, long hd, float *keys, float *values,
                long capacity, long committed, long past, const uint8_t *slots, const linear_t *lm,
                const int64_t *vocab, long k, float *hidden, float *scores, int64_t *ids,
                int threads) {
#if GEMM_ISA > 0
    long end = past + n;
    size_t sizes[] = {aligned(n * 2 * H * sizeof(float)), aligned(n * 2 * H), aligned(n * sizeof(float)),
                      aligned(n * H * sizeof(int32_t)), aligned(n * H * sizeof(float)),
                      aligned(n * hd * sizeof(float)), aligned(n * hd * sizeof(float))};
    size_t total = aligned(n * end);
    for (int s = 0; s < 7; s++) total += sizes[s];
    char *base = draft_scratch(total);
    if (!base) return;
    float *in = (float *)base;
    int8_t *q = (int8_t *)(base += sizes[0]);
    float *scale = (float *)(base += sizes[1]);
    int32_t *acc = (int32_t *)(base += sizes[2]);
    float *x = (float *)(base += sizes[3]);
    float *cos = (float *)(base += sizes[4]);
    float *sin = (float *)(base += sizes[5]);
    uint8_t *visible = (uint8_t *)(base + sizes[6]);
    for (long i = 0; i < n; i++) {
        memcpy(in + i * 2 * H, embed + tokens[i] * H, H * sizeof(float));
        memcpy(in + i * 2 * H + H, features + i * H, H * sizeof(float));
        memcpy(cos + i * hd, cos_table + positions[i] * hd, hd * sizeof(float));
        memcpy(sin + i * hd, sin_table + positions[i] * hd, hd * sizeof(float));
        uint8_t *row = visible + i * end;
        memset(row, 1, committed);
        for (long j = committed; j < end; j++)
            row[j] = slots ? slots[i * (end - committed) + j - committed] : (uint8_t)(j <= past + i);
    }
    quantize_rows(in, n, 2 * H, q, scale);
    product(q, n, fc, acc, threads);
    rescale_rows(acc, fc->wscale, scale, fc->bias, n, H, x);
    forward_rows(layer, 1, x, n, H, cos, sin, heads, kv_heads, hd, keys, values, capacity, past, visible, NULL,
                 0.0f, hidden, threads);
    if (lm) /* its scratch may move draft_space: nothing above is read again */
        draft_scores(hidden, n, H, lm, vocab, k, scores, ids, threads);
#else
    (void)layer, (void)fc, (void)embed, (void)tokens, (void)features, (void)n, (void)H, (void)cos_table;
    (void)sin_table, (void)positions, (void)heads, (void)kv_heads, (void)hd, (void)keys, (void)values;
    (void)capacity, (void)committed, (void)past, (void)slots, (void)lm, (void)vocab, (void)k;
    (void)hidden, (void)scores, (void)ids, (void)threads;
#endif
}

/* ---- an EAGLE-2 draft tree in one call ---- */

#if GEMM_ISA > 0
/* Whether pool entry a ranks before entry b in the rerank: the higher score, then the earlier entry
   (a stable sort by descending score). */
static inline int ranks_before(const float *score, long a, long b) {
    return score[a] > score[b] || (score[a] == score[b] && a < b);
}

/* The `keep` best entries of a pool of m (ranks_before), into best[0 .. keep - 1] in rank order. */
static void best_entries(const float *score, long m, long keep, long *best) {
    long kept = 0;
    for (long i = 0; i < m; i++) {
        if (kept == keep && !ranks_before(score, i, best[keep - 1])) continue;
        long at = kept < keep ? kept++ : keep - 1;
        while (at > 0 && ranks_before(score, i, best[at - 1])) best[at] = best[at - 1], at--;
        best[at] = i;
    }
}
#endif

/* What engine/draft.py's Drafter.dynamic_tree and engine/tree.py's select_dynamic compute with the
   head's int8 copy, in one call: EAGLE-2's expansion of the top-k frontier by cumulative draft log-prob
   to `depth` (each level one draft_rows over the frontier, its scratch entries after the draft cache's
   `committed` entries, which must equal its used ones), with the exact early stop when `prune` (no
   frontier node beats the pool's `total`-th best score), then the rerank keeping the `total` best. The
   root's hidden state is root_hidden (H,), its token root_token. Writes the tree's nodes (root first,
   then the kept candidates in pool order: topological) into tokens, parents, depths, scores (each room
   for total + 1), ancestors ((n, n) uint8: [i][j] j is i or an ancestor of i) and paths ((n, depth + 1):
   row i the nodes from the root to i by depth, -1 after i); returns n. The draft cache's scratch entries
   stay written (the next extend drops them): *written is how many, (levels run) * k. */
long draft_tree(const layer_t *layer, const linear_t *fc, const float *embed, long H, const float *cos_table,
                const float *sin_table, long heads, long kv_heads, long hd, float *keys, float *values,
                long capacity, long committed, const linear_t *lm, const int64_t *vocab, const float *root_hidden,
                int64_t root_token, long total, long depth, long k, int prune, int64_t *tokens, int64_t *parents,
                int64_t *depths, float *scores, uint8_t *ancestors, int64_t *paths, long *written, int threads) {
#if GEMM_ISA > 0
    long m_max = k + (depth - 1) * k * k, cols = (depth - 1) * k > 1 ? (depth - 1) * k : 1;
    long pool_bytes = m_max * (sizeof(int64_t) * 3 + sizeof(float));
    long level_bytes = k * H * sizeof(float) * 2 + k * k * (sizeof(float) + sizeof(int64_t)) + k * cols * 2;
    char *space = malloc(pool_bytes + level_bytes + (m_max + 1) * sizeof(long) * 2 + k * sizeof(int64_t) * 3);
    if (!space) return 0;
    int64_t *pool_tok = (int64_t *)space, *pool_par = pool_tok + m_max, *pool_dep = pool_par + m_max;
    float *pool_score = (float *)(pool_dep + m_max);
    float *feats = pool_score + m_max, *hidden = feats + k * H, *top_s = hidden + k * H;
    int64_t *top_t = (int64_t *)(top_s + k * k);
    uint8_t *slots = (uint8_t *)(top_t + k * k), *next_slots = slots + k * cols;
    long *order = (long *)(next_slots + k * cols), *remap = order + m_max + 1;
    int64_t *front = (int64_t *)(remap + m_max + 1), *front_tok = front + k, *positions = front_tok + k;
    float front_score[k];

    *written = 0;
    /* depth 1: the root's top k */
    draft_scores(root_hidden, 1, H, lm, vocab, k, top_s, top_t, threads);
    long m = 0;
    for (long j = 0; j < k; j++, m++) {
        pool_tok[m] = top_t[j], pool_score[m] = top_s[j], pool_par[m] = -1, pool_dep[m] = 1;
        front[j] = m, front_tok[j] = top_t[j], front_score[j] = top_s[j];
        memcpy(feats + j * H, root_hidden, H * sizeof(float));
    }
    memset(slots, 0, k * cols);
    for (long d = 2; d <= depth; d++) {
        long step = d - 2, width = (step + 1) * k;
        for (long r = 0; r < k; r++) slots[r * cols + step * k + r] = 1; /* each frontier node sees itself */
        uint8_t visible[k * width];
        for (long r = 0; r < k; r++) memcpy(visible + r * width, slots + r * cols, width);
        for (long r = 0; r < k; r++) positions[r] = committed - 2 + d;
        draft_rows(layer, fc, embed, front_tok, feats, k, H, cos_table, sin_table, positions, heads, kv_heads, hd,
                   keys, values, capacity, committed, committed + step * k, visible, lm, vocab, k, hidden, top_s,
                   top_t, threads);
        float *cand = pool_score + m;
        for (long r = 0; r < k; r++)
            for (long j = 0; j < k; j++) {
                long c = r * k + j;
                pool_tok[m + c] = top_t[c], pool_par[m + c] = front[r], pool_dep[m + c] = d;
                cand[c] = front_score[r] + top_s[c];
            }
        long best[k];
        best_entries(cand, k * k, k, best);
        for (long r = 0; r < k; r++) {
            long row = best[r] / k;
            front[r] = m + best[r], front_tok[r] = top_t[best[r]], front_score[r] = cand[best[r]];
            memcpy(feats + r * H, hidden + row * H, H * sizeof(float));
            memcpy(next_slots + r * cols, slots + row * cols, cols);
        }
        memcpy(slots, next_slots, k * cols);
        m += k * k;
        *written = (step + 1) * k;
        if (prune && d < depth && m >= total) { /* settled: no frontier node beats the total-th best */
            best_entries(pool_score, m, total, order);
            float top = front_score[0];
            for (long r = 1; r < k; r++) top = front_score[r] > top ? front_score[r] : top;
            if (top <= pool_score[order[total - 1]]) break;
        }
    }
    /* the rerank: the `total` best entries, back in pool order */
    long keep = total < m ? total : m;
    best_entries(pool_score, m, keep, order);
    for (long i = 1; i < keep; i++) { /* ascending pool index */
        long v = order[i], at = i;
        while (at > 0 && order[at - 1] > v) order[at] = order[at - 1], at--;
        order[at] = v;
    }
    for (long i = 0; i < m; i++) remap[i] = -1;
    for (long i = 0; i < keep; i++) remap[order[i]] = i + 1;
    long n = keep + 1;
    tokens[0] = root_token, parents[0] = -1, depths[0] = 0, scores[0] = 0.0f;
    for (long i = 0; i < keep; i++) {
        long e = order[i];
        tokens[i + 1] = pool_tok[e], depths[i + 1] = pool_dep[e], scores[i + 1] = pool_score[e];
        parents[i + 1] = pool_par[e] < 0 ? 0 : remap[pool_par[e]];
    }
    memset(ancestors, 0, n * n);
    for (long i = 0; i < n * (depth + 1); i++) paths[i] = -1;
    for (long i = 0; i < n; i++)
        for (long j = i; j >= 0; j = parents[j]) {
            ancestors[i * n + j] = 1;
            paths[i * (depth + 1) + depths[j]] = j;
            if (j == 0) break;
        }
    free(space);
    return n;
#else
    (void)layer, (void)fc, (void)embed, (void)H, (void)cos_table, (void)sin_table, (void)heads, (void)kv_heads;
    (void)hd, (void)keys, (void)values, (void)capacity, (void)committed, (void)lm, (void)vocab, (void)root_hidden;
    (void)root_token, (void)total, (void)depth, (void)k, (void)prune, (void)tokens, (void)parents, (void)depths;
    (void)scores, (void)ancestors, (void)paths, (void)written, (void)threads;
    return 0;
#endif
}

/* ---- acceptance ---- */

/* engine/verify.py accept over a tree of n nodes in topological order (parents[i] < i, parents[0] = -1):
   the first node of the largest depth whose root path matches the target's draws (node i matches when
   tokens[i] == drawn[parents[i]]; the root always does). Other nodes without a parent (padding, depth 0)
   never beat the root. */
long accept_path(const int64_t *tokens, const int64_t *parents, const int64_t *depths, const int64_t *drawn,
                 long n) {
    uint8_t ok[n];
    long best = 0;
    ok[0] = 1;
    for (long i = 1; i < n; i++) {
        if (parents[i] < 0) {
            ok[i] = 0;
            continue;
        }
        ok[i] = ok[parents[i]] && tokens[i] == drawn[parents[i]];
        if (ok[i] && depths[i] > depths[best]) best = i;
    }
    return best;
}
