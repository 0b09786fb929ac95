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

/* The largest |value| bit pattern of x[0:count], as an int32 (the sign bit cleared, so signed order is the
   unsigned one and every instruction set has the compare): at least 0x7f800000 exactly when a value is NaN or
   Inf. Blocks of 256 values, each reduced on its own: with AVX-512 the compiler unrolls a block into 16
   independent loads reduced as a tree, and the read keeps pace with torch's sum over the same bytes (one
   running maximum over the whole range, a chain of dependent maxima, reads 5-10% slower; 64-byte vectors of
   the GCC extension compile to scalar code for AVX2). With AVX2 this form reads at ~1.25x torch's sum, and ~3x
   with the baseline's SSE2. */
typedef int32_t __attribute__((may_alias)) float_bits_t; /* a float's bits, read through a float pointer */

CLONES static int32_t largest_magnitude(const float *x, int64_t count) {
    const float_bits_t *bits = (const float_bits_t *)x;
    int32_t largest = 0;
    int64_t k = 0;
    for (; k + 256 <= count; k += 256) {
        int32_t block = 0;
#pragma omp simd reduction(max : block)
        for (int j = 0; j < 256; j++) {
            int32_t magnitude = bits[k + j] & 0x7fffffff;
            block = magnitude > block ? magnitude : block;
        }
        largest = block > largest ? block : largest;
    }
    for (; k < count; k++) {
        int32_t magnitude = bits[k] & 0x7fffffff;
        largest = magnitude > largest ? magnitude : largest;
    }
    return largest;
}

/* *nonfinite = 1 if a value of a gradient is NaN or Inf, else 0. */
int finite_read(int n, const int64_t *numels, float *const *grads, double *nonfinite, int threads) {
    int64_t count;
    chunk_t *chunks = make_chunks(n, numels, &count);
    if (!chunks) return -1;
    int32_t largest = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(max : largest) \
    if (count >= PARALLEL_MIN_CHUNKS)
    for (int64_t c = 0; c < count; c++) {
        int32_t chunk = largest_magnitude(grads[chunks[c].tensor] + chunks[c].start, chunks[c].stop - chunks[c].start);
        largest = chunk > largest ? chunk : largest;
    }
    free(chunks);
    *nonfinite = largest >= 0x7f800000 ? 1.0 : 0.0;
    return 0;
}

/* A statistics read: chunk c's two partial sums in partial[2 c], partial[2 c + 1], added per tensor into
   sums[2 i], sums[2 i + 1] in chunk order; *nonfinite = 1 if a sum is NaN or Inf (exactly when a value read
   is), else 0. */
typedef void (*moments_fn)(const float *g, const void *other, int64_t count, const float *numbers, double *out);

static int moments_read(int n, const int64_t *numels, float *const *grads, void *const *others, size_t other_size,
                        const float *numbers, moments_fn chunk_moments, double *sums, double *nonfinite,
                        int threads) {
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
    int finite = 1;
    for (int i = 0; i < 2 * n; i++) finite &= sums[i] - sums[i] == 0.0;
    *nonfinite = finite ? 0.0 : 1.0;
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

int stam_lite_moments(int n, const int64_t *numels, float *const *grads, double *sums, double *nonfinite,
                      int threads) {
    return moments_read(n, numels, grads, NULL, 0, NULL, stam_lite_chunk_moments, sums, nonfinite, threads);
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

int stam_moments(int n, const int64_t *numels, float *const *grads, float *const *mus, double *sums,
                 double *nonfinite, int threads) {
    return moments_read(n, numels, grads, (void *const *)mus, sizeof(float), NULL, stam_chunk_moments, sums,
                        nonfinite, threads);
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
             double *nonfinite, float beta, float grad_weight, float bound, int threads) {                      \
        const float numbers[3] = {beta, grad_weight, bound};                                                    \
        return moments_read(n, numels, grads, (void *const *)momenta, sizeof(STATE_T), numbers, NAME##_chunk,  \
                            sums, nonfinite, threads);                                                          \
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

/* ---- STAC's factored trunk ------------------------------------------------------------------------------ */

/* sign_step_scale="factored" (stac.py's _factored_update and _factored_apply), each tensor g seen as a matrix of
   rows[i] rows by columns[i] columns, in one call for the group:

     1. the sums of g^2 per row and per column, in double;
     2. per tensor: R <- b2 R + (1 - b2) rowsum / columns, C <- b2 C + (1 - b2) colsum / rows (in double, stored
        saturated at FLT_MAX), step <- step + 1, and the float32 factors r = sqrt(R / (mean(R) correction)),
        c = sqrt(C), correction = 1 - b2^step given per tensor;
     3. per tensor, the sum of u^2 for u = g / (r c^T + eps), in double, and clip = max(1, rms(u));
     4. per row: u <- u / clip, then without momentum p = p decay - lr u; with int8 momentum codes and a float32
        scale per row, m = code scale, d = interpolation m + interpolation_grad_weight u,
        m' = saturate(beta m + grad_weight u), the row's new scale max|m'| / 127, code = round(m' / scale) (ties
        to even) within [-127, 127], p = p decay - lr d.

   The sums of 1 and 3 are taken over blocks of whole rows and at most FACTORED_COLUMNS columns, each block's
   into its own partial sums, added in block order: the same bits on any thread count. Step 4 goes a row at a
   time, twice over it (m' for the row's largest |m'|, then again to store): a row's scale needs all of it. */

#include <float.h>

#define FACTORED_COLUMNS 4096
#define FACTORED_BLOCK (1 << 18) /* elements of a sums block, about */

typedef struct {
    int tensor;
    int64_t row_start, row_stop, column_start, column_stop;
    int64_t row_partial, column_partial; /* where the block's row sums and column sums go */
} block_t;

/* A tensor's blocks: `width` columns (0 for a tensor of no columns) by `height` rows; whole rows for the update. */
static void block_shape(int64_t columns, int whole_rows, int64_t *width, int64_t *height) {
    const int64_t per_block = whole_rows ? CHUNK : FACTORED_BLOCK;
    *width = whole_rows || columns < FACTORED_COLUMNS ? columns : FACTORED_COLUMNS;
    *height = *width > 0 && *width < per_block ? per_block / *width : 1;
}

/* The blocks of the sums (whole_rows = 0) or of the update (whole_rows = 1), in order; the sizes of the
   partial sums in *row_partials, *column_partials. NULL only if out of memory. */
static block_t *make_blocks(int n, const int64_t *rows, const int64_t *columns, int whole_rows, int64_t *count,
                            int64_t *row_partials, int64_t *column_partials) {
    int64_t total = 0;
    for (int i = 0; i < n; i++) {
        int64_t width, height;
        block_shape(columns[i], whole_rows, &width, &height);
        if (width > 0) total += (rows[i] + height - 1) / height * ((columns[i] + width - 1) / width);
    }
    block_t *blocks = malloc(sizeof(block_t) * (total ? total : 1));
    if (!blocks) return NULL;
    int64_t b = 0, row_at = 0, column_at = 0;
    for (int i = 0; i < n; i++) {
        int64_t width, height;
        block_shape(columns[i], whole_rows, &width, &height);
        const int64_t column_blocks = width > 0 ? (columns[i] + width - 1) / width : 0;
        for (int64_t r = 0; r < rows[i] && column_blocks; r += height)
            for (int64_t cb = 0; cb < column_blocks; cb++, b++) {
                blocks[b].tensor = i;
                blocks[b].row_start = r;
                blocks[b].row_stop = r + height < rows[i] ? r + height : rows[i];
                blocks[b].column_start = cb * width;
                blocks[b].column_stop = (cb + 1) * width < columns[i] ? (cb + 1) * width : columns[i];
                blocks[b].row_partial = row_at + r * column_blocks + cb; /* a row's: a stride of column_blocks */
                blocks[b].column_partial = column_at + (r / height) * columns[i] + cb * width;
            }
        row_at += rows[i] * column_blocks;
        column_at += (rows[i] + height - 1) / height * columns[i];
    }
    *count = total;
    *row_partials = row_at;
    *column_partials = column_at;
    return blocks;
}

/* Step 1 over one block: row r's sum into row_sums[(r - row_start) stride], the columns' into column_sums. */
CLONES static void factored_square_sums(const float *g, int64_t columns, const block_t *block, int64_t stride,
                                        double *row_sums, double *column_sums) {
    const int64_t width = block->column_stop - block->column_start;
    for (int64_t k = 0; k < width; k++) column_sums[k] = 0.0;
    for (int64_t r = block->row_start; r < block->row_stop; r++) {
        const float *row = g + r * columns + block->column_start;
        double sum = 0.0;
#pragma omp simd reduction(+ : sum)
        for (int64_t k = 0; k < width; k++) {
            double square = (double)row[k] * (double)row[k];
            sum += square;
            column_sums[k] += square;
        }
        row_sums[(r - block->row_start) * stride] = sum;
    }
}

/* Step 3 over one block: the sum of u^2. */
CLONES static double factored_step_squares(const float *g, int64_t columns, const block_t *block, const float *r,
                                           const float *c, float eps) {
    double sum = 0.0;
    for (int64_t row = block->row_start; row < block->row_stop; row++) {
        const float *values = g + row * columns;
        const float row_factor = r[row];
#pragma omp simd reduction(+ : sum)
        for (int64_t k = block->column_start; k < block->column_stop; k++) {
            double u = values[k] / (row_factor * c[k] + eps);
            sum += u * u;
        }
    }
    return sum;
}

/* x rounded to the nearest integer, ties to even, for |x| < 2^22 (the default rounding mode, no libm). */
static inline float round_even(float x) { return (x + 0x1.8p23f) - 0x1.8p23f; }

/* Step 4 over one block of whole rows. */
CLONES static void factored_update(float *p, const float *g, int8_t *codes, float *scales, int64_t columns,
                                   const block_t *block, const float *r, const float *c, float eps, float clip,
                                   float lr, float decay, float beta, float grad_weight, float interpolation,
                                   float interpolation_grad_weight, float bound) {
    for (int64_t row = block->row_start; row < block->row_stop; row++) {
        float *p_row = p + row * columns;
        const float *g_row = g + row * columns;
        const float row_factor = r[row];
        if (!codes) {
#pragma omp simd
            for (int64_t k = 0; k < columns; k++) {
                float u = g_row[k] / (row_factor * c[k] + eps) / clip;
                p_row[k] = p_row[k] * decay - u * lr;
            }
            continue;
        }
        int8_t *code_row = codes + row * columns;
        const float old_scale = scales[row];
        float largest = 0.0f;
#pragma omp simd reduction(max : largest)
        for (int64_t k = 0; k < columns; k++) {
            float u = g_row[k] / (row_factor * c[k] + eps) / clip;
            float m = saturate((float)code_row[k] * old_scale * beta + u * grad_weight, bound);
            m = m < 0 ? -m : m;
            largest = m > largest ? m : largest;
        }
        const float new_scale = largest / 127.0f;
        const float divisor = new_scale > FLT_MIN ? new_scale : FLT_MIN;
#pragma omp simd
        for (int64_t k = 0; k < columns; k++) {
            float u = g_row[k] / (row_factor * c[k] + eps) / clip;
            float m = (float)code_row[k] * old_scale;
            float direction = m * interpolation + u * interpolation_grad_weight;
            float code = round_even(saturate(m * beta + u * grad_weight, bound) / divisor);
            code_row[k] = (int8_t)(code > 127.0f ? 127.0f : (code < -127.0f ? -127.0f : code));
            p_row[k] = p_row[k] * decay - direction * lr;
        }
        scales[row] = new_scale;
    }
}

static double saturated(double value) { return value < FLT_MAX ? value : FLT_MAX; }

/* codes and scales NULL without momentum. */
int factored_step(int n, const int64_t *numels, float *const *params, float *const *grads, float *const *row_stats,
                  float *const *column_stats, float *const *steps, int8_t *const *codes, float *const *scales,
                  const int64_t *rows, const int64_t *columns, const double *corrections, double b2, float eps,
                  float lr, float decay, float beta, float grad_weight, float interpolation,
                  float interpolation_grad_weight, float bound, int threads) {
    int64_t count = 0, update_count = 0, row_partials = 0, column_partials = 0, unused, total_rows = 0,
            total_columns = 0, total = 0;
    for (int i = 0; i < n; i++) {
        total_rows += rows[i];
        total_columns += columns[i];
        total += numels[i];
    }
    const int parallel = total >= PARALLEL_MIN_CHUNKS * CHUNK;
    block_t *blocks = make_blocks(n, rows, columns, 0, &count, &row_partials, &column_partials);
    block_t *update_blocks = make_blocks(n, rows, columns, 1, &update_count, &unused, &unused);
    double *sums = malloc(sizeof(double) * (row_partials + column_partials + count + 1));
    float *factors = malloc(sizeof(float) * (total_rows + total_columns + n + 1));
    int64_t *offsets = malloc(sizeof(int64_t) * (2 * n + 1));
    if (!blocks || !update_blocks || !sums || !factors || !offsets) {
        free(blocks), free(update_blocks), free(sums), free(factors), free(offsets);
        return -1;
    }
    double *row_sums = sums, *column_sums = sums + row_partials, *block_squares = column_sums + column_partials;
    float *r = factors, *c = factors + total_rows, *clips = c + total_columns;
    int64_t *row_at = offsets, *column_at = offsets + n;
    for (int64_t i = 0, at_r = 0, at_c = 0; i < n; at_r += rows[i], at_c += columns[i], i++) {
        row_at[i] = at_r;
        column_at[i] = at_c;
    }

#pragma omp parallel for schedule(dynamic) num_threads(threads) if (parallel)
    for (int64_t b = 0; b < count; b++) {
        const int i = blocks[b].tensor;
        factored_square_sums(grads[i], columns[i], blocks + b, (columns[i] + FACTORED_COLUMNS - 1) / FACTORED_COLUMNS,
                             row_sums + blocks[b].row_partial, column_sums + blocks[b].column_partial);
    }

    /* Step 2, tensor by tensor; the partial sums added in block order. */
    for (int64_t i = 0, row_base = 0, column_base = 0; i < n; i++) {
        int64_t width, height;
        block_shape(columns[i], 0, &width, &height);
        const int64_t column_blocks = width > 0 ? (columns[i] + width - 1) / width : 0;
        const int64_t row_blocks = (rows[i] + height - 1) / height;
        double row_total = 0.0;
        for (int64_t k = 0; k < rows[i]; k++) {
            double sum = 0.0;
            for (int64_t cb = 0; cb < column_blocks; cb++) sum += row_sums[row_base + k * column_blocks + cb];
            row_stats[i][k] = (float)saturated(b2 * row_stats[i][k] + (1 - b2) * sum / (columns[i] > 1 ? columns[i]
                                                                                                       : 1));
            row_total += row_stats[i][k];
        }
        for (int64_t k = 0; k < columns[i]; k++) {
            double sum = 0.0;
            for (int64_t rb = 0; rb < row_blocks; rb++) sum += column_sums[column_base + rb * columns[i] + k];
            column_stats[i][k] = (float)saturated(b2 * column_stats[i][k] + (1 - b2) * sum / (rows[i] > 1 ? rows[i]
                                                                                                         : 1));
            c[column_at[i] + k] = (float)__builtin_sqrt((double)column_stats[i][k]);
        }
        steps[i][0] += 1.0f;
        double row_mean = row_total / (rows[i] > 1 ? rows[i] : 1);
        row_mean = row_mean > DBL_MIN ? row_mean : DBL_MIN;
        for (int64_t k = 0; k < rows[i]; k++)
            r[row_at[i] + k] = (float)__builtin_sqrt((double)row_stats[i][k] / (row_mean * corrections[i]));
        row_base += rows[i] * column_blocks;
        column_base += row_blocks * columns[i];
    }

#pragma omp parallel for schedule(dynamic) num_threads(threads) if (parallel)
    for (int64_t b = 0; b < count; b++) {
        const int i = blocks[b].tensor;
        block_squares[b] = factored_step_squares(grads[i], columns[i], blocks + b, r + row_at[i], c + column_at[i],
                                                 eps);
    }
    for (int i = 0; i < n; i++) clips[i] = 1.0f;
    for (int64_t b = 0, first = 0; b < count; b++) {
        if (b + 1 < count && blocks[b + 1].tensor == blocks[b].tensor) continue;
        const int i = blocks[b].tensor;
        double sum = 0.0;
        for (int64_t k = first; k <= b; k++) sum += block_squares[k];
        const double rms = __builtin_sqrt(sum / (numels[i] > 1 ? numels[i] : 1));
        clips[i] = (float)(rms > 1.0 ? rms : 1.0);
        first = b + 1;
    }

#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
    for (int64_t j = 0; j < update_count; j++) {
        const int64_t b = update_count - 1 - j;
        const int i = update_blocks[b].tensor;
        factored_update(params[i], grads[i], codes ? codes[i] : NULL, scales ? scales[i] : NULL, columns[i],
                        update_blocks + b, r + row_at[i], c + column_at[i], eps, clips[i], lr, decay, beta,
                        grad_weight, interpolation, interpolation_grad_weight, bound);
    }
    free(blocks), free(update_blocks), free(sums), free(factors), free(offsets);
    return 0;
}
