/* One chunk of kernels/adamw.py's AdamW update in a single pass over memory: the torch ops make about
 * 25 elementwise passes per value (dequantize, update, quantize), this reads and writes each value
 * once. Built at first use by kernels/native.py (cc -O3 -ffp-contract=off) and called through ctypes,
 * which releases the GIL: kernels/adamw.py's worker threads run chunks of it side by side.
 *
 * The torch ops' arithmetic: the same operations in the same order, in float, each rounded once (no
 * contraction into fused multiply-adds except where torch's CPU kernels use one: lerp and addcmul),
 * the same e4m3 codes (round to nearest even) and scales. Not bit for bit: sqrtf is correctly rounded
 * and torch's sqrt on large tensors is not always, and a bf16 master's stochastic rounding draws from
 * a hash here, not from torch's generator. tests/unit/test_compact_states.py bounds both differences.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 256
#define CODE_MAX 448.0f
#define CODE_TINY (1.0f / 512.0f)

static inline float f32_of_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t bits_of_f32(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* e4m3fn code (1 sign, 4 exponent bits with bias 7, 3 mantissa bits) -> its value, exactly (the
 * torch kernel's bit trick gives the same value). A normal code is its bits moved to fp32's positions
 * with the exponent re-biased (7 -> 127); a subnormal one is its mantissa times 2^-9. Neither reads
 * an fp32 denormal, which costs x86 a microcode assist per vector (the trick's 2^120 multiply does:
 * measured about 3x slower here). Branch-free: the loops vectorize. */
static inline float e4m3_value(uint32_t c) {
    uint32_t sign = (c & 0x80u) << 24;
    uint32_t normal = (((c & 0x7Fu) << 20) + (120u << 23)) | sign;
    uint32_t sub = bits_of_f32((float)(int32_t)(c & 7u) * 0x1p-9f) | sign;
    uint32_t is_normal = 0u - (uint32_t)((c & 0x78u) != 0);   /* all ones or zero: a select, not a branch */
    return f32_of_bits((normal & is_normal) | (sub & ~is_normal));
}

/* x (|x| <= 448, or NaN) -> its e4m3fn code, rounded to nearest even as torch's conversion does.
 * Both the normal and the subnormal rounding are computed and one is selected: no branch. */
static inline uint32_t e4m3_code(float x) {
    uint32_t u = bits_of_f32(x);
    uint32_t sign = (u >> 24) & 0x80u;
    uint32_t a = u & 0x7FFFFFFFu;
    /* normal: re-bias the exponent (127 -> 7) and round the 23-bit mantissa to 3 bits, ties to even;
     * a carry out of the mantissa moves to the exponent, as it should */
    uint32_t rn = a - (120u << 23);
    rn = (rn + 0x7FFFFu + ((rn >> 20) & 1u)) >> 20;
    /* below 2^-6: a subnormal code, x / 2^-9 rounded to even (the scaling is exact; 8 is 2^-6's
     * normal code). The cap at 8 keeps the conversion defined where this branch is not the one taken. */
    float t = f32_of_bits(a) * 512.0f;
    t = t < 8.0f ? t : 8.0f;  /* not fminf: GCC does not vectorize it */
    uint32_t rs = (uint32_t)(int32_t)((t + 0x1p23f) - 0x1p23f);  /* to nearest even: t < 2^22 */
    uint32_t r = a < 0x3C800000u ? rs : rn;
    r = a > 0x7F800000u ? 0x7Fu : r;                               /* NaN */
    return sign | r;
}

/* gb[0..n) := gradients a..a+n in fp32 (bf16 widened exactly). */
static inline void load_grads(float *restrict gb, const float *restrict g32, const uint16_t *restrict g16,
                              int64_t a, int64_t n) {
    if (g16)
        for (int64_t j = 0; j < n; j++) gb[j] = f32_of_bits((uint32_t)g16[a + j] << 16);
    else
        memcpy(gb, g32 + a, (size_t)n * sizeof(float));
}

/* A 32-bit integer hash with full avalanche (the "lowbias32" constants published by C. Wellons):
 * vectorizes, and a value's draw depends only on (key, its index), never on which thread runs it. */
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

/* The weights a chunk updates: fp32 in place (p32), or a bf16 master (p16) read up to fp32 and
 * stored back with stochastic rounding: a uniform 16-bit draw added to the fp32 bits below bf16's,
 * then truncated, carries into the kept half with probability (x - below) / (above - below), as
 * kernels/rounding.py does with torch's generator. The draw of value i is mix32(mix32(i ^ k1) + k2),
 * (k1, k2) the halves of the chunk's seed. */
typedef struct {
    float *p32;
    uint16_t *p16;
    uint32_t k1, k2;
} Weights;

static inline void load_weights(float *restrict pb, const Weights *w, int64_t a, int64_t n) {
    if (w->p16)
        for (int64_t j = 0; j < n; j++) pb[j] = f32_of_bits((uint32_t)w->p16[a + j] << 16);
    else
        memcpy(pb, w->p32 + a, (size_t)n * sizeof(float));
}

/* dst[j] := src[j] rounded to bf16 stochastically, value j drawing from index base + j. */
static inline void sr_store(uint16_t *restrict dst, const float *restrict src, int64_t n, uint32_t k1, uint32_t k2,
                            uint32_t base) {
    for (int64_t j = 0; j < n; j++) {
        uint32_t noise = mix32(mix32((base + (uint32_t)j) ^ k1) + k2) & 0xFFFFu;
        dst[j] = (uint16_t)((bits_of_f32(src[j]) + noise) >> 16);
    }
}

static inline void store_weights(const Weights *w, const float *restrict pb, int64_t a, int64_t n) {
    if (w->p16)
        sr_store(w->p16 + a, pb, n, w->k1, w->k2, (uint32_t)a);
    else
        memcpy(w->p32 + a, pb, (size_t)n * sizeof(float));
}

/* The update of one value: torch's single-tensor AdamW op for op. Scalars as the torch kernel rounds
 * them to float: decay = 1 - lr * weight_decay, w1 = 1 - beta1, c2 = 1 - beta2, step = -lr / bc1. */
#define ADAM_VALUE(pi, gi, mi, vi, s)                                                            \
    do {                                                                                         \
        pi = pi * decay;                                                                         \
        mi = fmaf(w1, gi - mi, mi);            /* torch's lerp (weight < 0.5): fused */          \
        vi = fmaf(c2 * gi, gi, vi * beta2);    /* mul_(beta2), then addcmul: fused */            \
        s = sqrtf(vi);                                                                           \
        pi = pi + step * mi / (s / bc2_sqrt + eps); /* addcdiv: (value * t1) / t2, not fused */  \
    } while (0)

#define SCALARS float decay, float w1, float beta2, float c2, float bc2_sqrt, float eps, float step

/* fp32 moments, in place. */
static void chunk_fp32(const Weights *w, const float *restrict g32, const uint16_t *restrict g16,
                       float *restrict m32, float *restrict v32, int64_t k, SCALARS) {
    float gb[BLOCK], pb[BLOCK];
    for (int64_t a = 0; a < k; a += BLOCK) {
        int64_t n = k - a < BLOCK ? k - a : BLOCK;
        load_grads(gb, g32, g16, a, n);
        load_weights(pb, w, a, n);
        for (int64_t j = 0; j < n; j++) {
            int64_t i = a + j;
            float gi = gb[j], pi = pb[j], mi = m32[i], vi = v32[i], s;
            ADAM_VALUE(pi, gi, mi, vi, s);
            (void)s;
            pb[j] = pi;
            m32[i] = mi;
            v32[i] = vi;
        }
        store_weights(w, pb, a, n);
    }
}

/* The largest magnitude of BLOCK values, NaN if any is NaN (as torch's amax), 16 lanes at a time. */
static inline float block_top(const float *x) {
    float lane[16] = {0};
    int nan = 0;
    for (int j = 0; j < BLOCK; j += 16)
        for (int l = 0; l < 16; l++) {
            float a = fabsf(x[j + l]);
            lane[l] = a > lane[l] ? a : lane[l];
            nan |= a != a;
        }
    float top = 0.0f;
    for (int l = 0; l < 16; l++) top = lane[l] > top ? lane[l] : top;
    return nan ? NAN : top;
}

/* 8-bit moments: codes mc / vc (v stored as sqrt(v)), one scale per BLOCK values in ms / vs. */
static void chunk_int8(const Weights *w, const float *restrict g32, const uint16_t *restrict g16,
                       uint8_t *restrict mc, uint8_t *restrict vc, float *restrict ms, float *restrict vs,
                       int64_t k, SCALARS) {
    float m[BLOCK], sv[BLOCK];
    for (int64_t a = 0; a < k; a += BLOCK) {
        int64_t n = k - a < BLOCK ? k - a : BLOCK;
        int64_t blk = a / BLOCK;
        float m_scale = ms[blk], v_scale = vs[blk];
        float gb[BLOCK], pb[BLOCK];  /* fp32 copies first: a select per value would not vectorize well */
        load_grads(gb, g32, g16, a, n);
        load_weights(pb, w, a, n);
        for (int64_t j = 0; j < n; j++) {
            int64_t i = a + j;
            float gi = gb[j];
            float pi = pb[j];
            float mi = e4m3_value(mc[i]) * m_scale;
            float vi = e4m3_value(vc[i]) * v_scale, s;
            vi = vi * vi;
            ADAM_VALUE(pi, gi, mi, vi, s);
            pb[j] = pi;
            m[j] = mi;
            sv[j] = s;
        }
        store_weights(w, pb, a, n);
        for (int64_t j = n; j < BLOCK; j++) m[j] = sv[j] = 0.0f;  /* a tail block's padding: changes no max */
        float m_top = block_top(m), v_top = block_top(sv);
        m_scale = m_top / CODE_MAX;
        v_scale = v_top / CODE_MAX;
        ms[blk] = m_scale;
        vs[blk] = v_scale;
        float m_div = m_scale < 0x1p-126f ? 0x1p-126f : m_scale;   /* clamp(min=tiny); NaN stays NaN */
        float v_div = v_scale < 0x1p-126f ? 0x1p-126f : v_scale;
        uint32_t cm[BLOCK], cv[BLOCK];  /* codes, narrowed to bytes below (one loop of one width vectorizes) */
        for (int j = 0; j < BLOCK; j++) {
            float x = m[j] / m_div;
            x = x < -CODE_MAX ? -CODE_MAX : (x > CODE_MAX ? CODE_MAX : x);
            cm[j] = e4m3_code(x);
            float y = sv[j] / v_div;
            y = y < CODE_TINY ? CODE_TINY : (y > CODE_MAX ? CODE_MAX : y);
            cv[j] = e4m3_code(y);
        }
        for (int64_t j = 0; j < n; j++) {
            mc[a + j] = (uint8_t)cm[j];
            vc[a + j] = (uint8_t)cv[j];
        }
    }
}

/* One AdamW update of k values (kernels/adamw.py's _chunk): weights p32 (fp32, in place) or p16 (a
 * bf16 master, in place, rounded stochastically from the chunk's seed `key`); gradients g (fp32 or
 * bf16); moments fp32 (m32, v32) or 8-bit (mc, vc, ms, vs): NULL for the other format's pointers. */
void fuyou_adamw_chunk(float *p32, uint16_t *p16, uint64_t key, const void *g, int g_bf16, float *m32, float *v32,
                       uint8_t *mc, uint8_t *vc, float *ms, float *vs, int64_t k, SCALARS) {
    const float *g32 = g_bf16 ? NULL : (const float *)g;
    const uint16_t *g16 = g_bf16 ? (const uint16_t *)g : NULL;
    Weights w = {p32, p16, (uint32_t)key, (uint32_t)(key >> 32)};
    if (mc)
        chunk_int8(&w, g32, g16, mc, vc, ms, vs, k, decay, w1, beta2, c2, bc2_sqrt, eps, step);
    else
        chunk_fp32(&w, g32, g16, m32, v32, k, decay, w1, beta2, c2, bc2_sqrt, eps, step);
}

/* dst[0..n) := src[0..n) rounded to bf16 stochastically (kernels/rounding.py's rule, store_weights'
 * arithmetic), value i drawing from (key, offset + i): engine/rounding.py's HomeRounding on a CPU
 * device, whose draws follow one counter through the pass's tensors as a generator's would. */
void fuyou_sr_bf16(uint16_t *dst, const float *src, int64_t n, uint64_t key, uint64_t offset) {
    sr_store(dst, src, n, (uint32_t)key, (uint32_t)(key >> 32), (uint32_t)offset);
}

/* Counter-based standard normals: zo2's z on a CPU device. torch's CPU generator draws normals one at
 * a time on one thread, ~3-5 ns a value on this project's VM, and a streamed zo2 step draws every
 * weight's z twice: most of the step. Here value i of a stream is a function of (key, i) alone, so
 * any piece of the stream can be drawn in any order, and the loop vectorizes.
 *
 * Values 2p and 2p + 1 are pair p's Box-Muller pair (r cos t, r sin t), from two 32-bit draws
 * a = H(2p), b = H(2p + 1), H(c) = mix32(mix32(lo(c) ^ k1) + (hi(c) ^ k2)), (k1, k2) the halves of
 * the key: r = sqrt(-2 ln u), u = (a >> 8 + 1) 2^-24 in (0, 1]; t = 2 pi v, v = (b >> 8) 2^-24, whose
 * top two bits are t's quadrant and the other 22 the angle x in [0, pi/2) within it. ln, sin and cos
 * are polynomials written out here, not libm's, so the numbers are the same on every machine (and in
 * the torch ops tests/unit/test_normal.py checks them against): only +, -, *, / and sqrt, each rounded
 * once (no -ffast-math, no contraction), and selects.
 *   ln u = e ln2 + ln m, m in [sqrt(1/2), sqrt(2)): ln m = 2 atanh(s), s = (m - 1) / (m + 1),
 *     |s| <= 0.172, a series to s^9 (next term below 1e-16);
 *   sin x, cos x: Taylor to x^13 and x^12 at x < pi / 2 (error below 1e-8). */
#define NORMAL_SQRT2 0x1.6a09e6p+0f
#define NORMAL_LN2 0x1.62e430p-1f
#define NORMAL_HALF_PI 0x1.921fb6p+0f

static inline uint32_t counter_hash(uint32_t lo, uint32_t hi, uint32_t k1, uint32_t k2) {
    return mix32(mix32(lo ^ k1) + (hi ^ k2));
}

static inline float normal_radius(uint32_t a) {
    float u = (float)(int32_t)((a >> 8) + 1u) * 0x1p-24f;
    uint32_t bits = bits_of_f32(u);
    float m = f32_of_bits((bits & 0x7FFFFFu) | 0x3F800000u);
    int32_t big = m > NORMAL_SQRT2;
    m = big ? m * 0.5f : m;
    float e = (float)((int32_t)(bits >> 23) - 127 + big);
    float f = m - 1.0f;
    float s = f / (f + 2.0f);
    float s2 = s * s;
    float p = 0x1.c71c72p-4f;             /* 1/9 */
    p = p * s2 + 0x1.24924ap-3f;          /* 1/7 */
    p = p * s2 + 0x1.99999ap-3f;          /* 1/5 */
    p = p * s2 + 0x1.555556p-2f;          /* 1/3 */
    p = p * s2 + 1.0f;
    float ln_u = e * NORMAL_LN2 + (s + s) * p;
    return sqrtf(-2.0f * ln_u);
}

static inline void normal_pair(uint32_t a, uint32_t b, float *zc, float *zs) {
    float r = normal_radius(a);
    uint32_t q = b >> 30;
    float x = (float)(int32_t)((b >> 8) & 0x3FFFFFu) * 0x1p-22f * NORMAL_HALF_PI;
    float y = x * x;
    float c = 0x1.1eed8ep-29f;            /* 1/12! */
    c = c * y - 0x1.27e4fcp-22f;          /* 1/10! */
    c = c * y + 0x1.a01a02p-16f;          /* 1/8! */
    c = c * y - 0x1.6c16c2p-10f;          /* 1/6! */
    c = c * y + 0x1.555556p-5f;           /* 1/4! */
    c = c * y - 0.5f;
    c = c * y + 1.0f;
    float s = 0x1.612462p-33f;            /* 1/13! */
    s = s * y - 0x1.ae6456p-26f;          /* 1/11! */
    s = s * y + 0x1.71de3ap-19f;          /* 1/9! */
    s = s * y - 0x1.a01a02p-13f;          /* 1/7! */
    s = s * y + 0x1.111112p-7f;           /* 1/5! */
    s = s * y - 0x1.555556p-3f;           /* 1/3! */
    s = s * y + 1.0f;
    s = s * x;
    /* q quarter turns: (cos, sin) of x + q pi/2; cos negative in quarters 1 and 2, sin in 2 and 3
     * (sign bits flipped, not branched on: the loop vectorizes) */
    float cq = (q & 1u) ? s : c;
    float sq = (q & 1u) ? c : s;
    *zc = r * f32_of_bits(bits_of_f32(cq) ^ (((q + 1u) & 2u) << 30));
    *zs = r * f32_of_bits(bits_of_f32(sq) ^ ((q & 2u) << 30));
}

static inline void normal_pair_at(uint64_t pair, uint32_t k1, uint32_t k2, float *zc, float *zs) {
    uint64_t c = 2u * pair;
    uint32_t lo = (uint32_t)c, hi = (uint32_t)(c >> 32);
    normal_pair(counter_hash(lo, hi, k1, k2), counter_hash(lo + 1u, hi, k1, k2), zc, zs);
}

/* out[0..n) := values offset .. offset + n of the stream of `key`. A piece that starts or ends inside
 * a pair computes that pair whole and keeps its half. The counters' low halves run without a carry
 * inside each inner loop (it ends where they would wrap), so the loop vectorizes; 512-bit vectors where
 * the CPU has them: the loop is bound by its instruction count, and they halve it (1.9 vs 2.6 ns a
 * value on this project's VM before pairs were drawn whole). */
__attribute__((target("prefer-vector-width=512")))
void fuyou_normal(float *out, int64_t n, uint64_t key, uint64_t offset) {
    uint32_t k1 = (uint32_t)key, k2 = (uint32_t)(key >> 32);
    float zc, zs;
    int64_t j = 0;
    if (n > 0 && (offset & 1u)) {
        normal_pair_at(offset >> 1, k1, k2, &zc, &zs);
        out[0] = zs;
        j = 1;
    }
    while (n - j >= 2) {
        uint64_t c = offset + (uint64_t)j;   /* even: 2 x the pair's index, its first counter */
        uint32_t lo = (uint32_t)c, hi = (uint32_t)(c >> 32);
        int64_t run = (int64_t)((((uint64_t)1 << 32) - lo) / 2u);
        if (run > (n - j) / 2) run = (n - j) / 2;
        float *restrict o = out + j;
        for (int64_t i = 0; i < run; i++) {
            uint32_t l = lo + 2u * (uint32_t)i;
            normal_pair(counter_hash(l, hi, k1, k2), counter_hash(l + 1u, hi, k1, k2), &o[2 * i], &o[2 * i + 1]);
        }
        j += 2 * run;
    }
    if (j < n) {
        normal_pair_at((offset + (uint64_t)j) >> 1, k1, k2, &zc, &zs);
        out[j] = zc;
    }
}
