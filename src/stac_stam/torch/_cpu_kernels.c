/* Multi-tensor CPU kernels of the library's optimizers: float32 parameters and gradients, float32 or bfloat16
   state. Loaded with ctypes by _cpu_kernels.py (no Python or torch headers): built at install time as the
   extension stac_stam.torch._cpu_kernels_lib, or on first use into a cache where the package was not built.

   Each function takes a whole parameter group in one call: n tensors as arrays of pointers with their element
   counts, then per-tensor vectors, then numbers, then the thread count; it returns 0, or -1 when out of memory.
   Work is cut into chunks of CHUNK elements over all tensors and shared among `threads` OpenMP threads, so a
   model of hundreds of small tensors costs one call, not hundreds.

   Reads change nothing. A statistics read sums two numbers per tensor, chunk by chunk in a fixed order: the
   same bits on any thread count. Its totals are in double, where no sum of float32 values (or of their
   squares) overflows, so a read is finite exactly when every value it read is. The updates repeat,
   operation for operation, the float32 arithmetic of the torch code in stac.py, stam.py and stam_lite.py
   (built with -ffp-contract=off, so no fused multiply-add changes a rounding); a bfloat16 value is read
   exactly and stored rounded to nearest even, as torch's .to(torch.bfloat16) rounds. Updates walk the
   chunks last to first: the group's read walked them first to last, so the update starts on what is still
   in cache. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK 16384
/* Fewer chunks than this run on the calling thread: waking threads costs more than the work (and on a busy
   machine a parallel region may wait a whole time slice for a thread). */
#define PARALLEL_MIN_CHUNKS 8

/* One build for every x86-64 Linux CPU: the hot loops are compiled for AVX-512, AVX2 and the baseline, and
   the loader picks one (GCC/Clang function multiversioning). OpenMP outlines a parallel region into a function
   of its own that would not inherit the clones, so each loop is a chunk function called from the region. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

typedef uint16_t bf16_t;

static inline float bf16_load(bf16_t value) {
    uint32_t bits = (uint32_t)value << 16;
    float result;
    memcpy(&result, &bits, sizeof result);
    return result;
}

static inline bf16_t bf16_store(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    /* Round to nearest even; the values stored here are never NaN (momenta are kept within the finite range). */
    return (bf16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

static inline float f32_load(float value) { return value; }
static inline float f32_store(float value) { return value; }

/* x kept within [-bound, bound]: a momentum never overflows to Inf (nor then to Inf - Inf = NaN). */
static inline float saturate(float x, float bound) { return x > bound ? bound : (x < -bound ? -bound : x); }

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

/* ---- Reads ---------------------------------------------------------------------------------------------- */

/* The largest |value| bit pattern of x[0:count]: at least 0x7f800000 exactly when a value is NaN or Inf. */
CLONES static uint32_t largest_magnitude(const float *x, int64_t count) {
    uint32_t largest = 0;
#pragma omp simd reduction(max : largest)
    for (int64_t k = 0; k < count; k++) {
        uint32_t bits;
        memcpy(&bits, x + k, sizeof bits);
        bits &= 0x7fffffffu;
        largest = bits > largest ? bits : largest;
    }
    return largest;
}

/* *nonfinite = 1 if a value of a gradient is NaN or Inf, else 0. */
int finite_read(int n, const int64_t *numels, float *const *grads, double *nonfinite, int threads) {
    int64_t count;
    chunk_t *chunks = make_chunks(n, numels, &count);
    if (!chunks) return -1;
    uint32_t largest = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(max : largest) \
    if (count >= PARALLEL_MIN_CHUNKS)
    for (int64_t c = 0; c < count; c++) {
        uint32_t chunk = largest_magnitude(grads[chunks[c].tensor] + chunks[c].start, chunks[c].stop - chunks[c].start);
        largest = chunk > largest ? chunk : largest;
    }
    free(chunks);
    *nonfinite = largest >= 0x7f800000u ? 1.0 : 0.0;
    return 0;
}

/* A statistics read: chunk c's two partial sums in partial[2 c], partial[2 c + 1], added per tensor into
   sums[2 i], sums[2 i + 1] in chunk order. */
typedef void (*moments_fn)(const float *g, const void *other, int64_t count, const float *numbers, double *out);

static int moments_read(int n, const int64_t *numels, float *const *grads, void *const *others, size_t other_size,
                        const float *numbers, moments_fn chunk_moments, double *sums, int threads) {
    int64_t count;
    chunk_t *chunks = make_chunks(n, numels, &count);
    double *partial = malloc(sizeof(double) * 2 * (count ? count : 1));
    if (!chunks || !partial) {
        free(chunks);
        free(partial);
        return -1;
    }
#pragma omp parallel for schedule(static) num_threads(threads) if (count >= PARALLEL_MIN_CHUNKS)
    for (int64_t c = 0; c < count; c++) {
        int i = chunks[c].tensor;
        const void *other = others ? (const char *)others[i] + other_size * chunks[c].start : NULL;
        chunk_moments(grads[i] + chunks[c].start, other, chunks[c].stop - chunks[c].start, numbers, partial + 2 * c);
    }
    for (int i = 0; i < 2 * n; i++) sums[i] = 0.0;
    for (int64_t c = 0; c < count; c++) {
        sums[2 * chunks[c].tensor] += partial[2 * c];
        sums[2 * chunks[c].tensor + 1] += partial[2 * c + 1];
    }
    free(partial);
    free(chunks);
    return 0;
}

/* STAMLite: sum(g), sum(g^2). Blocks of BLOCK values are summed in float32 (no conversion per value, half the
   vector work), their sums added in double. A block whose float32 sum of squares is not a normal number well
   inside float32's range is summed again in double: one that overflows (|g| > ~1e18) or meets a NaN/Inf, so
   the result is finite exactly when every value is, and one of tiny values (|g| < ~1e-16), whose float32
   squares would lose their digits below float32's smallest normal (or all-zero). */
#define BLOCK 256
#define FLOAT_BLOCK_OK(sum_sq) ((sum_sq) >= 1e-30f && (sum_sq) - (sum_sq) == 0.0f)
CLONES static void stam_lite_chunk_moments(const float *g, const void *unused, int64_t count, const float *numbers,
                                           double *out) {
    double sum = 0.0, sum_sq = 0.0;
    for (int64_t start = 0; start < count; start += BLOCK) {
        const int64_t stop = start + BLOCK < count ? start + BLOCK : count;
        float block_sum = 0.0f, block_sq = 0.0f;
#pragma omp simd reduction(+ : block_sum, block_sq)
        for (int64_t k = start; k < stop; k++) {
            block_sum += g[k];
            block_sq += g[k] * g[k];
        }
        if (FLOAT_BLOCK_OK(block_sq)) {
            sum += block_sum;
            sum_sq += block_sq;
            continue;
        }
        for (int64_t k = start; k < stop; k++) {
            double value = g[k];
            sum += value;
            sum_sq += value * value;
        }
    }
    out[0] = sum;
    out[1] = sum_sq;
}

int stam_lite_moments(int n, const int64_t *numels, float *const *grads, double *sums, int threads) {
    return moments_read(n, numels, grads, NULL, 0, NULL, stam_lite_chunk_moments, sums, threads);
}

/* STAM, r = g - mu (in double: finite whenever g and mu are): sum(r^2), sum(|r|). */
CLONES static void stam_chunk_moments(const float *g, const void *mus, int64_t count, const float *numbers,
                                      double *out) {
    const float *mu = mus;
    double sum_sq = 0.0, sum_abs = 0.0;
#pragma omp simd reduction(+ : sum_sq, sum_abs)
    for (int64_t k = 0; k < count; k++) {
        double residual = (double)g[k] - (double)mu[k];
        sum_sq += residual * residual;
        sum_abs += residual < 0 ? -residual : residual;
    }
    out[0] = sum_sq;
    out[1] = sum_abs;
}

int stam_moments(int n, const int64_t *numels, float *const *grads, float *const *mus, double *sums, int threads) {
    return moments_read(n, numels, grads, (void *const *)mus, sizeof(float), NULL, stam_chunk_moments, sums, threads);
}

/* STAC's "snr" scale, with numbers = (beta, grad_weight, bound): sum(g^2) and sum(|m'|), m' the momentum the
   update will store, saturate(beta m + grad_weight g), in float32 as the update computes it; in float32 blocks
   as STAMLite's sums, a block whose float32 sum of squares would lose digits summed again in double. */
#define SNR_MOMENTS(NAME, STATE_T, LOAD)                                                                        \
    CLONES static void NAME##_chunk(const float *g, const void *momenta, int64_t count, const float *numbers,   \
                                    double *out) {                                                              \
        const STATE_T *m = momenta;                                                                             \
        const float beta = numbers[0], grad_weight = numbers[1], bound = numbers[2];                            \
        double sum_sq = 0.0, sum_abs = 0.0;                                                                     \
        for (int64_t start = 0; start < count; start += BLOCK) {                                                \
            const int64_t stop = start + BLOCK < count ? start + BLOCK : count;                                 \
            float block_sq = 0.0f, block_abs = 0.0f;                                                            \
            _Pragma("omp simd reduction(+ : block_sq, block_abs)")                                              \
            for (int64_t k = start; k < stop; k++) {                                                            \
                float new_m = saturate(beta * LOAD(m[k]) + grad_weight * g[k], bound);                          \
                block_sq += g[k] * g[k];                                                                        \
                block_abs += new_m < 0 ? -new_m : new_m;                                                        \
            }                                                                                                   \
            if (FLOAT_BLOCK_OK(block_sq) && block_abs - block_abs == 0.0f) {                                    \
                sum_sq += block_sq;                                                                             \
                sum_abs += block_abs;                                                                           \
                continue;                                                                                       \
            }                                                                                                   \
            for (int64_t k = start; k < stop; k++) {                                                            \
                float new_m = saturate(beta * LOAD(m[k]) + grad_weight * g[k], bound);                          \
                sum_sq += (double)g[k] * (double)g[k];                                                          \
                sum_abs += new_m < 0 ? -(double)new_m : (double)new_m;                                          \
            }                                                                                                   \
        }                                                                                                       \
        out[0] = sum_sq;                                                                                        \
        out[1] = sum_abs;                                                                                       \
    }                                                                                                           \
    int NAME(int n, const int64_t *numels, float *const *grads, STATE_T *const *momenta, double *sums,          \
             float beta, float grad_weight, float bound, int threads) {                                         \
        const float numbers[3] = {beta, grad_weight, bound};                                                    \
        return moments_read(n, numels, grads, (void *const *)momenta, sizeof(STATE_T), numbers, NAME##_chunk,  \
                            sums, threads);                                                                     \
    }

SNR_MOMENTS(snr_moments, float, f32_load)
SNR_MOMENTS(snr_moments_bf16, bf16_t, bf16_load)

/* ---- Updates -------------------------------------------------------------------------------------------- */

/* Runs chunk_update(chunk, tensor, start, stop) over every chunk, last to first. */
#define FOR_EACH_CHUNK_BACKWARDS(CALL)                                                                          \
    int64_t count;                                                                                              \
    chunk_t *chunks = make_chunks(n, numels, &count);                                                           \
    if (!chunks) return -1;                                                                                     \
    _Pragma("omp parallel for schedule(static) num_threads(threads) if (count >= PARALLEL_MIN_CHUNKS)")         \
    for (int64_t j = 0; j < count; j++) {                                                                       \
        const int64_t c = count - 1 - j;                                                                        \
        const int i = chunks[c].tensor;                                                                         \
        const int64_t start = chunks[c].start, size = chunks[c].stop - chunks[c].start;                        \
        CALL;                                                                                                   \
    }                                                                                                           \
    free(chunks);                                                                                               \
    return 0;

/* STAC's trunk with momentum: d = interpolation m + interpolation_grad_weight g;
   m = saturate(beta m + grad_weight g);  p = p decay - lr sign(d)   (lr one value per tensor). */
#define SIGN_STEP(NAME, STATE_T, LOAD, STORE)                                                                   \
    CLONES static void NAME##_chunk(float *p, const float *g, STATE_T *m, int64_t count, float lr, float decay, \
                                    float beta, float grad_weight, float interpolation,                        \
                                    float interpolation_grad_weight, float bound) {                            \
        _Pragma("omp simd")                                                                                     \
        for (int64_t k = 0; k < count; k++) {                                                                   \
            float old_m = LOAD(m[k]), gk = g[k];                                                                \
            float direction = old_m * interpolation + gk * interpolation_grad_weight;                          \
            m[k] = STORE(saturate(old_m * beta + gk * grad_weight, bound));                                     \
            float sign = (float)(direction > 0.0f) - (float)(direction < 0.0f);                                 \
            p[k] = p[k] * decay - lr * sign;                                                                    \
        }                                                                                                       \
    }                                                                                                           \
    int NAME(int n, const int64_t *numels, float *const *params, float *const *grads, STATE_T *const *momenta, \
             const float *lr, float decay, float beta, float grad_weight, float interpolation,                 \
             float interpolation_grad_weight, float bound, int threads) {                                       \
        FOR_EACH_CHUNK_BACKWARDS(NAME##_chunk(params[i] + start, grads[i] + start, momenta[i] + start, size,    \
                                              lr[i], decay, beta, grad_weight, interpolation,                  \
                                              interpolation_grad_weight, bound))                               \
    }

SIGN_STEP(sign_step, float, f32_load, f32_store)
SIGN_STEP(sign_step_bf16, bf16_t, bf16_load, bf16_store)

/* STAC's trunk without momentum: p = p decay - lr sign(g). */
CLONES static void plain_sign_chunk(float *p, const float *g, int64_t count, float lr, float decay) {
#pragma omp simd
    for (int64_t k = 0; k < count; k++) {
        float sign = (float)(g[k] > 0.0f) - (float)(g[k] < 0.0f);
        p[k] = p[k] * decay - lr * sign;
    }
}

int plain_sign_step(int n, const int64_t *numels, float *const *params, float *const *grads, float lr, float decay,
                    int threads) {
    FOR_EACH_CHUNK_BACKWARDS(plain_sign_chunk(params[i] + start, grads[i] + start, size, lr, decay))
}

/* STAMLite: mu = saturate(beta1 mu + (1 - beta1) g);  p = p decay - mu step_size   (beta1, step_size per tensor). */
#define STAM_LITE_STEP(NAME, STATE_T, LOAD, STORE)                                                              \
    CLONES static void NAME##_chunk(float *p, const float *g, STATE_T *mu, int64_t count, float beta1,          \
                                    float step_size, float decay, float bound) {                                \
        const float one_minus_beta1 = 1.0f - beta1;                                                             \
        _Pragma("omp simd")                                                                                     \
        for (int64_t k = 0; k < count; k++) {                                                                   \
            float m = saturate(beta1 * LOAD(mu[k]) + one_minus_beta1 * g[k], bound);                            \
            mu[k] = STORE(m);                                                                                   \
            p[k] = p[k] * decay - m * step_size;                                                                \
        }                                                                                                       \
    }                                                                                                           \
    int NAME(int n, const int64_t *numels, float *const *params, float *const *grads, STATE_T *const *mus,      \
             const float *beta1, const float *step_size, float decay, float bound, int threads) {               \
        FOR_EACH_CHUNK_BACKWARDS(NAME##_chunk(params[i] + start, grads[i] + start, mus[i] + start, size,        \
                                              beta1[i], step_size[i], decay, bound))                            \
    }

STAM_LITE_STEP(stam_lite_step, float, f32_load, f32_store)
STAM_LITE_STEP(stam_lite_step_bf16, bf16_t, bf16_load, bf16_store)

/* STAM: mu = saturate(beta1 mu + (1 - beta1) g);  nu = b2 nu + (1 - b2) g g;
   p = p decay - step_size mu / (sqrt(nu / bias_correction2) + eps)   (beta1, step_size, bias_correction2 per
   tensor). nu may overflow to Inf, as AdamW's does; mu / Inf is then 0. */
CLONES static void stam_chunk(float *p, const float *g, float *mu, float *nu, int64_t count, float beta1,
                              float step_size, float correction, float decay, float b2, float one_minus_b2,
                              float eps, float bound) {
    const float one_minus_beta1 = 1.0f - beta1;
#pragma omp simd
    for (int64_t k = 0; k < count; k++) {
        float gk = g[k];
        float m = saturate(beta1 * mu[k] + one_minus_beta1 * gk, bound);
        float v = b2 * nu[k] + one_minus_b2 * gk * gk;
        mu[k] = m;
        nu[k] = v;
        p[k] = p[k] * decay - step_size * m / (__builtin_sqrtf(v / correction) + eps);
    }
}

int stam_step(int n, const int64_t *numels, float *const *params, float *const *grads, float *const *mus,
              float *const *nus, const float *beta1, const float *step_size, const float *bias_correction2,
              float decay, float b2, float one_minus_b2, float eps, float bound, int threads) {
    FOR_EACH_CHUNK_BACKWARDS(stam_chunk(params[i] + start, grads[i] + start, mus[i] + start, nus[i] + start, size,
                                        beta1[i], step_size[i], bias_correction2[i], decay, b2, one_minus_b2, eps,
                                        bound))
}
