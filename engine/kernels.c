/* Row-wise kernels around the int8 products of the lean forward (engine/lean.py, engine/kernels.py).

   A one-token step of a small model on a CPU spends more time dispatching small tensor ops (norms,
   per-row quantization, rescaling, rotary embedding, cache writes: about 80 per layer) than in its
   integer products. These functions do that work in a few calls per layer, straight over the rows.

   Invariant: every output row depends on its own input row only, computed by the same code whatever
   the number of rows, so a token verified in a tree gets the very bits it gets alone. Built with
   -ffp-contract=off: no fused multiply-adds, every operation rounds as written. Quantization and
   rescaling then reproduce engine/int8.py's torch code bit for bit; the RMS norm sums its squares in
   double, in order, so it differs from torch's in the last bit now and then. */

#include <math.h>
#include <stdint.h>

#define QMAX 127.0f

/* Symmetric int8 quantization of one row, as engine/int8.py's quantize_rows:
   scale = max(max |h|, 1e-12) / 127, q = round-half-even(h / scale). */
static void quantize_row(const float *h, long K, int8_t *q, float *scale) {
    float amax = 0.0f;
    for (long k = 0; k < K; k++) {
        float a = fabsf(h[k]);
        amax = a > amax ? a : amax;
    }
    float s = (amax < 1e-12f ? 1e-12f : amax) / QMAX;
    for (long k = 0; k < K; k++) q[k] = (int8_t)nearbyintf(h[k] / s);
    *scale = s;
}

/* (acc * wscale) * xscale (+ bias), as Int8Linear.forward rescales. */
static inline float rescale(int32_t acc, float wscale, float xscale, const float *bias, long j) {
    float y = ((float)acc * wscale) * xscale;
    return bias ? y + bias[j] : y;
}

static float inverse_rms(const float *x, long K, float eps) {
    double sum = 0.0;
    for (long k = 0; k < K; k++) sum += (double)x[k] * (double)x[k];
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
static void rotate(const float *v, const float *cos, const float *sin, long hd, double *out) {
    long half = hd / 2;
    for (long d = 0; d < hd; d++) {
        float rotated = d < half ? -v[d + half] : v[d - half];
        out[d] = (double)(v[d] * cos[d] + rotated * sin[d]);
    }
}

/* The fused q/k/v product's rows, rescaled: q and k rotated (cos, sin: (n, hd)); q written to
   q_out (heads, n, hd) and k, v to this layer's float64 cache (kv_heads, capacity, hd) at past + i.
   `v` is scratch of hd floats. */
void qkv_rotate_store(const int32_t *acc, const float *wscale, const float *xscale, const float *bias,
                      const float *cos, const float *sin, long n, long heads, long kv_heads, long hd,
                      double *q_out, double *keys, double *values, long capacity, long past, float *v) {
    long width = (heads + 2 * kv_heads) * hd;
    for (long i = 0; i < n; i++) {
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
                double *dst = values + ((h - heads - kv_heads) * capacity + past + i) * hd;
                for (long d = 0; d < hd; d++) dst[d] = (double)v[d];
            }
        }
    }
}

/* The attention output (heads, n, hd) in float64, as rows (n, heads * hd) in float32, quantized.
   `h` is scratch of heads * hd floats. */
void heads_quantize(const double *o, long n, long heads, long hd, float *h, int8_t *q, float *scale) {
    for (long i = 0; i < n; i++) {
        for (long head = 0; head < heads; head++)
            for (long d = 0; d < hd; d++) h[head * hd + d] = (float)o[(head * n + i) * hd + d];
        quantize_row(h, heads * hd, q + i * heads * hd, scale + i);
    }
}
