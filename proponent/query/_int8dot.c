/* Exact int8 x int8 -> int64 products of stored rows with a few int8 query vectors, at memory speed.
 *
 * products(codes, n, d, stride, z, m, out): out[i*m + v] = sum_j codes[i*stride + j] * z[v*d + j]
 * for rows i < n and vectors v < m (int8 inputs, exact int64 outputs). The rows are read once: a tile
 * of rows is multiplied by every vector while it is in the cache. Called with the GIL released, so a
 * caller splits the rows across threads.
 *
 * Kernels, chosen at run time by what the CPU supports (kernel_name() says which):
 *   avx512vnni: tiles of 8 rows x 2 vectors; vpdpbusd takes unsigned x signed bytes, so the codes are shifted to unsigned
 *               (c ^ 0x80 = c + 128) and 128 * sum(z) is subtracted afterwards;
 *   avx2:       bytes widened to int16, vpmaddwd (pairs of int16 products summed in int32);
 *   scalar:     a plain loop (the compiler vectorises what it can).
 * int32 lane sums are exact up to 65,536 columns (|(c+128)·z| <= 255·128 per product); longer rows are
 * summed in column blocks of that size into int64.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define X86 1
#else
#define X86 0
#endif

#define COL_BLOCK 65536

typedef void (*kernel_fn)(const int8_t *, Py_ssize_t, Py_ssize_t, Py_ssize_t, const int8_t *, Py_ssize_t,
                          int64_t *);

static void products_scalar(const int8_t *codes, Py_ssize_t n, Py_ssize_t d, Py_ssize_t stride, const int8_t *z,
                            Py_ssize_t m, int64_t *out) {
    for (Py_ssize_t i = 0; i < n; i++) {
        const int8_t *row = codes + i * stride;
        for (Py_ssize_t v = 0; v < m; v++) {
            const int8_t *zv = z + v * d;
            int64_t total = 0;
            for (Py_ssize_t c0 = 0; c0 < d; c0 += COL_BLOCK) {
                Py_ssize_t c1 = c0 + COL_BLOCK < d ? c0 + COL_BLOCK : d;
                int32_t acc = 0;
                for (Py_ssize_t j = c0; j < c1; j++) acc += (int32_t)((int16_t)row[j] * (int16_t)zv[j]);
                total += acc;
            }
            out[i * m + v] = total;
        }
    }
}

#if X86
/* ---------------------------------------------------------------- AVX-512 VNNI */
/* rows r0..r0+R-1 (R <= TILE_R) x vectors v0, v0+1 (V <= 2) over columns c0..c1. The full tile is unrolled
 * with plain loads (loads are what bounds this kernel in cache: one per 64 code bytes plus the query bytes
 * shared by the tile's rows); partial tiles and the row tails use masked loads. */
#define TILE_R 8
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void tile_vnni(const int8_t *codes, Py_ssize_t stride,
                                                                              const int8_t *z, Py_ssize_t d,
                                                                              Py_ssize_t r0, int R, Py_ssize_t v0,
                                                                              int V, Py_ssize_t c0, Py_ssize_t c1,
                                                                              int64_t *out, Py_ssize_t m) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i acc[TILE_R][2];
    for (int r = 0; r < TILE_R; r++)
        for (int v = 0; v < 2; v++) acc[r][v] = _mm512_setzero_si512();
    const int8_t *z0 = z + v0 * d;
    const int8_t *z1 = z + (v0 + (V > 1 ? 1 : 0)) * d;
    const int8_t *rp[TILE_R];
    for (int r = 0; r < TILE_R; r++) rp[r] = codes + (r0 + (r < R ? r : 0)) * stride;
    Py_ssize_t body = c0 + ((c1 - c0) / 64) * 64;
    Py_ssize_t j = c0;
    if (R == TILE_R && V == 2) {
        for (; j < body; j += 64) {
            __m512i a = _mm512_loadu_si512((const void *)(z0 + j));
            __m512i b = _mm512_loadu_si512((const void *)(z1 + j));
#pragma GCC unroll 8
            for (int r = 0; r < TILE_R; r++) {
                __m512i x = _mm512_xor_si512(_mm512_loadu_si512((const void *)(rp[r] + j)), flip);
                acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], x, a);
                acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], x, b);
            }
        }
    }
    for (; j < c1; j += 64) {
        Py_ssize_t left = c1 - j;
        __mmask64 k = left >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << left) - 1);
        /* masked-off query bytes are zero, so whatever the shifted code bytes there are adds nothing */
        __m512i a = _mm512_maskz_loadu_epi8(k, (const void *)(z0 + j));
        __m512i b = _mm512_maskz_loadu_epi8(k, (const void *)(z1 + j));
        for (int r = 0; r < R; r++) {
            __m512i x = _mm512_xor_si512(_mm512_maskz_loadu_epi8(k, (const void *)(rp[r] + j)), flip);
            acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], x, a);
            if (V > 1) acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], x, b);
        }
    }
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) out[(r0 + r) * m + v0 + v] += (int64_t)_mm512_reduce_add_epi32(acc[r][v]);
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void products_vnni(const int8_t *codes, Py_ssize_t n,
                                                                                  Py_ssize_t d, Py_ssize_t stride,
                                                                                  const int8_t *z, Py_ssize_t m,
                                                                                  int64_t *out) {
    /* sum((c + 128) z) - 128 sum(z): start every output at -128 sum(z_v) */
    for (Py_ssize_t v = 0; v < m; v++) {
        int64_t s = 0;
        for (Py_ssize_t j = 0; j < d; j++) s += z[v * d + j];
        for (Py_ssize_t i = 0; i < n; i++) out[i * m + v] = -128 * s;
    }
    for (Py_ssize_t c0 = 0; c0 < d; c0 += COL_BLOCK) {
        Py_ssize_t c1 = c0 + COL_BLOCK < d ? c0 + COL_BLOCK : d;
        for (Py_ssize_t r0 = 0; r0 < n; r0 += TILE_R) {
            int R = (int)(n - r0 < TILE_R ? n - r0 : TILE_R);
            for (Py_ssize_t v0 = 0; v0 < m; v0 += 2) {
                int V = (int)(m - v0 < 2 ? m - v0 : 2);
                tile_vnni(codes, stride, z, d, r0, R, v0, V, c0, c1, out, m);
            }
        }
    }
}


/* ---------------------------------------------------------------- AVX2 */
__attribute__((target("avx2"))) static inline int32_t hsum256(__m256i x) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

__attribute__((target("avx2"))) static void products_avx2(const int8_t *codes, Py_ssize_t n, Py_ssize_t d,
                                                           Py_ssize_t stride, const int8_t *z, Py_ssize_t m,
                                                           int64_t *out) {
    memset(out, 0, (size_t)(n * m) * sizeof(int64_t));
    for (Py_ssize_t c0 = 0; c0 < d; c0 += COL_BLOCK) {
        Py_ssize_t c1 = c0 + COL_BLOCK < d ? c0 + COL_BLOCK : d;
        Py_ssize_t body = c0 + ((c1 - c0) / 16) * 16;
        for (Py_ssize_t i = 0; i < n; i++) {
            const int8_t *row = codes + i * stride;
            for (Py_ssize_t v0 = 0; v0 < m; v0 += 2) {
                int V = (int)(m - v0 < 2 ? m - v0 : 2);
                const int8_t *za = z + v0 * d, *zb = z + (v0 + V - 1) * d;
                __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
                for (Py_ssize_t j = c0; j < body; j += 16) {
                    __m256i x = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(row + j)));
                    a0 = _mm256_add_epi32(
                        a0, _mm256_madd_epi16(x, _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(za + j)))));
                    a1 = _mm256_add_epi32(
                        a1, _mm256_madd_epi16(x, _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(zb + j)))));
                }
                int64_t s0 = hsum256(a0), s1 = hsum256(a1);
                for (Py_ssize_t j = body; j < c1; j++) {
                    s0 += (int32_t)row[j] * za[j];
                    s1 += (int32_t)row[j] * zb[j];
                }
                out[i * m + v0] += s0;
                if (V > 1) out[i * m + v0 + 1] += s1;
            }
        }
    }
}
#endif

/* ---------------------------------------------------------------- many vectors: register-blocked GEMM */
/* For m >= MANY_MIN vectors (a batch of queries) the rows are multiplied as a GEMM: the columns in blocks of
 * KC bytes, and within a block a tile of BR rows (KC bytes each: L1-resident) is multiplied by every vector, BV
 * vectors at a time, all BR x BV sums held in registers over the block (the vectors' KC-column slices, m·KC
 * bytes, stay in L2). Each row byte is read from memory once for all m vectors; the sums are reduced and added
 * into the int64 outputs once per block, so int32 lanes hold at most KC/16 products (exact for any D). */
#define KC 4096
#define MANY_MIN 8

/* tiles of 2 rows x 4 vectors (the scalar and AVX2 kernels): sums[r][v] = <rows[r], zv[v]> over columns c0..c1 */
typedef void (*tile24_fn)(const int8_t *const *rows, const int8_t *const *zv, Py_ssize_t c0, Py_ssize_t c1,
                          int64_t sums[2][4]);

static void many_2x4(const int8_t *codes, Py_ssize_t n, Py_ssize_t d, Py_ssize_t stride, const int8_t *z,
                     Py_ssize_t m, int64_t *out, tile24_fn tile) {
    memset(out, 0, (size_t)(n * m) * sizeof(int64_t));
    int64_t sums[2][4];
    for (Py_ssize_t c0 = 0; c0 < d; c0 += KC) {
        Py_ssize_t c1 = c0 + KC < d ? c0 + KC : d;
        for (Py_ssize_t r0 = 0; r0 < n; r0 += 2) {
            int R = n - r0 < 2 ? 1 : 2;
            const int8_t *rows[2] = {codes + r0 * stride, codes + (r0 + R - 1) * stride}; /* padded: discarded */
            for (Py_ssize_t v0 = 0; v0 < m; v0 += 4) {
                int V = (int)(m - v0 < 4 ? m - v0 : 4);
                const int8_t *zv[4];
                for (int v = 0; v < 4; v++) zv[v] = z + (v0 + (v < V ? v : 0)) * d;
                tile(rows, zv, c0, c1, sums);
                for (int r = 0; r < R; r++)
                    for (int v = 0; v < V; v++) out[(r0 + r) * m + v0 + v] += sums[r][v];
            }
        }
    }
}

static void tile_scalar(const int8_t *const *rows, const int8_t *const *zv, Py_ssize_t c0, Py_ssize_t c1,
                        int64_t sums[2][4]) {
    int32_t acc[2][4] = {{0}};
    for (Py_ssize_t j = c0; j < c1; j++) {
        int32_t x0 = rows[0][j], x1 = rows[1][j];
        for (int v = 0; v < 4; v++) {
            acc[0][v] += x0 * zv[v][j];
            acc[1][v] += x1 * zv[v][j];
        }
    }
    for (int r = 0; r < 2; r++)
        for (int v = 0; v < 4; v++) sums[r][v] = acc[r][v];
}

static void many_scalar(const int8_t *codes, Py_ssize_t n, Py_ssize_t d, Py_ssize_t stride, const int8_t *z,
                        Py_ssize_t m, int64_t *out) {
    many_2x4(codes, n, d, stride, z, m, out, tile_scalar);
}

#if X86
/* AVX-512 VNNI: tiles of 3 rows x 8 vectors (24 zmm accumulators, 3 shifted row registers, 1 vector register) */
#define VR 3
#define VV 8
/* the 24 sums are named variables (an array of them was spilled to the stack by gcc) */
#define MV_DECL(v) __m512i s0##v = _mm512_setzero_si512(), s1##v = _mm512_setzero_si512(), s2##v = _mm512_setzero_si512()
#define MV_STEP(v, LOAD)                                                                                          \
    do {                                                                                                          \
        __m512i b = LOAD(zp[v] + j);                                                                              \
        s0##v = _mm512_dpbusd_epi32(s0##v, x0, b);                                                                \
        s1##v = _mm512_dpbusd_epi32(s1##v, x1, b);                                                                \
        s2##v = _mm512_dpbusd_epi32(s2##v, x2, b);                                                                \
    } while (0)
#define MV_ALL(LOAD)                                                                                              \
    do {                                                                                                          \
        __m512i x0 = _mm512_xor_si512(LOAD(rp[0] + j), flip);                                                     \
        __m512i x1 = _mm512_xor_si512(LOAD(rp[1] + j), flip);                                                     \
        __m512i x2 = _mm512_xor_si512(LOAD(rp[2] + j), flip);                                                     \
        MV_STEP(0, LOAD); MV_STEP(1, LOAD); MV_STEP(2, LOAD); MV_STEP(3, LOAD);                                   \
        MV_STEP(4, LOAD); MV_STEP(5, LOAD); MV_STEP(6, LOAD); MV_STEP(7, LOAD);                                   \
    } while (0)
#define MV_FULL(p) _mm512_loadu_si512((const void *)(p))
#define MV_MASKED(p) _mm512_maskz_loadu_epi8(k, (const void *)(p))
#define MV_OUT(v)                                                                                                 \
    do {                                                                                                          \
        sums[0][v] = _mm512_reduce_add_epi32(s0##v);                                                              \
        sums[1][v] = _mm512_reduce_add_epi32(s1##v);                                                              \
        sums[2][v] = _mm512_reduce_add_epi32(s2##v);                                                              \
    } while (0)

__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void micro_vnni(const int8_t *const *rp,
                                                                               const int8_t *const *zp, Py_ssize_t c0,
                                                                               Py_ssize_t c1, int64_t sums[VR][VV]) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    MV_DECL(0); MV_DECL(1); MV_DECL(2); MV_DECL(3); MV_DECL(4); MV_DECL(5); MV_DECL(6); MV_DECL(7);
    Py_ssize_t body = c0 + ((c1 - c0) / 64) * 64, j = c0;
    for (; j < body; j += 64) MV_ALL(MV_FULL);
    if (j < c1) { /* masked-off vector bytes are zero: the shifted code bytes there add nothing */
        __mmask64 k = (((__mmask64)1 << (c1 - j)) - 1);
        MV_ALL(MV_MASKED);
    }
    MV_OUT(0); MV_OUT(1); MV_OUT(2); MV_OUT(3); MV_OUT(4); MV_OUT(5); MV_OUT(6); MV_OUT(7);
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void many_vnni(const int8_t *codes, Py_ssize_t n,
                                                                              Py_ssize_t d, Py_ssize_t stride,
                                                                              const int8_t *z, Py_ssize_t m,
                                                                              int64_t *out) {
    const __m512i ones = _mm512_set1_epi8(1);
    for (Py_ssize_t v = 0; v < m; v++) { /* sum((c + 128) z) - 128 sum(z) */
        int64_t s = 0;
        for (Py_ssize_t c0 = 0; c0 < d; c0 += KC) {
            Py_ssize_t c1 = c0 + KC < d ? c0 + KC : d;
            __m512i t = _mm512_setzero_si512();
            for (Py_ssize_t j = c0; j < c1; j += 64) {
                __mmask64 k = c1 - j >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (c1 - j)) - 1);
                t = _mm512_dpbusd_epi32(t, ones, _mm512_maskz_loadu_epi8(k, (const void *)(z + v * d + j)));
            }
            s += _mm512_reduce_add_epi32(t);
        }
        for (Py_ssize_t i = 0; i < n; i++) out[i * m + v] = -128 * s;
    }
    int64_t sums[VR][VV];
    for (Py_ssize_t c0 = 0; c0 < d; c0 += KC) {
        Py_ssize_t c1 = c0 + KC < d ? c0 + KC : d;
        for (Py_ssize_t r0 = 0; r0 < n; r0 += VR) {
            int R = (int)(n - r0 < VR ? n - r0 : VR);
            const int8_t *rp[VR];
            for (int r = 0; r < VR; r++) rp[r] = codes + (r0 + (r < R ? r : 0)) * stride; /* padded rows: discarded */
            for (Py_ssize_t v0 = 0; v0 < m; v0 += VV) {
                int V = (int)(m - v0 < VV ? m - v0 : VV);
                const int8_t *zp[VV];
                for (int v = 0; v < VV; v++) zp[v] = z + (v0 + (v < V ? v : 0)) * d; /* padded vectors: discarded */
                micro_vnni(rp, zp, c0, c1, sums);
                for (int r = 0; r < R; r++)
                    for (int v = 0; v < V; v++) out[(r0 + r) * m + v0 + v] += sums[r][v];
            }
        }
    }
}

/* AVX2: tiles of 2 rows x 4 vectors; bytes widened to int16 (vpmovsxbw) and multiplied by vpmaddwd (exact: the
 * saturating vpmaddubsw could overflow int16 on two products of 128·127) */
__attribute__((target("avx2"))) static void tile_avx2(const int8_t *const *rows, const int8_t *const *zv,
                                                       Py_ssize_t c0, Py_ssize_t c1, int64_t sums[2][4]) {
    Py_ssize_t body = c0 + ((c1 - c0) / 16) * 16;
    __m256i acc[2][4];
    for (int r = 0; r < 2; r++)
        for (int v = 0; v < 4; v++) acc[r][v] = _mm256_setzero_si256();
    for (Py_ssize_t j = c0; j < body; j += 16) {
        __m256i x0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(rows[0] + j)));
        __m256i x1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(rows[1] + j)));
#pragma GCC unroll 4
        for (int v = 0; v < 4; v++) {
            __m256i b = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(zv[v] + j)));
            acc[0][v] = _mm256_add_epi32(acc[0][v], _mm256_madd_epi16(x0, b));
            acc[1][v] = _mm256_add_epi32(acc[1][v], _mm256_madd_epi16(x1, b));
        }
    }
    for (int r = 0; r < 2; r++)
        for (int v = 0; v < 4; v++) {
            int64_t t = hsum256(acc[r][v]);
            for (Py_ssize_t j = body; j < c1; j++) t += (int32_t)rows[r][j] * zv[v][j];
            sums[r][v] = t;
        }
}

static void many_avx2(const int8_t *codes, Py_ssize_t n, Py_ssize_t d, Py_ssize_t stride, const int8_t *z,
                      Py_ssize_t m, int64_t *out) {
    many_2x4(codes, n, d, stride, z, m, out, tile_avx2);
}
#endif

typedef struct {
    const char *name;
    kernel_fn few, many; /* few: m < MANY_MIN vectors (a query's two: a GEMV); many: a batch's (a GEMM) */
} kernel_pair;

static const kernel_pair scalar_pair = {"scalar", products_scalar, many_scalar};
#if X86
static const kernel_pair vnni_pair = {"avx512vnni", products_vnni, many_vnni};
static const kernel_pair avx2_pair = {"avx2", products_avx2, many_avx2};
#endif
static const kernel_pair *chosen = NULL;

static void choose(void) {
    if (chosen) return;
    chosen = &scalar_pair;
#if X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw"))
        chosen = &vnni_pair;
    else if (__builtin_cpu_supports("avx2"))
        chosen = &avx2_pair;
#endif
}

static const kernel_pair *by_name(const char *name) {
    if (strcmp(name, "auto") == 0) return chosen;
    if (strcmp(name, "scalar") == 0) return &scalar_pair;
#if X86
    if (strcmp(name, "avx512vnni") == 0 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw"))
        return &vnni_pair;
    if (strcmp(name, "avx2") == 0 && __builtin_cpu_supports("avx2")) return &avx2_pair;
#endif
    return NULL;
}

/* products(codes_addr, n, d, stride, z_addr, m, out_addr, kernel="auto"): addresses of C-contiguous buffers
 * (codes: n rows of `stride` bytes, the first d used; z: m x d int8; out: n x m int64). */
static PyObject *py_products(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t codes, n, d, stride, z, m, out;
    const char *name = "auto";
    if (!PyArg_ParseTuple(args, "nnnnnnn|s", &codes, &n, &d, &stride, &z, &m, &out, &name)) return NULL;
    if (n < 0 || d < 0 || m < 0 || stride < d) {
        PyErr_SetString(PyExc_ValueError, "products: negative size or a row stride shorter than the row");
        return NULL;
    }
    const kernel_pair *k = by_name(name);
    if (!k) {
        PyErr_Format(PyExc_ValueError, "products: kernel %s is not available on this CPU", name);
        return NULL;
    }
    if (n == 0 || m == 0) Py_RETURN_NONE;
    kernel_fn fn = m >= MANY_MIN ? k->many : k->few;
    Py_BEGIN_ALLOW_THREADS fn((const int8_t *)codes, n, d, stride, (const int8_t *)z, m, (int64_t *)out);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

/* peak(kernel, reps) -> seconds: the GEMM kernel's compute rate on one tile held in L1 (rows x vectors x KC
 * columns, repeated reps times), the ceiling the products of a batch are measured against. */
static PyObject *py_peak(PyObject *self, PyObject *args) {
    (void)self;
    const char *name = "auto";
    Py_ssize_t reps;
    if (!PyArg_ParseTuple(args, "sn", &name, &reps)) return NULL;
    const kernel_pair *k = by_name(name);
    if (!k) {
        PyErr_Format(PyExc_ValueError, "peak: kernel %s is not available on this CPU", name);
        return NULL;
    }
    enum { PR = 12, PV = 8, PD = 1024 }; /* 20 KB: in any L1 */
    static int8_t codes[PR * PD], z[PV * PD];
    static int64_t out[PR * PV];
    for (int i = 0; i < PR * PD; i++) codes[i] = (int8_t)(i * 37 + 11);
    for (int i = 0; i < PV * PD; i++) z[i] = (int8_t)(i * 53 + 5);
    double t0 = 0, t1 = 0;
    Py_BEGIN_ALLOW_THREADS
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (Py_ssize_t r = 0; r < reps; r++) k->many(codes, PR, PD, PD, z, PV, out);
    clock_gettime(CLOCK_MONOTONIC, &b);
    t0 = (double)a.tv_sec + 1e-9 * (double)a.tv_nsec;
    t1 = (double)b.tv_sec + 1e-9 * (double)b.tv_nsec;
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(dn)", t1 - t0, (Py_ssize_t)PR * PV * PD * reps);
}

static PyObject *py_kernel_name(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyUnicode_FromString(chosen->name);
}

static PyObject *py_kernels(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    const char *names[] = {"avx512vnni", "avx2", "scalar"};
    for (int i = 0; i < 3; i++) {
        if (by_name(names[i])) {
            PyObject *s = PyUnicode_FromString(names[i]);
            PyList_Append(out, s);
            Py_DECREF(s);
        }
    }
    return out;
}

static PyMethodDef methods[] = {
    {"products", py_products, METH_VARARGS, "Exact int8 products of rows with query vectors (int64 out)."},
    {"peak", py_peak, METH_VARARGS, "(seconds, multiply-adds) of the GEMM kernel on an L1-resident tile."},
    {"kernel_name", py_kernel_name, METH_NOARGS, "The kernel chosen for this CPU."},
    {"kernels", py_kernels, METH_NOARGS, "The kernels this CPU can run, fastest first."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_int8dot", NULL, -1, methods};

PyMODINIT_FUNC PyInit__int8dot(void) {
    choose();
    return PyModule_Create(&module);
}
