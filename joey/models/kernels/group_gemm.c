/* joey's CPU kernel for low-bit weights: y = x W^T, W stored as codes in groups of 32 input columns.
 *
 * Why a kernel of our own: PyTorch's int4/int8 CPU kernels turn every weight into a float for every
 * row of activations, which makes a decode step compute-bound and a forward of k tokens cost about k
 * times one token. Here, as llama.cpp does for the same GGUF blocks, the activations are quantized to
 * 8 bits per group of 32 (scale dx = max|x| / 127) and each group's dot products are integer sums on
 * the CPU's byte dot-product instruction (AVX512-VNNI vpdpbusd: 64 multiply-adds of unsigned weight
 * bytes by signed activation bytes). A block of codes is loaded once for up to ROWS rows of activations.
 *
 * Kinds of weight blocks (a decode step is bound by the bytes of weights it streams, so each kind
 * keeps a GGUF block's own numbers at about the file's bits per weight instead of widening them):
 *   U4, U8  4- or 8-bit codes u, a scale d and offset z per (output, group): w = d u + z, fp32, or
 *           fp16 (`half`) where that holds them exactly: Q4_0 and Q4_1 at 5 bits a weight, Q8_0 at 9
 *           (its codes + 128, with an offset of -128 d)
 *   Q4K     Q4_K: 4-bit codes, per (group, output) 6-bit scale sc and min m (a byte each), per
 *           super-block of 8 groups fp16 d and dmin: w = d sc u - dmin m (4.625 bits)
 *   Q5      Q5_0: 5-bit codes, fp16 d per (group, output): w = d (u - 16) (5.5 bits)
 *   Q6K     Q6_K: 6-bit codes, an int8 scale per 16 columns (two per group), fp16 d per super-block:
 *           w = d sc (u - 32) (6.5625 bits)
 * Per row m and group g, with S = sum_k u q[m, k] and A = sum_k q[m, k] (exact integers; dx A is
 * computed once per row, `dsum`):
 *   U4/U8  y += (d dx) S + z (dx A)
 *   Q4K    y += ((d sc) dx) S - (dmin m) (dx A)
 *   Q5     y += (d dx) (S - 16 A)
 *   Q6K    y += ((d sc0) dx) (S0 - 32 A0) + ((d sc1) dx) (S1 - 32 A1)   (0, 1: the group's halves of 16)
 * d sc and dmin m are exact in fp32 (11-bit mantissas times integers of at most 8 bits) and shared by
 * all rows, so each row pays what a U4 group costs: no integer multiplies. Integer ranges: |q| <= 127,
 * so |S| <= 32 * 63 * 127 < 2^18 and |S0 - 32 A0| <= 16 * 32 * 127 < 2^16: int32 holds every sum, and
 * their conversions to float are exact.
 *
 * Losslessness needs every row's result to be the same however many rows share a call (verifying k
 * tokens must reproduce decoding them one by one): a row's integer sums are exact, and its float
 * arithmetic is a fixed sequence of intrinsics (explicit fused multiply-adds; the build forbids the
 * compiler its own contractions) that does not depend on the other rows. tests/test_weight_formats.py
 * and tests/test_gguf_kernels.py check it.
 *
 * Layout (made by joey/models/group_kernel.py), output columns in tiles of 16 lanes; for tile t and
 * group g the codes are one run of bytes, read front to back:
 *   U8:  8 vectors of 64 bytes; vector j, byte 4n + b = u[16t + n, 32g + 4j + b]
 *   U4, Q4K: 4 vectors; vector j, byte 4n + b: low nibble = u[.., 32g + 8j + b] (quad 2j of the group),
 *        high nibble = u[.., 32g + 8j + 4 + b] (quad 2j + 1), of the low 4 bits of u
 *   Q5:  the U4 vectors of u & 15, then 1 vector: byte 4n + b, bit i = bit 4 of u[.., 32g + 4i + b]
 *   Q6K: the U4 vectors of u & 15, then 2 vectors (h = 0, 1: the group's halves): byte 4n + b,
 *        bits 2i, 2i + 1 = bits 4, 5 of u[.., 32g + 16h + 4i + b]
 *   U4/U8 scale, offset: [N/16][K/32][16], fp32 or fp16
 *   Q4K  scale: [N/16][K/32][2][16] bytes (sc, then m); super: [N/16][K/256][2][16] fp16 (d, dmin)
 *   Q5   scale: [N/16][K/32][16] fp16 (d)
 *   Q6K  scale: [N/16][K/32][2][16] int8 (sc of each half); super: [N/16][K/256][16] fp16 (d)
 * A linear may be up to SEGMENTS such weights of different kinds side by side along the outputs (a
 * fused q/k/v whose v is stored in more bits than q and k): one call, one quantization of x.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define GROUP 32
#define LANES 16
#define ROWS 8
#define AHEAD 8
#define SUPER 8     /* groups per K-quant super-block (256 columns) */
#define SEGMENTS 4

enum { U4 = 0, U8 = 1, Q4K = 2, Q5 = 3, Q6K = 4 };

/* One weight of a linear: its arrays (layouts above), its outputs (a multiple of 16) and kind. */
typedef struct {
    const uint8_t *codes;
    const void *scale, *offset, *super;
    const float *bias;
    int64_t n, kind, half;
} segment_t;

/* A linear: `count` weights whose outputs follow each other in y (n = their sum, y's row length). */
typedef struct {
    int64_t count, n;
    segment_t seg[SEGMENTS];
} linear_t;

/* Each row's activations as int8 codes per group of 32 (q), the group's scale (dx), the sum of its
 * codes times its scale (dsum = dx * sum q, for the U4/U8 offsets and Q4_K's mins) and the integer
 * sums of the codes of each half of the group (asum, two per group: Q5_0's and Q6_K's codes are
 * centred by subtracting 16 or 32 times them). Vectorized (it runs on one thread before the product, for
 * every row of every linear), with the scalar arithmetic's exact results: the maximum is exact, the
 * products are the same IEEE multiplications, and the conversion rounds to nearest-even as
 * nearbyintf does in the default rounding mode. */
void quantize_rows(const float *x, int64_t M, int64_t K, int8_t *q, float *dx, float *dsum, int32_t *asum) {
    const int64_t groups = K / GROUP;
    const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
    for (int64_t r = 0; r < M * groups; r++) {
        const float *v = x + r * GROUP;
        const __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(a, sign), _mm512_and_ps(b, sign)));
        const float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        const __m512 s = _mm512_set1_ps(id);
        const __m512i ca = _mm512_cvtps_epi32(_mm512_mul_ps(a, s)), cb = _mm512_cvtps_epi32(_mm512_mul_ps(b, s));
        _mm_storeu_si128((__m128i *)(q + r * GROUP), _mm512_cvtepi32_epi8(ca));
        _mm_storeu_si128((__m128i *)(q + r * GROUP + 16), _mm512_cvtepi32_epi8(cb));
        const int32_t sa = _mm512_reduce_add_epi32(ca), sb = _mm512_reduce_add_epi32(cb);
        dx[r] = d;
        dsum[r] = d * (float)(sa + sb);
        asum[2 * r] = sa;
        asum[2 * r + 1] = sb;
    }
}

static inline __attribute__((always_inline)) void tile_rows(
    const int8_t *q, const float *dx, const float *dsum, int64_t K, const uint8_t *codes, int bits,
    const void *scale, const void *offset, int half, int64_t groups, const float *bias, float *y, int64_t ldy,
    const int mb) {
    /* The dot-product instruction has a latency of several cycles and the core issues two per cycle:
     * ~16 independent sums must be in flight to keep it busy. Each row's group sum is therefore split
     * over CH chains (more when there are few rows), and the codes are loaded vector by vector (two
     * registers) instead of all at once, which leaves the registers to the chains. */
    enum { CH = 4 };
    const int ch = mb <= 4 ? CH : 2;
    __m512 acc[ROWS];
    for (int m = 0; m < mb; m++) acc[m] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(0x0F);
    const int64_t per_group = bits == 4 ? 4 * 64 : 8 * 64;
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *c = codes + g * per_group;
        /* a decode step streams ~100 MB of codes once: ask for the lines a few groups ahead */
        for (int64_t l = 0; l < per_group; l += 64) _mm_prefetch((const char *)(c + AHEAD * per_group + l), _MM_HINT_T0);
        if (!half || !(g & 1)) {  /* scales and offsets: a line holds one group's (fp32) or two (fp16) */
            const int64_t at = (g + 2 * AHEAD) * LANES * (half ? 2 : 4);
            _mm_prefetch((const char *)scale + at, _MM_HINT_T0);
            if (offset) _mm_prefetch((const char *)offset + at, _MM_HINT_T0);
        }
        __m512 d, z = _mm512_setzero_ps();
        if (half) {
            d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)scale + g * LANES)));
            if (offset) z = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)offset + g * LANES)));
        } else {
            d = _mm512_loadu_ps((const float *)scale + g * LANES);
            if (offset) z = _mm512_loadu_ps((const float *)offset + g * LANES);
        }
        /* integer sums are exact in any order, so the split changes no bit */
        __m512i isum[CH][ROWS];
        for (int k = 0; k < ch; k++)
            for (int m = 0; m < mb; m++) isum[k][m] = _mm512_setzero_si512();
        for (int j = 0; j < 8; j += 2) {
            __m512i w0, w1;
            if (bits == 4) {
                const __m512i v = _mm512_loadu_si512((const void *)(c + 32 * j));
                w0 = _mm512_and_si512(v, low);
                w1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            } else {
                w0 = _mm512_loadu_si512((const void *)(c + 64 * j));
                w1 = _mm512_loadu_si512((const void *)(c + 64 * (j + 1)));
            }
            const int k0 = j % ch, k1 = (j + 1) % ch;
            for (int m = 0; m < mb; m++) {
                const int32_t *a = (const int32_t *)(q + m * K + g * GROUP);
                isum[k0][m] = _mm512_dpbusd_epi32(isum[k0][m], w0, _mm512_set1_epi32(a[j]));
                isum[k1][m] = _mm512_dpbusd_epi32(isum[k1][m], w1, _mm512_set1_epi32(a[j + 1]));
            }
        }
        for (int m = 0; m < mb; m++) {
            __m512i total = isum[0][m];
            for (int k = 1; k < ch; k++) total = _mm512_add_epi32(total, isum[k][m]);
            const int64_t r = m * groups + g;
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_mul_ps(d, _mm512_set1_ps(dx[r])), acc[m]);
            if (offset) acc[m] = _mm512_fmadd_ps(z, _mm512_set1_ps(dsum[r]), acc[m]);
        }
    }
    const __m512 b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
    for (int m = 0; m < mb; m++) _mm512_storeu_ps(y + m * ldy, _mm512_add_ps(acc[m], b));
}

/* The high part of quad i's codes moved to bit 4 (and 5), from where the layout stores it (bit
 * `at`): a 16-bit shift, whose bits carried in from the neighbouring byte the caller masks off. */
static inline __attribute__((always_inline)) __m512i high_part(__m512i hv, const int at) {
    if (at < 4) return _mm512_slli_epi16(hv, 4 - at);
    if (at > 4) return _mm512_srli_epi16(hv, at - 4);
    return hv;
}

/* Q4K, Q5 and Q6K weights on one tile of 16 outputs for mb rows (the `kind` and `mb` are constants
 * where it is inlined). The same chains as tile_rows; the codes' fifth and sixth bits are merged in
 * registers (low | (high & mask), one ternary-logic instruction), so the product is still one
 * unsigned-by-signed byte dot product per quad. */
static inline __attribute__((always_inline)) void tile_blocks(
    const int8_t *q, const float *dx, const float *dsum, const int32_t *asum, int64_t K, const uint8_t *codes,
    const int kind, const uint8_t *scale, const uint16_t *super, int64_t groups, const float *bias, float *y,
    int64_t ldy, const int mb) {
    enum { CH = 4 };
    const int ch = mb <= 4 ? CH : 2, per = ch / 2;  /* Q6K: per chains for each half of a group */
    const int64_t per_group = kind == Q4K ? 256 : kind == Q5 ? 320 : 384;
    const int64_t super_halves = kind == Q4K ? 2 * LANES : LANES;  /* fp16 values per super-block */
    __m512 acc[ROWS];
    for (int m = 0; m < mb; m++) acc[m] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(0x0F), top = _mm512_set1_epi8(kind == Q5 ? 0x10 : 0x30);
    __m512 d = _mm512_setzero_ps(), dmin = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *c = codes + g * per_group;
        for (int64_t l = 0; l < per_group; l += 64) _mm_prefetch((const char *)(c + AHEAD * per_group + l), _MM_HINT_T0);
        if (!(g & 1)) _mm_prefetch((const char *)(scale + (g + 2 * AHEAD) * 32), _MM_HINT_T0);  /* 32 bytes a group */
        if (kind == Q5) {
            d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scale + g * 32)));
        } else if (g % SUPER == 0) {
            const uint16_t *s = super + g / SUPER * super_halves;
            _mm_prefetch((const char *)(s + 2 * super_halves), _MM_HINT_T0);
            d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)s));
            if (kind == Q4K) dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + LANES)));
        }
        __m512i isum[CH][ROWS];
        for (int k = 0; k < ch; k++)
            for (int m = 0; m < mb; m++) isum[k][m] = _mm512_setzero_si512();
        for (int j = 0; j < 8; j += 2) {
            const __m512i v = _mm512_loadu_si512((const void *)(c + 32 * j));
            __m512i w0 = _mm512_and_si512(v, low), w1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            if (kind == Q5) {
                const __m512i hv = _mm512_loadu_si512((const void *)(c + 256));
                w0 = _mm512_ternarylogic_epi32(w0, high_part(hv, j), top, 0xF8);  /* w0 | (h & top) */
                w1 = _mm512_ternarylogic_epi32(w1, high_part(hv, j + 1), top, 0xF8);
            } else if (kind == Q6K) {
                const __m512i hv = _mm512_loadu_si512((const void *)(c + 256 + 64 * (j / 4)));
                w0 = _mm512_ternarylogic_epi32(w0, high_part(hv, 2 * (j % 4)), top, 0xF8);
                w1 = _mm512_ternarylogic_epi32(w1, high_part(hv, 2 * ((j + 1) % 4)), top, 0xF8);
            }
            /* Q6K keeps the halves apart (each has its own scale); the others split a group freely */
            const int k0 = kind == Q6K ? j / 4 * per + j % per : j % ch;
            const int k1 = kind == Q6K ? j / 4 * per + (j + 1) % per : (j + 1) % ch;
            for (int m = 0; m < mb; m++) {
                const int32_t *a = (const int32_t *)(q + m * K + g * GROUP);
                isum[k0][m] = _mm512_dpbusd_epi32(isum[k0][m], w0, _mm512_set1_epi32(a[j]));
                isum[k1][m] = _mm512_dpbusd_epi32(isum[k1][m], w1, _mm512_set1_epi32(a[j + 1]));
            }
        }
        /* the group's factors, once for all rows: d sc and dmin m are exact in fp32 (11-bit
         * mantissas times 6- or 8-bit integers), so each is the file's own number */
        const uint8_t *s = scale + g * 32;
        __m512 f0 = d, f1 = dmin;
        if (kind == Q4K) {
            f0 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)s))));
            f1 = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(s + 16)))));
        } else if (kind == Q6K) {
            f0 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)s))));
            f1 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(s + 16)))));
        }
        for (int m = 0; m < mb; m++) {
            const int64_t r = m * groups + g;
            const __m512 dxr = _mm512_set1_ps(dx[r]);
            const int32_t a0 = asum[2 * r], a1 = asum[2 * r + 1];
            if (kind == Q6K) {  /* each half: (d sc) dx (S - 32 A) */
                __m512i h0 = isum[0][m], h1 = isum[per][m];
                for (int k = 1; k < per; k++) {
                    h0 = _mm512_add_epi32(h0, isum[k][m]);
                    h1 = _mm512_add_epi32(h1, isum[per + k][m]);
                }
                h0 = _mm512_sub_epi32(h0, _mm512_set1_epi32(32 * a0));
                h1 = _mm512_sub_epi32(h1, _mm512_set1_epi32(32 * a1));
                acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h0), _mm512_mul_ps(f0, dxr), acc[m]);
                acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h1), _mm512_mul_ps(f1, dxr), acc[m]);
                continue;
            }
            __m512i total = isum[0][m];
            for (int k = 1; k < ch; k++) total = _mm512_add_epi32(total, isum[k][m]);
            if (kind == Q5) {  /* d dx (S - 16 A) */
                total = _mm512_sub_epi32(total, _mm512_set1_epi32(16 * (a0 + a1)));
                acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_mul_ps(d, dxr), acc[m]);
            } else {  /* Q4K: (d sc) dx S - (dmin m) (dx A) */
                acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_mul_ps(f0, dxr), acc[m]);
                acc[m] = _mm512_fnmadd_ps(f1, _mm512_set1_ps(dsum[r]), acc[m]);
            }
        }
    }
    const __m512 b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
    for (int m = 0; m < mb; m++) _mm512_storeu_ps(y + m * ldy, _mm512_add_ps(acc[m], b));
}

/* One tile of one weight for the rows [m0, m0 + mb): the row count is a constant in each case, so
 * the accumulators stay in registers. */
#define ROW_CASES(CALL) \
    switch (mb) { case 8: CALL(8); break; case 7: CALL(7); break; case 6: CALL(6); break; case 5: CALL(5); break; \
                  case 4: CALL(4); break; case 3: CALL(3); break; case 2: CALL(2); break; default: CALL(1); break; }

static void run_tile(const segment_t *w, int64_t t, const int8_t *q, const float *dx, const float *dsum,
                     const int32_t *asum, int64_t mb, int64_t K, float *y, int64_t ldy) {
    const int64_t groups = K / GROUP;
    const float *b = w->bias ? w->bias + t * LANES : 0;
    if (w->kind == U4 || w->kind == U8) {
        const int bits = w->kind == U4 ? 4 : 8, half = (int)w->half;
        const uint8_t *c = w->codes + t * groups * (bits == 4 ? 4 * 64 : 8 * 64);
        const int64_t at = t * groups * LANES * (half ? 2 : 4);  /* bytes */
        const void *s = (const char *)w->scale + at;
        const void *z = w->offset ? (const void *)((const char *)w->offset + at) : 0;
#define CALL(n) tile_rows(q, dx, dsum, K, c, bits, s, z, half, groups, b, y, ldy, n)
        ROW_CASES(CALL)
#undef CALL
        return;
    }
    const int64_t per_group = w->kind == Q4K ? 256 : w->kind == Q5 ? 320 : 384;
    const uint8_t *c = w->codes + t * groups * per_group, *s = (const uint8_t *)w->scale + t * groups * 32;
    const uint16_t *sup = w->super ? (const uint16_t *)w->super + t * (groups / SUPER) * (w->kind == Q4K ? 32 : 16) : 0;
    switch (w->kind) {
#define CALL(n) tile_blocks(q, dx, dsum, asum, K, c, Q4K, s, sup, groups, b, y, ldy, n)
    case Q4K: ROW_CASES(CALL) break;
#undef CALL
#define CALL(n) tile_blocks(q, dx, dsum, asum, K, c, Q5, s, sup, groups, b, y, ldy, n)
    case Q5: ROW_CASES(CALL) break;
#undef CALL
#define CALL(n) tile_blocks(q, dx, dsum, asum, K, c, Q6K, s, sup, groups, b, y, ldy, n)
    default: ROW_CASES(CALL) break;
#undef CALL
    }
}

/* q [M, K] int8, dx / dsum [M, K/32], asum [M, K/32, 2] from quantize_rows; y [M, l->n] fp32. The
 * tiles of all the linear's weights form one parallel loop, so the cores share the whole call. */
static void gemm_linear(const int8_t *q, const float *dx, const float *dsum, const int32_t *asum, int64_t M,
                        int64_t K, const linear_t *l, float *y) {
    const int64_t groups = K / GROUP, N = l->n;
    int64_t first[SEGMENTS + 1] = {0};  /* each weight's first tile */
    for (int64_t s = 0; s < l->count; s++) first[s + 1] = first[s] + l->seg[s].n / LANES;
    const int64_t tiles = first[l->count];
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        int64_t s = 0;
        while (t >= first[s + 1]) s++;
        for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
            const int64_t mb = M - m0 < ROWS ? M - m0 : ROWS;
            run_tile(&l->seg[s], t - first[s], q + m0 * K, dx + m0 * groups, dsum + m0 * groups,
                     asum + 2 * m0 * groups, mb, K, y + m0 * N + t * LANES, N);
        }
    }
}

/* y [M, l->n] = x [M, K] fp32 times the linear's weights: quantizes the activations, then multiplies
 * (one call from Python per linear: the per-call overhead is a real share of a decode step). */
void linear_gemm(const float *x, int64_t M, int64_t K, const linear_t *l, float *y) {
    const int64_t groups = K / GROUP;
    int8_t *q = (int8_t *)malloc((size_t)(M * K));
    float *dx = (float *)malloc(sizeof(float) * (size_t)(2 * M * groups));
    int32_t *asum = (int32_t *)malloc(sizeof(int32_t) * (size_t)(2 * M * groups));
    quantize_rows(x, M, K, q, dx, dx + M * groups, asum);
    gemm_linear(q, dx, dx + M * groups, asum, M, K, l, y);
    free(q);
    free(dx);
    free(asum);
}

/* RMSNorm of M rows of K floats: y = x / sqrt(mean(x^2) + eps) * w. Eager PyTorch spends ~25 us of
 * per-op overhead on this at decode time (60 norms a step); one call here takes a few. Each row's
 * sum runs in one fixed order, so a row's result never depends on the call. */
void rms_norm(const float *x, int64_t M, int64_t K, const float *w, float eps, float *y) {
    for (int64_t r = 0; r < M; r++) {
        const float *v = x + r * K;
        float part[16] = {0};
        int64_t i = 0;
        for (; i + 16 <= K; i += 16)
            for (int j = 0; j < 16; j++) part[j] += v[i + j] * v[i + j];
        for (; i < K; i++) part[i % 16] += v[i] * v[i];
        float s = 0.0f;
        for (int j = 0; j < 16; j++) s += part[j];
        const float inv = 1.0f / sqrtf(s / (float)K + eps);
        for (int64_t k = 0; k < K; k++) y[r * K + k] = v[k] * inv * w[k];
    }
}

/* RoPE on the queries and keys of N tokens, the keys and values then stored in the cache: at decode
 * time this replaces ~8 small PyTorch ops per layer (their per-op overhead is most of what they cost).
 * The arithmetic is PyTorch's x * cos + rotate_half(x) * sin, one IEEE multiply per product and one
 * add (no fused multiply-add), so the bits are those of joey.models.llama.apply_rope.
 *   qkv   [N, H + 2 KVH, D] contiguous: queries, keys, values of each token
 *   cos, sin [N, D] (every channel rotates)
 *   q_out [N, H, D]: the rotated queries
 *   token n goes to row rows[n] (NULL: n / T) and slot slots[n] (NULL: first + n % T) of
 *   kc, vc: element (b, h, j, d) at b * sb + h * sh + j * D + d */
void rope_store(const float *qkv, int64_t N, int64_t H, int64_t KVH, int64_t D, const float *cos, const float *sin,
                float *q_out, float *kc, float *vc, int64_t sb, int64_t sh, const int64_t *rows, const int64_t *slots,
                int64_t T, int64_t first) {
    const int64_t half = D / 2, width = (H + 2 * KVH) * D;
    for (int64_t n = 0; n < N; n++) {
        const float *x = qkv + n * width, *c = cos + n * D, *s = sin + n * D;
        const int64_t row = rows ? rows[n] : n / T, slot = slots ? slots[n] : first + n % T;
        for (int64_t h = 0; h < H + KVH; h++) {
            const float *xh = x + h * D;
            float *o = h < H ? q_out + (n * H + h) * D : kc + row * sb + (h - H) * sh + slot * D;
            for (int64_t d = 0; d < half; d++) o[d] = xh[d] * c[d] + (-xh[d + half]) * s[d];
            for (int64_t d = half; d < D; d++) o[d] = xh[d] * c[d] + xh[d - half] * s[d];
        }
        for (int64_t h = 0; h < KVH; h++) {
            const float *vh = x + (H + KVH + h) * D;
            float *o = vc + row * sb + h * sh + slot * D;
            for (int64_t d = 0; d < D; d++) o[d] = vh[d];
        }
    }
}

/* e^x for 16 lanes, each lane on its own (the same instructions whatever its neighbours): a
 * degree-6 polynomial of the reduced argument, scaled by 2^n. Relative error ~2e-7 above e^-87. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* Attention of T queries per row against S cached keys, every query on its own: its scores, softmax
 * and weighted sum of values run in one fixed order over the keys it may see, taken in slot order and
 * numbered 0, 1, 2, ... (the softmax sum's lane for the r-th visible key is r % 16). So a query's
 * result depends only on the sequence of keys it sees: not on how many queries share the call, how
 * many keys the call spans, or at which slots a token tree put its ancestors. Verifying k tokens (a
 * chain or a tree) therefore reproduces decoding them one by one bit for bit in fp32, and a prompt
 * prefilled in pieces gives what it gives in one piece (PyTorch's SDPA sums differently for 1 and k
 * queries; joey otherwise has to run attention in float64).
 *   q    [B, T, H, D] fp32 contiguous (the projections' layout, before any transpose); D % 16 == 0
 *   k, v [B, KVH, max_len, D]: element (b, h, j, d) at b * sb + h * sh + j * D + d
 *   mask bytes (nonzero = may attend) at b * mb + i * mt + j * ms, or NULL: query i sees keys
 *        j <= i + S - T (the queries are the last T positions)
 *   counts [B] or NULL: row b has counts[b] real queries; the rest of its T are padding (zeros out)
 *   ends   [B] or NULL: row b's queries see no key at slot >= ends[b] (rows of a ragged batch end
 *        at their own lengths, so a short row never scans the longest row's slots)
 *   out  [B, T, H, D]; a query that may attend to nothing gets zeros.
 *
 * Speed without changing a bit: the query heads that share a key/value head run together, so each
 * key and value is loaded once for all of them; a key's 16 partial sums are added with the pairing
 * _mm512_reduce_add_ps uses, but for 16 keys at once (a transposing tree: 15 shuffles and adds
 * instead of 16 serial reductions); and the head size is a compile-time constant in the common
 * cases, so the accumulators stay in registers. */

/* Lane j of the result: the sum of a[j]'s 16 lanes, added as _mm512_reduce_add_ps adds them
 * (lanes l and l + 8, then + 4, + 2, + 1), so a key's score has the same bits as one reduction. */
static inline __attribute__((always_inline)) __m512 sum16(const __m512 *a) {
    __m512 c[8], d[4], e[2];
    for (int p = 0; p < 8; p++)
        c[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], 0x44),
                             _mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], 0xEE));
    for (int p = 0; p < 4; p++)
        d[p] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * p], c[2 * p + 1], 0x88),
                             _mm512_shuffle_f32x4(c[2 * p], c[2 * p + 1], 0xDD));
    for (int p = 0; p < 2; p++)
        e[p] = _mm512_add_ps(_mm512_shuffle_ps(d[2 * p], d[2 * p + 1], 0x44),
                             _mm512_shuffle_ps(d[2 * p], d[2 * p + 1], 0xEE));
    const __m512 f = _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], 0x88), _mm512_shuffle_ps(e[0], e[1], 0xDD));
    /* the tree leaves key 4m + q in lane 4q + m */
    const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    return _mm512_permutexvar_ps(order, f);
}

/* Scores, softmax and values of heads [h0, h0 + nh) (one key/value head's) for one query that sees
 * the n keys at slots seen[0..n); CH = D / 16. sc: nh * stride floats of scratch. */
static inline __attribute__((always_inline)) void attend_query(
    const int CH, const float *qi, int64_t nh, int64_t D, const float *kb, const float *vb, const int64_t *seen,
    int64_t n, float scale, float *sc, int64_t stride, float *oi) {
    if (n == 0) {
        for (int64_t hh = 0; hh < nh; hh++)
            for (int c = 0; c < CH; c++) _mm512_storeu_ps(oi + hh * D + 16 * c, _mm512_setzero_ps());
        return;
    }
    float inv[16];
    for (int64_t hh = 0; hh < nh; hh++) {
        __m512 qv[CH];
        for (int c = 0; c < CH; c++) qv[c] = _mm512_loadu_ps(qi + hh * D + 16 * c);
        float *s = sc + hh * stride;
        __m512 top = _mm512_set1_ps(-INFINITY);
        for (int64_t r0 = 0; r0 < n; r0 += 16) {
            const int64_t m = n - r0 < 16 ? n - r0 : 16;
            __m512 acc[16];
            for (int t = 0; t < 16; t++) {
                if (t >= m) {
                    acc[t] = _mm512_setzero_ps();
                    continue;
                }
                const float *kj = kb + seen[r0 + t] * D;
                acc[t] = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kj));
                for (int c = 1; c < CH; c++) acc[t] = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kj + 16 * c), acc[t]);
            }
            const __mmask16 keep = m == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << m) - 1);
            const __m512 s16 = _mm512_mul_ps(sum16(acc), _mm512_set1_ps(scale));
            _mm512_mask_storeu_ps(s + r0, keep, s16);
            top = _mm512_mask_max_ps(top, keep, top, s16);
        }
        const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(top));
        __m512 total = _mm512_setzero_ps();
        for (int64_t r = 0; r < n; r += 16) {
            const __mmask16 keep = n - r >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - r)) - 1);
            const __m512 e = _mm512_maskz_mov_ps(keep, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(keep, s + r), mx)));
            _mm512_mask_storeu_ps(s + r, keep, e);
            total = _mm512_add_ps(total, e);
        }
        inv[hh] = 1.0f / _mm512_reduce_add_ps(total);
    }
    /* values: two heads at a time, each head's sum over the keys in rank order */
    for (int64_t hh = 0; hh < nh; hh += 2) {
        const int two = hh + 1 < nh;
        const float *s0 = sc + hh * stride, *s1 = sc + (hh + two) * stride;
        __m512 o0[CH], o1[CH];
        for (int c = 0; c < CH; c++) o0[c] = o1[c] = _mm512_setzero_ps();
        for (int64_t r = 0; r < n; r++) {
            const float *vj = vb + seen[r] * D;
            const __m512 e0 = _mm512_set1_ps(s0[r]), e1 = _mm512_set1_ps(s1[r]);
            for (int c = 0; c < CH; c++) {
                const __m512 x = _mm512_loadu_ps(vj + 16 * c);
                o0[c] = _mm512_fmadd_ps(e0, x, o0[c]);
                o1[c] = _mm512_fmadd_ps(e1, x, o1[c]);
            }
        }
        for (int c = 0; c < CH; c++) {
            _mm512_storeu_ps(oi + hh * D + 16 * c, _mm512_mul_ps(o0[c], _mm512_set1_ps(inv[hh])));
            if (two) _mm512_storeu_ps(oi + (hh + 1) * D + 16 * c, _mm512_mul_ps(o1[c], _mm512_set1_ps(inv[hh + 1])));
        }
    }
}

void attention(const float *q, int64_t B, int64_t T, int64_t H, int64_t D, const float *k, const float *v,
               int64_t KVH, int64_t S, int64_t sb, int64_t sh, const uint8_t *mask, int64_t mb, int64_t mt,
               int64_t ms, float scale, const int64_t *counts, const int64_t *ends, float *out) {
    const int64_t group = H / KVH, chunks = D / 16, stride = (S + 15) / 16 * 16 + 16;
    /* a work item is one query and the heads of one key/value head; a small call (one decoding row)
     * splits them per head, so both cores get work */
    const int64_t per = B * KVH * T < 8 ? 1 : group;
    const int64_t parts = group / per, items = B * KVH * T * parts;
#pragma omp parallel
    {
        float *sc = (float *)malloc(sizeof(float) * (size_t)(per * stride));
        int64_t *seen = (int64_t *)malloc(sizeof(int64_t) * (size_t)(S > 0 ? S : 1));
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            int64_t r = it;
            const int64_t part = r % parts;
            r /= parts;
            const int64_t i = r % T;
            r /= T;
            const int64_t g = r % KVH, b = r / KVH, h0 = g * group + part * per;
            const float *qi = q + ((b * T + i) * H + h0) * D;
            float *oi = out + ((b * T + i) * H + h0) * D;
            int64_t n = 0; /* visible keys, in slot order */
            if (!counts || i < counts[b]) {
                const int64_t end = ends && ends[b] < S ? ends[b] : S;
                if (mask) {
                    const uint8_t *mr = mask + b * mb + i * mt;
                    for (int64_t j = 0; j < end; j++)
                        if (mr[j * ms]) seen[n++] = j;
                } else {
                    const int64_t last = i + S - T < end - 1 ? i + S - T : end - 1;
                    for (int64_t j = 0; j <= last; j++) seen[n++] = j;
                }
            }
            const float *kb = k + b * sb + g * sh, *vb = v + b * sb + g * sh;
            switch (chunks) { /* constant head sizes keep the accumulators in registers */
            case 4: attend_query(4, qi, per, D, kb, vb, seen, n, scale, sc, stride, oi); break;
            case 8: attend_query(8, qi, per, D, kb, vb, seen, n, scale, sc, stride, oi); break;
            default: attend_query((int)chunks, qi, per, D, kb, vb, seen, n, scale, sc, stride, oi); break;
            }
        }
        free(seen);
        free(sc);
    }
}

/* silu(gate) * up for N rows → out [N, I]; row r's gate at g + r * ld, its up at u + r * ld (ld = 2 I
 * for the fused gate/up output). silu(g) = g / (1 + e^-g) with exp16, lane by lane, so a row's result
 * never depends on the call. */
void silu_mul(const float *g, const float *u, int64_t N, int64_t I, int64_t ld, float *out) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t r = 0; r < N; r++) {
        const float *gr = g + r * ld, *ur = u + r * ld;
        float *o = out + r * I;
        for (int64_t i = 0; i < I; i += 16) {
            const __mmask16 keep = I - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (I - i)) - 1);
            const __m512 x = _mm512_maskz_loadu_ps(keep, gr + i);
            const __m512 s = _mm512_div_ps(x, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
            _mm512_mask_storeu_ps(o + i, keep, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(keep, ur + i)));
        }
    }
}

/* One decoder layer of a Llama-style model whose linear layers all run on this kernel, in one call:
 * the same functions, in the same order, as joey.models.llama's modules call one by one (so the same
 * bits), without ~20 Python-level ops per layer, whose overhead was a third of a decoding step.
 *   x [N, hidden] is updated in place (both residual adds); the attention arguments are those of
 *   rope_store and attention (queries in grid order: N = B * T); each linear may mix kinds of
 *   weights (linear_t), gate_up's n must be 2 * inter. */
typedef struct {
    const float *norm1, *norm2;
    float eps, scale;
    int64_t hidden, inter, H, KVH, D;
    linear_t qkv, o, gate_up, down;
} layer_t;

void decode_layer(const layer_t *L, float *x, int64_t N, const float *cos, const float *sin, float *kc, float *vc,
                  int64_t sb, int64_t sh, const int64_t *rows, const int64_t *slots, int64_t T, int64_t first,
                  int64_t B, int64_t S, const uint8_t *mask, int64_t mb, int64_t mt, int64_t ms,
                  const int64_t *counts, const int64_t *ends) {
    const int64_t hid = L->hidden, HD = L->H * L->D, I = L->inter;
    float *h = (float *)malloc(sizeof(float) * (size_t)(N * hid));
    float *qkv = (float *)malloc(sizeof(float) * (size_t)(N * L->qkv.n));
    float *q = (float *)malloc(sizeof(float) * (size_t)(N * HD));
    float *a = (float *)malloc(sizeof(float) * (size_t)(N * HD));
    float *gu = (float *)malloc(sizeof(float) * (size_t)(N * 2 * I));
    float *m = (float *)malloc(sizeof(float) * (size_t)(N * I));
    float *o = (float *)malloc(sizeof(float) * (size_t)(N * hid));
    rms_norm(x, N, hid, L->norm1, L->eps, h);
    linear_gemm(h, N, hid, &L->qkv, qkv);
    rope_store(qkv, N, L->H, L->KVH, L->D, cos, sin, q, kc, vc, sb, sh, rows, slots, T, first);
    attention(q, B, T, L->H, L->D, kc, vc, L->KVH, S, sb, sh, mask, mb, mt, ms, L->scale, counts, ends, a);
    linear_gemm(a, N, HD, &L->o, o);
    for (int64_t i = 0; i < N * hid; i++) x[i] = x[i] + o[i];
    rms_norm(x, N, hid, L->norm2, L->eps, h);
    linear_gemm(h, N, hid, &L->gate_up, gu);
    silu_mul(gu, gu + I, N, I, 2 * I, m);
    linear_gemm(m, N, I, &L->down, o);
    for (int64_t i = 0; i < N * hid; i++) x[i] = x[i] + o[i];
    free(h); free(qkv); free(q); free(a); free(gu); free(m); free(o);
}
