/* Multi-tensor CPU kernels for STAM and STAMLite (float32), compiled on first use by _cpu_kernels.py.

   Each function takes a whole parameter group in one call: n tensors as arrays of pointers with their
   element counts, then per-tensor vectors, then numbers, then the thread count; it returns 0, or -1 when
   out of memory. Work is cut into chunks of CHUNK elements over all tensors and shared among `threads`
   OpenMP threads, so a model of hundreds of small tensors costs one call, not hundreds. The update
   functions repeat, operation for operation, the float32 arithmetic of the Python kernels in stam.py and
   stam_lite.py (built with -ffp-contract=off, so no fused multiply-add changes a rounding); the moments
   are sums in double, added chunk by chunk in a fixed order: the same bits on any thread count. A sum in
   double of float32 values cannot overflow, so it is finite exactly when every value summed is. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define CHUNK 16384

typedef struct {
    int tensor;
    int64_t start, stop;
} chunk_t;

/* The chunks of n tensors in order; NULL only if out of memory. */
static chunk_t *make_chunks(int n, const int64_t *numels, int64_t *count) {
    int64_t total = 0;
    for (int i = 0; i < n; i++) total += (numels[i] + CHUNK - 1) / CHUNK;
    *count = total;
    chunk_t *chunks = malloc(sizeof(chunk_t) * (total ? total : 1));
    if (!chunks) return NULL;
    int64_t c = 0;
    for (int i = 0; i < n; i++)
        for (int64_t start = 0; start < numels[i]; start += CHUNK, c++) {
            chunks[c].tensor = i;
            chunks[c].start = start;
            chunks[c].stop = start + CHUNK < numels[i] ? start + CHUNK : numels[i];
        }
    return chunks;
}

/* A statistics read: its chunks and two partial sums per chunk, added per tensor once every chunk is read. */
typedef struct {
    chunk_t *chunks;
    int64_t count;
    double *partial;
} moments_t;

static int start_moments(int n, const int64_t *numels, moments_t *moments) {
    moments->chunks = make_chunks(n, numels, &moments->count);
    moments->partial = malloc(sizeof(double) * 2 * (moments->count ? moments->count : 1));
    if (moments->chunks && moments->partial) return 0;
    free(moments->chunks);
    free(moments->partial);
    return -1;
}

/* sums[2 i], sums[2 i + 1] = tensor i's two partial sums, added in chunk order; frees the read's memory. */
static void finish_moments(int n, moments_t *moments, double *sums) {
    for (int i = 0; i < 2 * n; i++) sums[i] = 0.0;
    for (int64_t c = 0; c < moments->count; c++) {
        sums[2 * moments->chunks[c].tensor] += moments->partial[2 * c];
        sums[2 * moments->chunks[c].tensor + 1] += moments->partial[2 * c + 1];
    }
    free(moments->partial);
    free(moments->chunks);
}

/* STAMLite's statistics read: sums[2 i] = sum(g), sums[2 i + 1] = sum(g^2) of tensor i. */
int stam_lite_moments(int n, const int64_t *numels, float *const *grads, double *sums, int threads) {
    moments_t moments;
    if (start_moments(n, numels, &moments)) return -1;
    const chunk_t *chunks = moments.chunks;
    double *partial = moments.partial;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < moments.count; c++) {
        const float *g = grads[chunks[c].tensor];
        double sum = 0.0, sum_sq = 0.0;
#pragma omp simd reduction(+ : sum, sum_sq)
        for (int64_t k = chunks[c].start; k < chunks[c].stop; k++) {
            double value = g[k];
            sum += value;
            sum_sq += value * value;
        }
        partial[2 * c] = sum;
        partial[2 * c + 1] = sum_sq;
    }
    finish_moments(n, &moments, sums);
    return 0;
}

/* STAMLite's update of tensor i: mu = beta1 mu + (1 - beta1) g;  p = p decay - mu step_size. */
int stam_lite_step(int n, const int64_t *numels, float *const *params, float *const *grads, float *const *mus,
                   const float *beta1, const float *step_size, float decay, int threads) {
    int64_t count;
    chunk_t *chunks = make_chunks(n, numels, &count);
    if (!chunks) return -1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < count; c++) {
        int i = chunks[c].tensor;
        float *p = params[i], *mu = mus[i];
        const float *g = grads[i];
        const float b1 = beta1[i], one_minus_b1 = 1.0f - beta1[i], lr = step_size[i];
#pragma omp simd
        for (int64_t k = chunks[c].start; k < chunks[c].stop; k++) {
            float m = b1 * mu[k] + one_minus_b1 * g[k];
            mu[k] = m;
            p[k] = p[k] * decay - m * lr;
        }
    }
    free(chunks);
    return 0;
}

/* STAM's statistics read, r = g - mu (in double: finite whenever g and mu are): sums[2 i] = sum(r^2),
   sums[2 i + 1] = sum(|r|) of tensor i. */
int stam_moments(int n, const int64_t *numels, float *const *grads, float *const *mus, double *sums, int threads) {
    moments_t moments;
    if (start_moments(n, numels, &moments)) return -1;
    const chunk_t *chunks = moments.chunks;
    double *partial = moments.partial;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < moments.count; c++) {
        const float *g = grads[chunks[c].tensor], *mu = mus[chunks[c].tensor];
        double sum_sq = 0.0, sum_abs = 0.0;
#pragma omp simd reduction(+ : sum_sq, sum_abs)
        for (int64_t k = chunks[c].start; k < chunks[c].stop; k++) {
            double residual = (double)g[k] - (double)mu[k];
            sum_sq += residual * residual;
            sum_abs += fabs(residual);
        }
        partial[2 * c] = sum_sq;
        partial[2 * c + 1] = sum_abs;
    }
    finish_moments(n, &moments, sums);
    return 0;
}

/* STAM's update of tensor i: mu = beta1 mu + (1 - beta1) g;  nu = b2 nu + (1 - b2) g g;
   p = p decay - step_size mu / (sqrt(nu / bias_correction2) + eps). */
int stam_step(int n, const int64_t *numels, float *const *params, float *const *grads, float *const *mus,
              float *const *nus, const float *beta1, const float *step_size, const float *bias_correction2,
              float decay, float b2, float one_minus_b2, float eps, int threads) {
    int64_t count;
    chunk_t *chunks = make_chunks(n, numels, &count);
    if (!chunks) return -1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < count; c++) {
        int i = chunks[c].tensor;
        float *p = params[i], *mu = mus[i], *nu = nus[i];
        const float *g = grads[i];
        const float b1 = beta1[i], one_minus_b1 = 1.0f - beta1[i], lr = step_size[i], correction = bias_correction2[i];
#pragma omp simd
        for (int64_t k = chunks[c].start; k < chunks[c].stop; k++) {
            float gk = g[k];
            float m = b1 * mu[k] + one_minus_b1 * gk;
            float v = b2 * nu[k] + one_minus_b2 * gk * gk;
            mu[k] = m;
            nu[k] = v;
            p[k] = p[k] * decay - lr * m / (sqrtf(v / correction) + eps);
        }
    }
    free(chunks);
    return 0;
}
