// Matrix products of a few rows for CPUs with AVX2 and FMA, read at memory speed: a decode step
// of one to a few tokens reads every weight once, so it takes what reading them takes.
//
// - bf16_product: y[m, n] = sum_k x[m, k] w[n, k] (+ b[n]), w bf16 [N, K] (a Linear's layout).
//   A bf16 value is the high half of an fp32 one, so widening it is a shift; the sums are in
//   fp32, as torch's bf16 products keep them.
// - int4_product: the same over GPTQ's packed codes, scales and zero points, read where they lie:
//   q int32 [K/8, N] holds the codes of inputs 8r..8r+7 of output n at bits 4j of q[r, n];
//   w[n, k] = s[g, n] code + o[g, n] with g = k / group and o = -s * zero. Per group, sum_k x code
//   is summed first, then scaled: y += s * sum(x code) + o * sum(x).
//
// x and y are both fp32 or both bf16 (`bf16`); the sums are fp32, rounded once to bf16 at the
// end (to nearest, ties to even, as torch rounds).
//
// Built by cpu_kernels.py with the C compiler at first use (the kernels carry their own target
// attributes, so the library loads on any x86-64 and `has_avx2_fma` says whether they may run).
// Threads: OpenMP, sharing the runtime PyTorch loaded (its libgomp has the same soname).

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

int has_avx2_fma(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

#define AVX2 __attribute__((target("avx2,fma")))

// the lanes of four sums: [sum a, sum b, sum c, sum d]
AVX2 static inline __m128 sum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
    const __m256 abcd = _mm256_hadd_ps(ab, cd);
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

AVX2 static inline __m256 widen_bf16(const uint16_t *p) {
    const __m256i halves = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(halves, 16));
}

// x [count] fp32 or bf16 as fp32 (a copy the caller frees)
static float *rows_as_float(const void *x, int64_t count, int bf16) {
    float *out = malloc(sizeof(float) * (count ? count : 1));
    if (!out) return NULL;
    for (int64_t i = 0; i < count; ++i) out[i] = bf16 ? bf16_to_float(((const uint16_t *)x)[i]) : ((const float *)x)[i];
    return out;
}

static inline void store_value(void *y, int64_t i, float value, int bf16) {
    if (bf16)
        ((uint16_t *)y)[i] = float_to_bf16(value);
    else
        ((float *)y)[i] = value;
}

// Asks for the weights of the outputs eight ahead while these four are summed: with four rows
// read side by side the hardware's prefetcher alone left a third of the bandwidth unused.
// Each call covers 64 bytes, and a call per eight inputs covers the next four rows as these end.
static inline void prefetch_ahead(const uint16_t *w, int64_t K, int64_t k) {
    _mm_prefetch((const char *)(w + 8 * K + 4 * k), _MM_HINT_T0);
}

// Four outputs n..n+3 of one row.
AVX2 static void bf16_four_outputs(const float *x, int64_t K, const uint16_t *w, __m128 *out) {
    const uint16_t *w0 = w, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K; k += 8) {
        prefetch_ahead(w, K, k);
        const __m256 u = _mm256_loadu_ps(x + k);
        a0 = _mm256_fmadd_ps(widen_bf16(w0 + k), u, a0);
        a1 = _mm256_fmadd_ps(widen_bf16(w1 + k), u, a1);
        a2 = _mm256_fmadd_ps(widen_bf16(w2 + k), u, a2);
        a3 = _mm256_fmadd_ps(widen_bf16(w3 + k), u, a3);
    }
    *out = sum4(a0, a1, a2, a3);
}

// Four outputs n..n+3 of two rows: each widened weight serves both.
AVX2 static void bf16_four_outputs_two_rows(const float *x, int64_t K, const uint16_t *w, __m128 *out0,
                                            __m128 *out1) {
    const uint16_t *w0 = w, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    const float *x1 = x + K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int64_t k = 0; k < K; k += 8) {
        prefetch_ahead(w, K, k);
        const __m256 u = _mm256_loadu_ps(x + k), v = _mm256_loadu_ps(x1 + k);
        __m256 t = widen_bf16(w0 + k);
        a0 = _mm256_fmadd_ps(t, u, a0), b0 = _mm256_fmadd_ps(t, v, b0);
        t = widen_bf16(w1 + k);
        a1 = _mm256_fmadd_ps(t, u, a1), b1 = _mm256_fmadd_ps(t, v, b1);
        t = widen_bf16(w2 + k);
        a2 = _mm256_fmadd_ps(t, u, a2), b2 = _mm256_fmadd_ps(t, v, b2);
        t = widen_bf16(w3 + k);
        a3 = _mm256_fmadd_ps(t, u, a3), b3 = _mm256_fmadd_ps(t, v, b3);
    }
    *out0 = sum4(a0, a1, a2, a3), *out1 = sum4(b0, b1, b2, b3);
}

// x [rows, K], w [N, K] bf16 bits, bias [N] fp32 or NULL, y [rows, N]; x and y fp32 or bf16.
// K a multiple of 8, N of 4. Returns 0, or -1 where memory ran out (y then undefined).
AVX2 int bf16_product(const void *x_in, int bf16, int64_t rows, int64_t K, const uint16_t *w, int64_t N,
                      const float *bias, void *y, int threads) {
    float *x = rows_as_float(x_in, rows * K, bf16);
    if (!x) return -1;
    // in chunks of 256 outputs handed to whichever thread is free: a thread the system pauses
    // delays one chunk, not half of the product
#pragma omp parallel for num_threads(threads) schedule(dynamic, 64)
    for (int64_t n = 0; n < N; n += 4) {
        const __m128 b = bias ? _mm_loadu_ps(bias + n) : _mm_setzero_ps();
        float sums[8];
        int64_t m = 0;
        for (; m < rows; m += 2) {
            __m128 s0, s1 = b;
            if (m + 1 < rows)
                bf16_four_outputs_two_rows(x + m * K, K, w + n * K, &s0, &s1), s1 = _mm_add_ps(s1, b);
            else
                bf16_four_outputs(x + m * K, K, w + n * K, &s0);
            _mm_storeu_ps(sums, _mm_add_ps(s0, b)), _mm_storeu_ps(sums + 4, s1);
            for (int i = 0; i < 4; ++i) {
                store_value(y, m * N + n + i, sums[i], bf16);
                if (m + 1 < rows) store_value(y, (m + 1) * N + n + i, sums[4 + i], bf16);
            }
        }
    }
    free(x);
    return 0;
}

// Adds one row's products with the words q[r, n0 .. n0 + 32) (inputs 8r .. 8r + 7) to acc[0 .. 32).
// `xr` is the row's inputs 8r .. 8r + 7, times 2^-4j at j < 7 and as they are at j = 7: the code at
// bits 4j, masked in place, is code * 2^4j as an integer, exact in fp32, so each product is
// exactly code * x without shifting the word down first. Even and odd inputs sum apart, to halve
// the chains of dependent additions.
AVX2 static inline __attribute__((always_inline)) void int4_add_word_row(const int32_t *q, const float *xr,
                                                                         float *acc) {
    // the words 3 KB ahead, which these rows of words run on into: the hardware's prefetcher
    // alone left the reads behind the sums (17 GB/s a mid layer, 20 with this, on 2 EPYC cores)
    _mm_prefetch((const char *)(q + 768), _MM_HINT_T0), _mm_prefetch((const char *)(q + 784), _MM_HINT_T0);
    const __m256i w0 = _mm256_loadu_si256((const __m256i *)q);
    const __m256i w1 = _mm256_loadu_si256((const __m256i *)(q + 8));
    const __m256i w2 = _mm256_loadu_si256((const __m256i *)(q + 16));
    const __m256i w3 = _mm256_loadu_si256((const __m256i *)(q + 24));
    __m256 e0 = _mm256_loadu_ps(acc), e1 = _mm256_loadu_ps(acc + 8);
    __m256 e2 = _mm256_loadu_ps(acc + 16), e3 = _mm256_loadu_ps(acc + 24);
    __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
#define INT4_TERM(W, X, S) _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(W, mask)), X, S)
#define INT4_INPUT(j, S0, S1, S2, S3)                                             \
    {                                                                             \
        const __m256i mask = _mm256_set1_epi32(0xF << (4 * (j)));                 \
        const __m256 xj = _mm256_broadcast_ss(xr + (j));                          \
        S0 = INT4_TERM(w0, xj, S0), S1 = INT4_TERM(w1, xj, S1);                   \
        S2 = INT4_TERM(w2, xj, S2), S3 = INT4_TERM(w3, xj, S3);                   \
    }
    INT4_INPUT(0, e0, e1, e2, e3) INT4_INPUT(1, o0, o1, o2, o3)
    INT4_INPUT(2, e0, e1, e2, e3) INT4_INPUT(3, o0, o1, o2, o3)
    INT4_INPUT(4, e0, e1, e2, e3) INT4_INPUT(5, o0, o1, o2, o3)
    INT4_INPUT(6, e0, e1, e2, e3)
#undef INT4_INPUT
#undef INT4_TERM
    // the top code would reach the sign bit in place: shifted down instead
    const __m256 x7 = _mm256_broadcast_ss(xr + 7);
    o0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(w0, 28)), x7, o0);
    o1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(w1, 28)), x7, o1);
    o2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(w2, 28)), x7, o2);
    o3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(w3, 28)), x7, o3);
    _mm256_storeu_ps(acc, _mm256_add_ps(e0, o0)), _mm256_storeu_ps(acc + 8, _mm256_add_ps(e1, o1));
    _mm256_storeu_ps(acc + 16, _mm256_add_ps(e2, o2)), _mm256_storeu_ps(acc + 24, _mm256_add_ps(e3, o3));
}

// The same for two rows of inputs at once over the words q[r, n0 .. n0 + 16): each code is
// decoded once for both rows, where calling int4_add_word_row per row decodes it again.
AVX2 static inline __attribute__((always_inline)) void int4_add_word_row_pair(const int32_t *q, const float *xr0,
                                                                              const float *xr1, float *acc0,
                                                                              float *acc1) {
    _mm_prefetch((const char *)(q + 768), _MM_HINT_T0);
    const __m256i w0 = _mm256_loadu_si256((const __m256i *)q);
    const __m256i w1 = _mm256_loadu_si256((const __m256i *)(q + 8));
    __m256 a0 = _mm256_loadu_ps(acc0), a1 = _mm256_loadu_ps(acc0 + 8);
    __m256 b0 = _mm256_loadu_ps(acc1), b1 = _mm256_loadu_ps(acc1 + 8);
    __m256 c0 = _mm256_setzero_ps(), c1 = c0, d0 = c0, d1 = c0;
#define INT4_PAIR(CODES0, CODES1, j, A0, A1, B0, B1)                                      \
    {                                                                                     \
        const __m256 u = _mm256_broadcast_ss(xr0 + (j)), v = _mm256_broadcast_ss(xr1 + (j)); \
        const __m256 k0 = _mm256_cvtepi32_ps(CODES0), k1 = _mm256_cvtepi32_ps(CODES1);    \
        A0 = _mm256_fmadd_ps(k0, u, A0), A1 = _mm256_fmadd_ps(k1, u, A1);                 \
        B0 = _mm256_fmadd_ps(k0, v, B0), B1 = _mm256_fmadd_ps(k1, v, B1);                 \
    }
#define INT4_PAIR_MASKED(j, A0, A1, B0, B1)                                                    \
    {                                                                                          \
        const __m256i mask = _mm256_set1_epi32(0xF << (4 * (j)));                              \
        INT4_PAIR(_mm256_and_si256(w0, mask), _mm256_and_si256(w1, mask), j, A0, A1, B0, B1) \
    }
    INT4_PAIR_MASKED(0, a0, a1, b0, b1) INT4_PAIR_MASKED(1, c0, c1, d0, d1)
    INT4_PAIR_MASKED(2, a0, a1, b0, b1) INT4_PAIR_MASKED(3, c0, c1, d0, d1)
    INT4_PAIR_MASKED(4, a0, a1, b0, b1) INT4_PAIR_MASKED(5, c0, c1, d0, d1)
    INT4_PAIR_MASKED(6, a0, a1, b0, b1)
    INT4_PAIR(_mm256_srli_epi32(w0, 28), _mm256_srli_epi32(w1, 28), 7, c0, c1, d0, d1)
#undef INT4_PAIR_MASKED
#undef INT4_PAIR
    _mm256_storeu_ps(acc0, _mm256_add_ps(a0, c0)), _mm256_storeu_ps(acc0 + 8, _mm256_add_ps(a1, c1));
    _mm256_storeu_ps(acc1, _mm256_add_ps(b0, d0)), _mm256_storeu_ps(acc1 + 8, _mm256_add_ps(b1, d1));
}

// Adds the products of one group's `words` rows of words q [words, N] with each row's inputs of
// that group (x, rows `K` apart) to acc [rows, N]. The words are read in memory order.
AVX2 static inline __attribute__((always_inline)) void int4_add_group(const int32_t *q, int64_t N, int64_t words,
                                                                     const float *x, int64_t K, float *acc,
                                                                     int64_t rows) {
    for (int64_t r = 0; r < words; ++r) {
        int64_t m = 0;
        for (; m + 1 < rows; m += 2)
            for (int64_t n0 = 0; n0 < N; n0 += 16)
                int4_add_word_row_pair(q + r * N + n0, x + m * K + 8 * r, x + (m + 1) * K + 8 * r, acc + m * N + n0,
                                       acc + (m + 1) * N + n0);
        if (m < rows)
            for (int64_t n0 = 0; n0 < N; n0 += 32) int4_add_word_row(q + r * N + n0, x + m * K + 8 * r, acc + m * N + n0);
    }
}

// x [rows, K], q [K/8, N], s [G, N] fp32 or bf16 (`bf16_scales`), qz [G, N/8] (GPTQ's qzeros:
// the zero point of output 8c + j at bits 4j of word c, stored as zero - zero_offset modulo 16),
// bias [N] fp32 or NULL, y [rows, N]; x and y fp32 or bf16. N a multiple of 32, group a multiple
// of 8, K = G * group, rows at most INT4_MAX_ROWS. `dot`: through AVX512-BF16 dot products
// (int4_bf16_dot.c), for bf16 rows on CPUs that have them. Returns 0, -1 where memory ran out (y
// then undefined), -2 for too many rows, -3 where `dot` cannot be.
//
// The groups go in INT4_PARTS parts of consecutive rows of words, each a block of memory read
// from start to end, to whichever thread is free: a thread the system pauses delays one part, not
// half of the product. Each part sums into its own partial outputs, added up in part order at the
// end, so the sums do not depend on which thread took which part.
#define INT4_MAX_ROWS 8
#define INT4_PARTS 16

int has_avx512_bf16(void);
int int4_product_dot(const uint16_t *x, int64_t rows, int64_t K, const int32_t *q, const void *s, int bf16_scales,
                     const int32_t *qz, int zero_offset, int64_t N, int64_t group, const float *bias, uint16_t *y,
                     int parts, int threads);

AVX2 int int4_product(const void *x_in, int bf16, int64_t rows, int64_t K, const int32_t *q, const void *s,
                      int bf16_scales, const int32_t *qz, int zero_offset, int64_t N, int64_t group,
                      const float *bias, void *y, int dot, int threads) {
    if (rows > INT4_MAX_ROWS) return -2;
    if (dot && !(bf16 && N % 16 == 0 && has_avx512_bf16())) return -3;
    if (dot) return int4_product_dot(x_in, rows, K, q, s, bf16_scales, qz, zero_offset, N, group, bias, y, INT4_PARTS, threads);
    const int64_t G = K / group, words = group / 8, parts = G < INT4_PARTS ? G : INT4_PARTS;
    float *xs = rows_as_float(x_in, rows * K, bf16), *xsum = malloc(sizeof(float) * (rows * G + 1));
    float *partial = malloc(sizeof(float) * (parts * rows * N + 1));
    if (!xs || !xsum || !partial) return free(xs), free(xsum), free(partial), -1;
    for (int64_t m = 0; m < rows; ++m)
        for (int64_t g = 0; g < G; ++g) {
            float total = 0.0f;
            for (int64_t k = g * group; k < (g + 1) * group; ++k) total += xs[m * K + k];
            xsum[m * G + g] = total;
        }
    // what int4_add_word_row multiplies input 8r + j by: powers of two, so the scaled row is exact
    // (unless it falls below 2^-126, where fp32 loses bits)
    static const float lane_scales[8] = {1.0f, 0x1p-4f, 0x1p-8f, 0x1p-12f, 0x1p-16f, 0x1p-20f, 0x1p-24f, 1.0f};
    for (int64_t i = 0; i < rows * K; ++i) xs[i] *= lane_scales[i % 8];
    const __m256i zero_shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i offset = _mm256_set1_epi32(zero_offset), low_bits = _mm256_set1_epi32(0xF);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *acc = malloc(sizeof(float) * rows * N);
        failed = !acc;
#pragma omp for schedule(dynamic, 1)
        for (int64_t part = 0; part < parts; ++part) {
            if (!acc) continue;
            float *sums = partial + part * rows * N;
            memset(sums, 0, sizeof(float) * rows * N);
            for (int64_t g = G * part / parts; g < G * (part + 1) / parts; ++g) {
                memset(acc, 0, sizeof(float) * rows * N);
                // one row, the decode step that matters most, with its row count a constant: with
                // a variable count the compiler hoisted the codes' conversions out of the row loop
                // into memory, which halved the speed at one row
                if (rows == 1)
                    int4_add_group(q + g * words * N, N, words, xs + g * group, K, acc, 1);
                else
                    int4_add_group(q + g * words * N, N, words, xs + g * group, K, acc, rows);
                // the group's scales and offsets (-scale * zero, as the layer's reference computes
                // them) of eight outputs at a time, read once for all rows
                for (int64_t n = 0; n < N; n += 8) {
                    const __m256 scale = bf16_scales ? widen_bf16((const uint16_t *)s + g * N + n)
                                                     : _mm256_loadu_ps((const float *)s + g * N + n);
                    const __m256i stored = _mm256_srlv_epi32(_mm256_set1_epi32(qz[(g * N + n) / 8]), zero_shifts);
                    const __m256i zero = _mm256_and_si256(_mm256_add_epi32(stored, offset), low_bits);
                    const __m256 minus = _mm256_mul_ps(_mm256_xor_ps(scale, sign), _mm256_cvtepi32_ps(zero));
                    for (int64_t m = 0; m < rows; ++m) {
                        float *out = sums + m * N + n;
                        const __m256 sum = _mm256_fmadd_ps(_mm256_loadu_ps(acc + m * N + n), scale, _mm256_loadu_ps(out));
                        _mm256_storeu_ps(out, _mm256_fmadd_ps(_mm256_broadcast_ss(xsum + m * G + g), minus, sum));
                    }
                }
            }
        }
        free(acc);
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n += 32)
            for (int64_t m = 0; m < rows && !failed; ++m)
                for (int64_t i = n; i < n + 32; i += 8) {
                    __m256 total = bias ? _mm256_loadu_ps(bias + i) : _mm256_setzero_ps();
                    for (int64_t part = 0; part < parts; ++part)
                        total = _mm256_add_ps(total, _mm256_loadu_ps(partial + (part * rows + m) * N + i));
                    float values[8];
                    _mm256_storeu_ps(values, total);
                    for (int j = 0; j < 8; ++j) store_value(y, m * N + i + j, values[j], bf16);
                }
    }
    free(xs), free(xsum), free(partial);
    return failed ? -1 : 0;
}

// exp(x) in eight lanes, within about 2 units in the last place of fp32 for x <= 0 (Cephes'
// expf: x = n ln 2 + r with |r| <= ln 2 / 2, a degree-7 polynomial in r, then 2^n); below -87
// it gives 2^-126 times a little, where the softmax's weight is as good as 0.
AVX2 static inline __m256 exp_lanes(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);  // this order keeps a NaN
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // ln 2 in two parts, so that n ln 2 is exact enough to subtract
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(power));
}

// One (row, head): scores of the visible keys, then the softmax's weighted sum of their values.
// With D a constant (the switch below) the values' sums stay in registers. The keys go eight
// positions at a time, each summed in its own register: one chain of FMAs per position, eight
// side by side, where one position at a time waited on each FMA's latency.
AVX2 static inline __attribute__((always_inline)) void attend_head(const float *query, const uint16_t *k,
                                                                  const uint16_t *v, const uint16_t *m, int64_t L,
                                                                  const int64_t D, int64_t key_step, int64_t value_step,
                                                                  int64_t mask_step, float scale, float *scores,
                                                                  uint16_t *out) {
    float top = -INFINITY;
    for (int64_t l0 = 0; l0 < L; l0 += 8) {
        const int64_t count = L - l0 < 8 ? L - l0 : 8;
        int visible = 0;
        for (int64_t i = 0; i < count; ++i) visible |= bf16_to_float(m[(l0 + i) * mask_step]) != -INFINITY;
        if (!visible) {
            for (int64_t i = 0; i < count; ++i) scores[l0 + i] = -INFINITY;
            continue;
        }
        __m256 dots[8];
        for (int i = 0; i < 8; ++i) dots[i] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
            const __m256 u = _mm256_loadu_ps(query + d);
            for (int i = 0; i < 8; ++i)
                if (i < count) dots[i] = _mm256_fmadd_ps(widen_bf16(k + (l0 + i) * key_step + d), u, dots[i]);
        }
        float sums[8];
        _mm_storeu_ps(sums, sum4(dots[0], dots[1], dots[2], dots[3]));
        _mm_storeu_ps(sums + 4, sum4(dots[4], dots[5], dots[6], dots[7]));
        for (int64_t i = 0; i < count; ++i) {
            const float hidden = bf16_to_float(m[(l0 + i) * mask_step]);
            scores[l0 + i] = hidden == -INFINITY ? -INFINITY : sums[i] * scale + hidden;
            if (scores[l0 + i] > top) top = scores[l0 + i];
        }
    }
    // the softmax's weights in place of the scores, eight at a time: exp(score - top), 0 for
    // hidden keys (expf one at a time took a quarter of the time)
    float total = 0.0f;
    if (top != -INFINITY) {
        const __m256 shift = _mm256_set1_ps(top), hidden = _mm256_set1_ps(-INFINITY);
        __m256 totals = _mm256_setzero_ps();
        int64_t l = 0;
        for (; l + 8 <= L; l += 8) {
            const __m256 score = _mm256_loadu_ps(scores + l);
            const __m256 weight = _mm256_andnot_ps(_mm256_cmp_ps(score, hidden, _CMP_EQ_OQ),
                                                   exp_lanes(_mm256_sub_ps(score, shift)));
            _mm256_storeu_ps(scores + l, weight);
            totals = _mm256_add_ps(totals, weight);
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, totals);
        for (int i = 0; i < 8; ++i) total += lanes[i];
        for (; l < L; ++l) total += scores[l] = scores[l] == -INFINITY ? 0.0f : expf(scores[l] - top);
    }
    __m256 acc[32];  // D <= 256
    for (int64_t j = 0; j < D / 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t l = 0; top != -INFINITY && l < L; ++l) {
        if (scores[l] == 0.0f) continue;  // hidden, or too small to count
        const __m256 weight = _mm256_set1_ps(scores[l]);
        for (int64_t j = 0; j < D / 8; ++j) acc[j] = _mm256_fmadd_ps(widen_bf16(v + l * value_step + 8 * j), weight, acc[j]);
    }
    // a row that sees no key gets NaN, as softmax over nothing does in PyTorch
    const float inverse = top == -INFINITY ? NAN : 1.0f / total;
    for (int64_t j = 0; j < D / 8; ++j) {
        float values[8];
        _mm256_storeu_ps(values, acc[j]);
        for (int i = 0; i < 8; ++i) out[8 * j + i] = float_to_bf16(values[i] * inverse);
    }
}

// One query per row and head against a bf16 cache: out = softmax(q k^T * scale + mask) v, all in
// fp32, rounded once to bf16. q [B, H, D] and out [B, H, D] contiguous bf16; keys and values bf16
// with strides (in elements) per row, head and position, each position's D values contiguous;
// mask bf16 [B, L] (additive, 0 or -inf) with strides per row and position. Eight keys in a row
// that the mask hides are not read: a static step's cache is mostly hidden capacity. D a multiple
// of 8, at most 256. Returns 0, or -1 where memory ran out (out then undefined).
AVX2 int attend_one_query(const uint16_t *q, const uint16_t *keys, const uint16_t *values, const uint16_t *mask,
                          int64_t B, int64_t H, int64_t L, int64_t D, const int64_t *key_strides,
                          const int64_t *value_strides, const int64_t *mask_strides, float scale, uint16_t *out,
                          int threads) {
    if (D % 8 || D > 256) return -2;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *scores = malloc(sizeof(float) * (L + 1));
        failed = !scores;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < B * H; ++task) {
            if (!scores) continue;
            const int64_t b = task / H, h = task % H;
            const uint16_t *k = keys + b * key_strides[0] + h * key_strides[1];
            const uint16_t *v = values + b * value_strides[0] + h * value_strides[1];
            const uint16_t *m = mask + b * mask_strides[0];
            float query[256];
            for (int64_t d = 0; d < D; ++d) query[d] = bf16_to_float(q[task * D + d]);
            const int64_t ks = key_strides[2], vs = value_strides[2], ms = mask_strides[1];
            uint16_t *o = out + task * D;
            // Qwen-VL's heads are 128 wide, the mid benchmark model's 64
            if (D == 128)
                attend_head(query, k, v, m, L, 128, ks, vs, ms, scale, scores, o);
            else if (D == 64)
                attend_head(query, k, v, m, L, 64, ks, vs, ms, scale, scores, o);
            else
                attend_head(query, k, v, m, L, D, ks, vs, ms, scale, scores, o);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}

// The residual stream's add and the RMS norm after it, in bf16, as RMSNorm spells it in PyTorch:
// sum = bf16(x + delta); normed = bf16(bf16(sum * 1 / sqrt(mean(sum^2) + eps)) * weight), the mean
// in fp32. x, delta and sum (both NULL: the norm of x), normed [rows, width], weight [width].
// width a multiple of 8. PyTorch's eager norm is a dozen small operations, 50-60 us a call where
// this takes a few.
AVX2 int add_rms_norm(const uint16_t *x, const uint16_t *delta, const uint16_t *weight, float eps, int64_t rows,
                 int64_t width, uint16_t *sum, uint16_t *normed) {
    for (int64_t m = 0; m < rows; ++m) {
        const uint16_t *xr = x + m * width;
        uint16_t *nr = normed + m * width;
        if (delta) {
            const uint16_t *dr = delta + m * width;
            uint16_t *sr = sum + m * width;
            for (int64_t i = 0; i < width; ++i) sr[i] = float_to_bf16(bf16_to_float(xr[i]) + bf16_to_float(dr[i]));
            xr = sr;
        }
        // in eight lanes, as PyTorch's vectorized sum keeps several: an error of about width / 8
        // roundings instead of width
        __m256 lanes = _mm256_setzero_ps();
        for (int64_t i = 0; i < width; i += 8) {
            const __m256 v = widen_bf16(xr + i);
            lanes = _mm256_fmadd_ps(v, v, lanes);
        }
        const __m128 half = _mm_add_ps(_mm256_castps256_ps128(lanes), _mm256_extractf128_ps(lanes, 1));
        const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
        const float squares = _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)));
        const float scale = 1.0f / sqrtf(squares / (float)width + eps);
        for (int64_t i = 0; i < width; ++i) {
            const float unit = bf16_to_float(float_to_bf16(bf16_to_float(xr[i]) * scale));
            nr[i] = float_to_bf16(unit * bf16_to_float(weight[i]));
        }
    }
    return 0;
}

// A decode step's rotary, log-n scale and cache write for one token per row, in bf16, rounded
// where `TorchOps.rotate_and_store` rounds: each rotated channel is bf16(x cos + x' sin) with the
// two products and their sum each an fp32 operation (x' the rotate-half partner, `sin` already
// signed), the query then bf16(q * logn). qkv [B, 3 H D] contiguous (queries, keys, values, each
// [H, D]); cos and sin fp32 [B, R], R even and at most D (channels past R keep their values);
// logn bf16 [B] or NULL; positions [B]; keys and values bf16 with strides (in elements) per row,
// head and position, each position's D values contiguous, `capacity` positions; query out
// [B, H, D]. Returns 0, or -2 where a position is outside the cache (nothing then written).
// PyTorch spells this in a dozen small operations a layer, about 0.8 ms of a mid-size step.
int rotate_to_cache(const uint16_t *qkv, int64_t B, int64_t H, int64_t D, int64_t R, const float *cos,
                    const float *sin, const uint16_t *logn, const int64_t *positions, int64_t capacity,
                    uint16_t *keys, const int64_t *key_strides, uint16_t *values, const int64_t *value_strides,
                    uint16_t *query) {
    for (int64_t b = 0; b < B; ++b)
        if (positions[b] < 0 || positions[b] >= capacity) return -2;
    const int64_t half = R / 2;
    for (int64_t b = 0; b < B; ++b) {
        const float *c = cos + b * R, *s = sin + b * R;
        const int64_t p = positions[b];
        for (int64_t h = 0; h < H; ++h) {
            const uint16_t *q = qkv + b * 3 * H * D + h * D, *k = q + H * D, *v = k + H * D;
            uint16_t *qo = query + (b * H + h) * D;
            uint16_t *ko = keys + b * key_strides[0] + h * key_strides[1] + p * key_strides[2];
            uint16_t *vo = values + b * value_strides[0] + h * value_strides[1] + p * value_strides[2];
            for (int64_t d = 0; d < D; ++d) {
                uint16_t qd = q[d], kd = k[d];
                if (d < R) {
                    const int64_t partner = d < half ? d + half : d - half;
                    const float qc = bf16_to_float(q[d]) * c[d], qs = bf16_to_float(q[partner]) * s[d];
                    const float kc = bf16_to_float(k[d]) * c[d], ks = bf16_to_float(k[partner]) * s[d];
                    qd = float_to_bf16(qc + qs), kd = float_to_bf16(kc + ks);
                }
                qo[d] = logn ? float_to_bf16(bf16_to_float(qd) * bf16_to_float(logn[b])) : qd;
                ko[d] = kd, vo[d] = v[d];
            }
        }
    }
    return 0;
}
