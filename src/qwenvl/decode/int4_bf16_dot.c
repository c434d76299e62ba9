// The int4 product of bf16 rows through AVX512-BF16 dot products, for CPUs that have them
// (`int4_product` in cpu_kernels.c calls it where it may). Same inputs and outputs as there.
//
// vdpbf16ps adds to each fp32 lane the products of two pairs of bf16 values, rounding as an fp32
// sum does. The codes become bf16 in two instructions: a code c in the low bits of a 16-bit lane
// that holds 0x4300 reads as the bf16 value 128 + c (0x4300 is 128, whose last mantissa bit is
// worth 1). The word's codes at bits 4j and 4j + 16 (inputs 8r + j and 8r + j + 4) sit in the two
// 16-bit halves of the lane after a shift by 4j, so one mask-and-or (vpternlogd) makes the pair,
// and the inputs are paired to match. Per 32 multiply-adds: a shift, a vpternlogd and a vdpbf16ps,
// where the AVX2 kernel needs an and, a convert and an FMA per 8.
//
// Each group's sums hold 128 * sum(x) on top of sum(x * code); it joins the zero point's term:
// y += scale * sum(x * (128 + code)) - scale * (zero + 128) * sum(x). With bf16 scales,
// scale * (zero + 128) is exact in fp32 (8 significant bits times 8).
//
// Measured on Zen 4 EPYC cores (AVX512-BF16), one row of a 5504 x 1024 weight: 1.3-1.45x the AVX2
// kernel's speed with the codes in cache. From memory the reads bound it; asking for the words
// 16 KB ahead into L2 (not L1, whose few miss buffers the loads need) read 27 GB/s on two
// threads where 3 KB ahead into L1 read 23.

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define DOT __attribute__((target("avx512f,avx512bw,avx512bf16")))

int has_avx512_bf16(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512bf16");
}

// Adds the products of the words q[r, 0 .. N) (one row of words: inputs 8r .. 8r + 7) with each
// row's input pairs xp + m * xstride (four pairs: inputs 8r + j and 8r + j + 4) to acc [rows, N];
// `first`: writes them there instead (the group's first row of words: no zeroing beforehand).
DOT static inline __attribute__((always_inline)) void dot_word_row(const int32_t *q, int64_t N, const uint32_t *xp,
                                                                   int64_t xstride, float *acc, const int rows,
                                                                   const int first) {
    const __m512i low = _mm512_set1_epi32(0x000F000F), magic = _mm512_set1_epi32(0x43004300);
    for (int64_t n = 0; n < N; n += 16) {
        _mm_prefetch((const char *)(q + n + 4096), _MM_HINT_T1);
        const __m512i w = _mm512_loadu_si512(q + n);
        // (w & low) | magic
        const __m512bh c0 = (__m512bh)_mm512_ternarylogic_epi32(w, low, magic, 0xEA);
        const __m512bh c1 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(w, 4), low, magic, 0xEA);
        const __m512bh c2 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(w, 8), low, magic, 0xEA);
        const __m512bh c3 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi32(w, 12), low, magic, 0xEA);
        for (int m = 0; m < rows; ++m) {
            const uint32_t *x = xp + m * xstride;
            float *out = acc + m * N + n;
            __m512 even = first ? _mm512_setzero_ps() : _mm512_loadu_ps(out), odd = _mm512_setzero_ps();
            even = _mm512_dpbf16_ps(even, c0, (__m512bh)_mm512_set1_epi32((int)x[0]));
            odd = _mm512_dpbf16_ps(odd, c1, (__m512bh)_mm512_set1_epi32((int)x[1]));
            even = _mm512_dpbf16_ps(even, c2, (__m512bh)_mm512_set1_epi32((int)x[2]));
            odd = _mm512_dpbf16_ps(odd, c3, (__m512bh)_mm512_set1_epi32((int)x[3]));
            _mm512_storeu_ps(out, _mm512_add_ps(even, odd));
        }
    }
}

DOT static inline __attribute__((always_inline)) void dot_group(const int32_t *q, int64_t N, int64_t words,
                                                                const uint32_t *xp, int64_t xstride, float *acc,
                                                                const int rows) {
    dot_word_row(q, N, xp, xstride, acc, rows, 1);
    for (int64_t r = 1; r < words; ++r) dot_word_row(q + r * N, N, xp + 4 * r, xstride, acc, rows, 0);
}

// x [rows, K] bf16, the rest as int4_product's (cpu_kernels.c); N a multiple of 16, rows at most 8.
DOT int int4_product_dot(const uint16_t *x, int64_t rows, int64_t K, const int32_t *q, const void *s, int bf16_scales,
                         const int32_t *qz, int zero_offset, int64_t N, int64_t group, const float *bias, uint16_t *y,
                         int parts_wanted, int threads) {
    const int64_t G = K / group, words = group / 8, parts = G < parts_wanted ? G : parts_wanted, pairs = K / 2;
    uint32_t *xp = malloc(sizeof(uint32_t) * (rows * pairs + 1));
    float *xsum = malloc(sizeof(float) * (rows * G + 1)), *partial = malloc(sizeof(float) * (parts * rows * N + 1));
    if (!xp || !xsum || !partial) return free(xp), free(xsum), free(partial), -1;
    for (int64_t m = 0; m < rows; ++m) {
        const uint16_t *xm = x + m * K;
        for (int64_t r = 0; r < K / 8; ++r)
            for (int j = 0; j < 4; ++j) xp[m * pairs + 4 * r + j] = xm[8 * r + j] | (uint32_t)xm[8 * r + j + 4] << 16;
        for (int64_t g = 0; g < G; ++g) {
            float total = 0.0f;
            for (int64_t k = g * group; k < (g + 1) * group; ++k) total += bf16_to_float(xm[k]);
            xsum[m * G + g] = total;
        }
    }
    const __m512i zero_shifts = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
    const __m512i offset = _mm512_set1_epi32(zero_offset), low_bits = _mm512_set1_epi32(0xF);
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *acc = malloc(sizeof(float) * rows * N);
        failed = !acc;
#pragma omp for schedule(dynamic, 1)
        for (int64_t part = 0; part < parts; ++part) {
            if (!acc) continue;
            float *sums = partial + part * rows * N;
            for (int64_t g = G * part / parts; g < G * (part + 1) / parts; ++g) {
                const int first = g == G * part / parts;  // the part's first group writes its sums
                const int32_t *qg = q + g * words * N;
                const uint32_t *xg = xp + g * group / 2;
                // the row count a constant in each, so the compiler keeps the codes in registers
                switch (rows) {
                case 1: dot_group(qg, N, words, xg, pairs, acc, 1); break;
                case 2: dot_group(qg, N, words, xg, pairs, acc, 2); break;
                case 3: dot_group(qg, N, words, xg, pairs, acc, 3); break;
                case 4: dot_group(qg, N, words, xg, pairs, acc, 4); break;
                default: dot_group(qg, N, words, xg, pairs, acc, (int)rows); break;
                }
                for (int64_t n = 0; n < N; n += 16) {
                    const __m512 scale =
                        bf16_scales ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                          _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)s + g * N + n))), 16))
                                    : _mm512_loadu_ps((const float *)s + g * N + n);
                    const int32_t *z = qz + (g * N + n) / 8;
                    const __m512i stored = _mm512_srlv_epi32(
                        _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(z[0]), _mm512_set1_epi32(z[1])), zero_shifts);
                    const __m512i zero = _mm512_and_si512(_mm512_add_epi32(stored, offset), low_bits);
                    const __m512 minus =
                        _mm512_mul_ps(scale, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_set1_epi32(-128), zero)));
                    for (int64_t m = 0; m < rows; ++m) {
                        float *out = sums + m * N + n;
                        const __m512 before = first ? _mm512_setzero_ps() : _mm512_loadu_ps(out);
                        const __m512 sum = _mm512_fmadd_ps(_mm512_loadu_ps(acc + m * N + n), scale, before);
                        _mm512_storeu_ps(out, _mm512_fmadd_ps(_mm512_set1_ps(xsum[m * G + g]), minus, sum));
                    }
                }
            }
        }
        free(acc);
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n += 16)
            for (int64_t m = 0; m < rows && !failed; ++m) {
                __m512 total = bias ? _mm512_loadu_ps(bias + n) : _mm512_setzero_ps();
                for (int64_t part = 0; part < parts; ++part)
                    total = _mm512_add_ps(total, _mm512_loadu_ps(partial + (part * rows + m) * N + n));
                float values[16];
                _mm512_storeu_ps(values, total);
                for (int j = 0; j < 16; ++j) y[m * N + n + j] = float_to_bf16(values[j]);
            }
    }
    free(xp), free(xsum), free(partial);
    return failed ? -1 : 0;
}
