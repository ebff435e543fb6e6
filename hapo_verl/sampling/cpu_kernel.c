/* Adaptive temperature on fp32 logits on the CPU: the compiled backend of hapo_verl/sampling/fast_path.py (built
 * on first use by hapo_verl/sampling/cpu_kernel.py with the machine's C compiler). Same per-row rule as the Triton
 * kernel (hapo_verl/sampling/triton_kernel.py): entropy -> factor f -> row *= 1/f in place.
 *
 * Why C: the entropy needs one exp per logit, and eager torch's exp alone costs about five elementwise passes on
 * a 2-core x86 machine. Here the exp is a short base-2 polynomial fused with the sums, and each row is finished
 * (max, exp/sum/dot, factor, scaling) before the next starts, so after the first read it is served from L2.
 *
 * Math, per selected row r with input scale a_r > 0 (z = a_r * x_r, m = max z):
 *     d_i   = (z_i - m) * log2(e)                   <= 0, in base-2 units
 *     s     = sum_i 2^d_i,   t = sum_i 2^d_i * d_i
 *     H     = ln s - ln(2) * t / s                   = log s + E_p[m - z], the entropy in nats
 * d is clamped at -125 (2^-125 is the smallest normal exponent we build); such an entry adds at most 2.4e-38 to s,
 * so -inf (masked) entries contribute nothing measurable and never produce 0 * -inf. A row whose entries are all
 * -inf, or that holds +inf or NaN, is given entropy 0, so its factor stays finite.
 * 2^f on [-0.5, 0.5] is a degree-5 polynomial (relative error 1.9e-7 in fp32); partial sums are flushed to
 * double every block of 1024 logits.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAPO_AVX2 1
#else
#define HAPO_AVX2 0
#endif

/* The exp2/sum/dot loop is written once over a vector type: 16 lanes with AVX-512 (fewer instructions, ~20%
 * faster on a Zen 4 core), else 8 lanes with AVX2 + FMA, else plain C. The max and scaling loops are memory-bound
 * and use AVX2. */
#if HAPO_AVX2 && defined(__AVX512F__)
#define HAPO_SIMD 512
#define VW 16
typedef __m512 vf;
#define V_SET1 _mm512_set1_ps
#define V_ZERO _mm512_setzero_ps
#define V_LOAD _mm512_loadu_ps
#define V_ADD _mm512_add_ps
#define V_SUB _mm512_sub_ps
#define V_MAX _mm512_max_ps
#define V_FMADD _mm512_fmadd_ps
#define V_FMSUB _mm512_fmsub_ps
#define V_ADD_TO_EXPONENT(P, N) \
    _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(P), _mm512_slli_epi32(_mm512_castps_si512(N), 23)))
static inline double v_hsum(vf v) { /* in double: a lane holding the max (1.0) must not swallow small ones */
    __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    return _mm512_reduce_add_pd(_mm512_add_pd(lo, hi));
}
#elif HAPO_AVX2
#define HAPO_SIMD 256
#define VW 8
typedef __m256 vf;
#define V_SET1 _mm256_set1_ps
#define V_ZERO _mm256_setzero_ps
#define V_LOAD _mm256_loadu_ps
#define V_ADD _mm256_add_ps
#define V_SUB _mm256_sub_ps
#define V_MAX _mm256_max_ps
#define V_FMADD _mm256_fmadd_ps
#define V_FMSUB _mm256_fmsub_ps
#define V_ADD_TO_EXPONENT(P, N) \
    _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(P), _mm256_slli_epi32(_mm256_castps_si256(N), 23)))
static inline double v_hsum(vf v) { /* in double: a lane holding the max (1.0) must not swallow small ones */
    float l[8];
    _mm256_storeu_ps(l, v);
    return (((double)l[0] + l[1]) + ((double)l[2] + l[3])) + (((double)l[4] + l[5]) + ((double)l[6] + l[7]));
}
#else
#define HAPO_SIMD 0
#endif

#define HAPO_KERNEL_ABI 4
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453
#define D_MIN (-125.0f)
#define BLOCK 1024
#define MAX_THREADS 256

/* degree-5 near-minimax fit of 2^f on [-0.5, 0.5] with p(0) = 1 */
#define P1 0.6931470036506653f
#define P2 0.24022242426872253f
#define P3 0.05550733581185341f
#define P4 0.009671512991189957f
#define P5 0.0013264816952869296f
/* adding 1.5 * 2^23 rounds a float of magnitude < 2^22 to an integer n held in the low mantissa bits, and
 * (bits << 23) is then n << 23 modulo 2^32: adding it to a float's bits adds n to its exponent */
#define ROUND_MAGIC 12582912.0f

int hapo_kernel_abi(void) { return HAPO_KERNEL_ABI; }
int hapo_kernel_simd(void) { return HAPO_SIMD; }

static inline float exp2_scalar(float d, float *dc_out) {
    float dc = d > D_MIN ? d : D_MIN; /* also maps -inf to D_MIN (rows holding NaN never get here) */
    float np = dc + ROUND_MAGIC;
    float n = np - ROUND_MAGIC;
    float f = dc - n;
    float p = 1.0f + f * (P1 + f * (P2 + f * (P3 + f * (P4 + f * P5))));
    uint32_t pb, nb;
    memcpy(&pb, &p, 4);
    memcpy(&nb, &np, 4);
    pb += nb << 23; /* adds n to p's exponent; p in [0.7, 1.42] and n >= -125 keep the result normal */
    memcpy(&p, &pb, 4);
    *dc_out = dc;
    return p;
}

static float row_max(const float *x, int64_t V) {
    int64_t i = 0;
    float m = -INFINITY;
    int nan = 0;
#if HAPO_AVX2
    __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
    __m256 u0 = _mm256_setzero_ps(); /* NaN detector: x != x */
    for (; i + 32 <= V; i += 32) {
        __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
        __m256 c = _mm256_loadu_ps(x + i + 16), d = _mm256_loadu_ps(x + i + 24);
        m0 = _mm256_max_ps(m0, a); m1 = _mm256_max_ps(m1, b);
        m2 = _mm256_max_ps(m2, c); m3 = _mm256_max_ps(m3, d);
        u0 = _mm256_or_ps(u0, _mm256_or_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q), _mm256_cmp_ps(c, d, _CMP_UNORD_Q)));
    }
    m0 = _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3));
    float lanes[8];
    _mm256_storeu_ps(lanes, m0);
    for (int k = 0; k < 8; k++) m = lanes[k] > m ? lanes[k] : m;
    nan = _mm256_movemask_ps(u0) != 0;
#endif
    for (; i < V; i++) {
        if (x[i] != x[i]) nan = 1;
        m = x[i] > m ? x[i] : m;
    }
    return nan ? NAN : m;
}

/* entropy (nats) of softmax(a * x) over one row */
static float row_entropy(const float *x, int64_t V, float a) {
    float mx = row_max(x, V);
    if (!(a > 0.0f)) return NAN;
    if (mx != mx || mx == INFINITY || mx == -INFINITY) return 0.0f; /* no usable distribution (see header) */
    const float b = a * LOG2E;
    const float bm = b * mx; /* d = b*x - b*m: a common rounding of bm shifts every d alike, which H ignores */
    double S = 0.0, T = 0.0;
    int64_t i = 0;
#if HAPO_SIMD
    const vf vb = V_SET1(b), vbm = V_SET1(bm), vmin = V_SET1(D_MIN), magic = V_SET1(ROUND_MAGIC), one = V_SET1(1.0f);
    const vf p1 = V_SET1(P1), p2 = V_SET1(P2), p3 = V_SET1(P3), p4 = V_SET1(P4), p5 = V_SET1(P5);
    /* e = 2^d with d = max(b*x - b*m, -125): n = round(d), f = d - n, e = p(f) with n added to its exponent */
#define EXP2_STEP(XV, SACC, TACC)                                       \
    do {                                                                \
        vf d = V_MAX(V_FMSUB(vb, (XV), vbm), vmin);                     \
        vf np = V_ADD(d, magic);                                        \
        vf f = V_SUB(d, V_SUB(np, magic));                              \
        vf p = V_FMADD(V_FMADD(V_FMADD(V_FMADD(p5, f, p4), f, p3), f, p2), f, p1); \
        vf e = V_ADD_TO_EXPONENT(V_FMADD(p, f, one), np);               \
        SACC = V_ADD(SACC, e);                                          \
        TACC = V_FMADD(e, d, TACC);                                     \
    } while (0)
    while (i + 2 * VW <= V) {
        int64_t stop = i + BLOCK <= V ? i + BLOCK : V;
        vf s0 = V_ZERO(), s1 = s0, t0 = s0, t1 = s0;
        for (; i + 2 * VW <= stop; i += 2 * VW) {
            EXP2_STEP(V_LOAD(x + i), s0, t0);
            EXP2_STEP(V_LOAD(x + i + VW), s1, t1);
        }
        S += v_hsum(V_ADD(s0, s1)); /* flushed to double every BLOCK logits */
        T += v_hsum(V_ADD(t0, t1));
    }
#undef EXP2_STEP
#endif
    {
        float s = 0.0f, t = 0.0f;
        for (; i < V; i++) {
            float dc;
            float e = exp2_scalar(fmaf(b, x[i], -bm), &dc);
            s += e;
            t += e * dc;
            if ((i & (BLOCK - 1)) == BLOCK - 1) { S += s; T += t; s = 0.0f; t = 0.0f; }
        }
        S += s;
        T += t;
    }
    double h = log(S) - LN2 * T / S;
    return h > 0.0 ? (float)h : 0.0f;
}

/* x *= r in place (r = 1/f, as the torch path and the Triton kernel scale) */
static void row_scale(float *x, int64_t V, float r) {
    int64_t i = 0;
#if HAPO_AVX2
    const __m256 vr = _mm256_set1_ps(r);
    for (; i + 16 <= V; i += 16) {
        _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), vr));
        _mm256_storeu_ps(x + i + 8, _mm256_mul_ps(_mm256_loadu_ps(x + i + 8), vr));
    }
#endif
    for (; i < V; i++) x[i] = x[i] * r;
}

/* Packed per-row parameters: the layout is defined once, in hapo_verl/sampling/params.py; cpu_kernel.py passes its
 * column indices as -DHAPO_C_<COLUMN>=i and the row length as -DHAPO_NUM_PARAMS=n. */
#if !defined(HAPO_NUM_PARAMS) || !defined(HAPO_C_ENABLED) || !defined(HAPO_C_INPUT_SCALE) || !defined(HAPO_C_PIVOT) \
    || !defined(HAPO_C_SCALE) || !defined(HAPO_C_POS_SCALE) || !defined(HAPO_C_NEG_SCALE) || !defined(HAPO_C_TAU) \
    || !defined(HAPO_C_REFERENCE_COMPAT)
#error "build through hapo_verl/sampling/cpu_kernel.py: it passes the packed parameter layout (-DHAPO_C_...)"
#endif

typedef struct {
    float log_floor, ref_log_floor, ref_scale_eps;
} floors_t;

/* f = 1 + tau * clamp(h_hat, -1, 1), h_hat from the row's entropy H: the rule of
 * hapo_verl.algorithms.entropy.row_temperature_factor_from_entropy (signed; the fork's mode: |.|, its floors) */
static float temperature_factor(float H, const float *p, floors_t fl) {
    int compat = p[HAPO_C_REFERENCE_COMPAT] != 0.0f;
    float floor_ = compat ? fl.ref_log_floor : fl.log_floor;
    float eps = compat ? fl.ref_scale_eps : 0.0f;
    float h = (logf(H > floor_ ? H : floor_) - p[HAPO_C_PIVOT]) / (p[HAPO_C_SCALE] + eps);
    float neg = compat ? -p[HAPO_C_NEG_SCALE] : p[HAPO_C_NEG_SCALE];
    float h_hat = h > 0.0f ? h * p[HAPO_C_POS_SCALE] : h * neg;
    h_hat = h_hat < -1.0f ? -1.0f : (h_hat > 1.0f ? 1.0f : h_hat);
    return 1.0f + p[HAPO_C_TAU] * h_hat;
}

/* ------------------------------------------------------------------ row-parallel drivers (pthreads) */
typedef struct {
    float *logits;
    int64_t row_stride, vocab;
    const int64_t *rows;
    const float *param; /* op 0: input scale per selected row (NULL = 1); op 1: the [n, 8] parameter table */
    float *out;
    int64_t begin, end;
    int op; /* 0 = entropy, 1 = adaptive temperature */
    floors_t floors;
} job_t;

static void *run_job(void *arg) {
    job_t *j = (job_t *)arg;
    for (int64_t k = j->begin; k < j->end; k++) {
        int64_t r = j->rows ? j->rows[k] : k;
        float *x = j->logits + r * j->row_stride;
        if (j->op == 1) {
            const float *p = j->param + k * HAPO_NUM_PARAMS;
            float f = 1.0f;
            if (p[HAPO_C_ENABLED] != 0.0f) {
                f = temperature_factor(row_entropy(x, j->vocab, p[HAPO_C_INPUT_SCALE]), p, j->floors);
                if (f != 1.0f) row_scale(x, j->vocab, 1.0f / f); /* the row is still in L2 */
            }
            j->out[k] = f;
            continue;
        }
        j->out[k] = row_entropy(x, j->vocab, j->param ? j->param[k] : 1.0f);
    }
    return NULL;
}

static int run_rows(job_t proto, int64_t n, int n_threads) {
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    if (n_threads > n) n_threads = (int)n;
    if (n_threads < 1) n_threads = 1;
    job_t jobs[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    int started[MAX_THREADS];
    for (int t = 0; t < n_threads; t++) {
        jobs[t] = proto;
        jobs[t].begin = n * t / n_threads;
        jobs[t].end = n * (t + 1) / n_threads;
        started[t] = 0;
    }
    for (int t = 1; t < n_threads; t++)
        started[t] = pthread_create(&tids[t], NULL, run_job, &jobs[t]) == 0;
    run_job(&jobs[0]);
    for (int t = 1; t < n_threads; t++) {
        if (started[t])
            pthread_join(tids[t], NULL);
        else
            run_job(&jobs[t]); /* thread creation failed: do its share here */
    }
    return 0;
}

/* out[k] = entropy of softmax(input_scale[k] * logits[rows[k]]) for k < n (rows NULL: row k) */
int hapo_row_entropy(const float *logits, int64_t row_stride, int64_t vocab, const int64_t *rows,
                     const float *input_scale, int64_t n, float *out, int n_threads) {
    job_t proto = {(float *)logits, row_stride, vocab, rows, input_scale, out, 0, 0, 0, {0, 0, 0}};
    return run_rows(proto, n, n_threads);
}

/* For k < n, with p = params[k] (the packed [n, 8] table) and row r = rows[k] (rows NULL: k): if p is enabled,
 * factors[k] = f from the entropy of softmax(p.input_scale * logits[r]) and logits[r] /= f in place; otherwise
 * factors[k] = 1 and the row is untouched. The floors are the constants of hapo_verl.algorithms.entropy. */
int hapo_adaptive_temperature(float *logits, int64_t row_stride, int64_t vocab, const int64_t *rows,
                              const float *params, int64_t n, float *factors, float log_floor, float ref_log_floor,
                              float ref_scale_eps, int n_threads) {
    job_t proto = {logits, row_stride, vocab, rows, params, factors, 0, 0, 1,
                   {log_floor, ref_log_floor, ref_scale_eps}};
    return run_rows(proto, n, n_threads);
}
