/* Fused CPU kernels for momres's exact arithmetic (momres/_exact.py): one pass per element
 * where the eager code makes a dozen.  Plain C, no torch headers: compiled on first use by
 * momres/_kernels.py (a fraction of a second) and called through ctypes on the data of
 * contiguous tensors.
 *
 * Integers are held in doubles, as in _exact.py; every value stays below 2**53 in magnitude,
 * so sums, differences and products by num or den are exact.  Floor division by a small
 * integer d multiplies by the rounded reciprocal and corrects the quotient by one step: for
 * |a| < 2**53 the product is within 2/d of a/d, so the floor is off by at most one, and the
 * remainder a - q*d (exact) tells which way.  The results are the exact floor and modulo,
 * which the eager division computes too: the two agree bit for bit (tests/test_kernels.py).
 *
 * Compile with -ffp-contract=off: no product may be fused into an addition (all of them are
 * exact here except g*scale, which is rounded before anything is added to it, and that must
 * round as torch rounds it, in g's own type).
 */
#include <math.h>
#include <stdint.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* One clone per instruction set where the compiler can dispatch at load time (x86-64 GCC and
 * clang): x86-64-v3 (AVX2 and FMA) vectorises the divisions' replacements, the roundings and
 * the rule's fused multiply-adds (with AVX2 alone, fma() is a library call per element, four
 * times slower than torch); "default" runs everywhere. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(MOMRES_NO_CLONES)
#define CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

/* relu(s) in type T as torch's ReLU computes it: NaN and -0 pass through.  The blocks that end
 * in relu(r + x) (momres/_tail.py) are taken in the rule's kernels with s = r + x. */
#define RELU(T, s) ((s) < 0 ? (T)0 : (s))

/* Elements per thread below which a kernel runs on the calling thread alone. */
#define MIN_PER_THREAD 32768

/* q = floor(a / d) and *r = a - q*d in [0, d), exactly (inv: the double nearest 1/d). */
static inline double floordiv(double a, double d, double inv, double *r) {
    double q = floor(a * inv);
    double m = a - q * d;
    q = m < 0 ? q - 1 : q;
    m = m < 0 ? m + d : m;
    q = m >= d ? q + 1 : q;
    m = m >= d ? m - d : m;
    *r = m;
    return q;
}

/* Exactly c <- c*num/den with the lost bits pushed onto the buffer i >= 0 (_exact.mul_frac_):
 * i <- i*den + (c mod den); c <- c div den; c <- c*num + (i mod num); i <- i div num. */
static inline void mul_frac(double *c, double *i, double num, double den, double inv_num,
                            double inv_den) {
    double r, s;
    double q = floordiv(*c, den, inv_den, &r);
    double q2 = floordiv(*i * den + r, num, inv_num, &s);
    *c = q * num + s;
    *i = q2;
}

/* Runs body(lo, hi) over [0, n) on up to `threads` threads, in contiguous slices. */
#ifdef _OPENMP
#define PARALLEL(n, threads, call)                                                      \
    do {                                                                                \
        int64_t n_ = (n);                                                               \
        int t_ = (int)(n_ / MIN_PER_THREAD);                                            \
        t_ = t_ < (threads) ? t_ : (threads);                                           \
        if (t_ <= 1) {                                                                  \
            int64_t lo = 0, hi = n_;                                                    \
            call;                                                                       \
        } else {                                                                        \
            _Pragma("omp parallel num_threads(t_)") {                                   \
                int k_ = omp_get_thread_num(), m_ = omp_get_num_threads();              \
                int64_t lo = n_ * k_ / m_, hi = n_ * (k_ + 1) / m_;                     \
                call;                                                                   \
            }                                                                           \
        }                                                                               \
    } while (0)
#else
#define PARALLEL(n, threads, call)                                                      \
    do {                                                                                \
        int64_t lo = 0, hi = (n);                                                       \
        (void)(threads);                                                                \
        call;                                                                           \
    } while (0)
#endif

/* Forward step (_exact.forward_step_): v <- v*num/den + round(scale*g); x <- x + v*unit.
 * x, v, buf: double; g: the activations' type G, the product scale*g rounded in G as torch
 * computes it.  With pos (else NULL), the new x is also written there in G, rounded as
 * torch's conversion rounds it: the next block's input.  SUFFIX names G.  One loop per form:
 * a test inside kept it from being vectorised. */
#define FORWARD_ONE(G)                                                                  \
    double c = v[j], i = buf[j];                                                        \
    mul_frac(&c, &i, num, den, inv_num, inv_den);                                       \
    c += rint((double)(G)(g[j] * s));                                                   \
    v[j] = c;                                                                           \
    buf[j] = i;                                                                         \
    x[j] += c * unit;
#define FORWARD(SUFFIX, G)                                                              \
    CLONES static void forward_##SUFFIX##_range(                                        \
        double *restrict x, double *restrict v, double *restrict buf, const G *restrict g, \
        G *restrict pos, int64_t lo, int64_t hi, double num, double den, double scale,   \
        double unit) {                                                                  \
        double inv_num = 1.0 / num, inv_den = 1.0 / den;                               \
        G s = (G)scale;                                                                 \
        if (pos) {                                                                      \
            for (int64_t j = lo; j < hi; j++) {                                        \
                FORWARD_ONE(G)                                                          \
                pos[j] = (G)x[j];                                                       \
            }                                                                           \
        } else {                                                                        \
            for (int64_t j = lo; j < hi; j++) {                                        \
                FORWARD_ONE(G)                                                          \
            }                                                                           \
        }                                                                               \
    }                                                                                   \
    void momres_forward_##SUFFIX(double *x, double *v, double *buf, const G *g, G *pos,  \
                                 int64_t n, int64_t num, int64_t den, double scale,    \
                                 double unit, int threads) {                           \
        PARALLEL(n, threads, forward_##SUFFIX##_range(x, v, buf, g, pos, lo, hi,         \
                                                      (double)num, (double)den, scale, \
                                                      unit));                          \
    }

FORWARD(f32, float)
FORWARD(f64, double)

/* Backward step (_exact.backward_chunk_): v <- (v - round(scale*g)) * den/num, the buffer
 * giving back the bits, and stored again in its narrow type B.  With x (else NULL), g is
 * y - x, the difference rounded in G as torch rounds it: a block with its own skip.  With c
 * (else NULL; x given), the block ends in relu(r + x) and g holds its branch r: y = relu(r +
 * x) is taken here as torch rounds it (RULE's tail), and c = (r + x > 0 ? b : 0), the
 * cotangent ReLU hands the branch, is written for the vector-Jacobian product. */
#define BACKWARD(SUFFIX, G, B)                                                          \
    static inline void backward_##SUFFIX##_one(double *v, B *buf, G g, G s, double num,  \
                                               double den, double inv_num,             \
                                               double inv_den) {                       \
        double w = *v - rint((double)(G)(g * s)), i = (double)*buf;                    \
        mul_frac(&w, &i, den, num, inv_den, inv_num);                                   \
        *v = w;                                                                         \
        *buf = (B)i;                                                                    \
    }                                                                                   \
    /* One loop per form, the choice made outside it: a test inside kept the loop from   \
     * being vectorised. */                                                             \
    CLONES static void backward_##SUFFIX##_range(                                       \
        double *restrict v, B *restrict buf, const G *restrict g, const G *restrict x,  \
        const G *restrict b, G *restrict c, int64_t lo, int64_t hi, double num,         \
        double den, double scale) {                                                     \
        double inv_num = 1.0 / num, inv_den = 1.0 / den;                               \
        G s = (G)scale;                                                                 \
        if (c) {                                                                        \
            for (int64_t j = lo; j < hi; j++) {                                        \
                G sj = (G)(g[j] + x[j]);                                                \
                c[j] = sj > 0 ? b[j] : (G)0;                                            \
                backward_##SUFFIX##_one(v + j, buf + j, (G)(RELU(G, sj) - x[j]),        \
                                        s, num, den, inv_num, inv_den);                 \
            }                                                                           \
        } else if (x) {                                                                 \
            for (int64_t j = lo; j < hi; j++)                                          \
                backward_##SUFFIX##_one(v + j, buf + j, (G)(g[j] - x[j]), s, num, den,   \
                                        inv_num, inv_den);                              \
        } else {                                                                        \
            for (int64_t j = lo; j < hi; j++)                                          \
                backward_##SUFFIX##_one(v + j, buf + j, g[j], s, num, den, inv_num,      \
                                        inv_den);                                       \
        }                                                                               \
    }                                                                                   \
    void momres_backward_##SUFFIX(double *v, B *buf, const G *g, int64_t n, int64_t num, \
                                  int64_t den, double scale, int threads) {            \
        PARALLEL(n, threads, backward_##SUFFIX##_range(v, buf, g, 0, 0, 0, lo, hi,        \
                                                       (double)num, (double)den, scale)); \
    }                                                                                   \
    void momres_backward_skip_##SUFFIX(double *v, B *buf, const G *y, const G *x,        \
                                       int64_t n, int64_t num, int64_t den, double scale, \
                                       int threads) {                                  \
        PARALLEL(n, threads, backward_##SUFFIX##_range(v, buf, y, x, 0, 0, lo, hi,        \
                                                       (double)num, (double)den, scale)); \
    }                                                                                   \
    void momres_backward_tail_##SUFFIX(double *v, B *buf, const G *r, const G *x,        \
                                       const G *b, G *c, int64_t n, int64_t num,       \
                                       int64_t den, double scale, int threads) {       \
        PARALLEL(n, threads, backward_##SUFFIX##_range(v, buf, r, x, b, c, lo, hi,        \
                                                       (double)num, (double)den, scale)); \
    }

BACKWARD(f32_u8, float, uint8_t)
BACKWARD(f32_i16, float, int16_t)
BACKWARD(f32_i32, float, int32_t)
BACKWARD(f32_f64, float, double)
BACKWARD(f64_u8, double, uint8_t)
BACKWARD(f64_i16, double, int16_t)
BACKWARD(f64_i32, double, int32_t)
BACKWARD(f64_f64, double, double)

/* Retreat (_exact.retreat_chunk_): x <- x - v on the split form, x the value in float32 and
 * r the remainder to the grid 2**-k in units (int32): U = x*2**k + r - v, exact; the new x is
 * U*2**-k rounded to float32, the new r what that rounding left. */
CLONES static void retreat_f32_range(float *restrict x, int32_t *restrict r,
                                     const double *restrict v, int64_t lo,
                                     int64_t hi, double up, double down) {
    for (int64_t j = lo; j < hi; j++) {
        double u = (double)x[j] * up + (double)r[j] - v[j];
        float y = (float)(u * down);
        x[j] = y;
        r[j] = (int32_t)(u - (double)y * up);
    }
}

void momres_retreat_f32(float *x, int32_t *r, const double *v, int64_t n, int frac_bits,
                        int threads) {
    double up = ldexp(1.0, frac_bits), down = ldexp(1.0, -frac_bits);
    PARALLEL(n, threads, retreat_f32_range(x, r, v, lo, hi, up, down));
}

/* The same for float64 activations, whose value is the grid value itself: x <- x - v*2**-k. */
CLONES static void retreat_f64_range(double *restrict x, const double *restrict v, int64_t lo,
                                     int64_t hi,
                                     double down) {
    for (int64_t j = lo; j < hi; j++)
        x[j] -= v[j] * down;
}

void momres_retreat_f64(double *x, const double *v, int64_t n, int frac_bits, int threads) {
    double down = ldexp(1.0, -frac_bits);
    PARALLEL(n, threads, retreat_f64_range(x, v, lo, hi, down));
}

/* The momentum rule in floating point (_rule.RuleStep under autograd, FloatInversion in float
 * mode): one pass where torch makes two to four.  Each product-and-sum is one fused
 * multiply-add, as torch's vectorised `add(a, b, alpha=c)` computes `a + c*b`, so that the
 * kernels and the eager operations give the same numbers (tests/test_kernels.py); the other
 * operations round once each, as torch's do.  T is float or double, gamma and alpha = 1 - gamma
 * already rounded to T. */
#define RULE(SUFFIX, T, FMA)                                                            \
    /* (x, v, y) -> (x + v', v'), v' = gamma*v + alpha*g, g = y or y - x. */             \
    CLONES static void rule_forward_##SUFFIX##_range(                                   \
        const T *restrict x, const T *restrict v, const T *restrict y, T *restrict xo,   \
        T *restrict vo, int64_t lo, int64_t hi, T gamma, T alpha, int residual) {      \
        for (int64_t j = lo; j < hi; j++) {                                            \
            T g = residual ? y[j] : y[j] - x[j];                                        \
            T w = FMA(g, alpha, v[j] * gamma);                                          \
            vo[j] = w;                                                                  \
            xo[j] = x[j] + w;                                                           \
        }                                                                               \
    }                                                                                   \
    void momres_rule_forward_##SUFFIX(const T *x, const T *v, const T *y, T *xo, T *vo,  \
                                      int64_t n, double gamma, double alpha, int residual, \
                                      int threads) {                                   \
        PARALLEL(n, threads, rule_forward_##SUFFIX##_range(x, v, y, xo, vo, lo, hi,      \
                                                           (T)gamma, (T)alpha, residual)); \
    }                                                                                   \
    /* The same with v' written over v (a velocity of the rule's own): x + v' is the one   \
     * new tensor. */                                                                   \
    CLONES static void rule_step_##SUFFIX##_range(                                      \
        const T *restrict x, T *restrict v, const T *restrict y, T *restrict xo,         \
        int64_t lo, int64_t hi, T gamma, T alpha, int residual) {                      \
        for (int64_t j = lo; j < hi; j++) {                                            \
            T g = residual ? y[j] : y[j] - x[j];                                        \
            T w = FMA(g, alpha, v[j] * gamma);                                          \
            v[j] = w;                                                                   \
            xo[j] = x[j] + w;                                                           \
        }                                                                               \
    }                                                                                   \
    void momres_rule_step_##SUFFIX(const T *x, T *v, const T *y, T *xo, int64_t n,       \
                                   double gamma, double alpha, int residual,           \
                                   int threads) {                                      \
        PARALLEL(n, threads, rule_step_##SUFFIX##_range(x, v, y, xo, lo, hi, (T)gamma,    \
                                                        (T)alpha, residual));          \
    }                                                                                   \
    /* The same in place, g given: v <- gamma*v + alpha*g; x <- x + v. */                \
    CLONES static void rule_advance_##SUFFIX##_range(                                   \
        T *restrict x, T *restrict v, const T *restrict g, int64_t lo, int64_t hi,      \
        T gamma, T alpha) {                                                             \
        for (int64_t j = lo; j < hi; j++) {                                            \
            T w = FMA(g[j], alpha, v[j] * gamma);                                       \
            v[j] = w;                                                                   \
            x[j] += w;                                                                  \
        }                                                                               \
    }                                                                                   \
    void momres_rule_advance_##SUFFIX(T *x, T *v, const T *g, int64_t n, double gamma,  \
                                      double alpha, int threads) {                     \
        PARALLEL(n, threads, rule_advance_##SUFFIX##_range(x, v, g, lo, hi, (T)gamma,     \
                                                           (T)alpha));                 \
    }                                                                                   \
    /* The same given the output y of a block with its own skip, run at x: g = y - x. */  \
    CLONES static void rule_advance_skip_##SUFFIX##_range(                              \
        T *restrict x, T *restrict v, const T *restrict y, int64_t lo, int64_t hi,      \
        T gamma, T alpha) {                                                             \
        for (int64_t j = lo; j < hi; j++) {                                            \
            T w = FMA(y[j] - x[j], alpha, v[j] * gamma);                                \
            v[j] = w;                                                                   \
            x[j] += w;                                                                  \
        }                                                                               \
    }                                                                                   \
    void momres_rule_advance_skip_##SUFFIX(T *x, T *v, const T *y, int64_t n,            \
                                           double gamma, double alpha, int threads) {  \
        PARALLEL(n, threads, rule_advance_skip_##SUFFIX##_range(x, v, y, lo, hi,          \
                                                                (T)gamma, (T)alpha));  \
    }                                                                                   \
    /* The same given the branch r of a block ending in relu(r + x), run at x: g =         \
     * relu(r + x) - x, the add and the ReLU rounded as torch rounds them (as in the tail   \
     * below). */                                                                       \
    CLONES static void rule_advance_tail_##SUFFIX##_range(                              \
        T *restrict x, T *restrict v, const T *restrict r, int64_t lo, int64_t hi,      \
        T gamma, T alpha) {                                                             \
        for (int64_t j = lo; j < hi; j++) {                                            \
            T s = r[j] + x[j];                                                          \
            T w = FMA(RELU(T, s) - x[j], alpha, v[j] * gamma);                          \
            v[j] = w;                                                                   \
            x[j] += w;                                                                  \
        }                                                                               \
    }                                                                                   \
    void momres_rule_advance_tail_##SUFFIX(T *x, T *v, const T *r, int64_t n,            \
                                           double gamma, double alpha, int threads) {  \
        PARALLEL(n, threads, rule_advance_tail_##SUFFIX##_range(x, v, r, lo, hi,          \
                                                                (T)gamma, (T)alpha));  \
    }                                                                                   \
    /* Its inverse for v, given the branch r at the rebuilt x, with the cotangent that     \
     * ReLU hands the branch: c = (r + x > 0 ? b : 0). */                                \
    CLONES static void rule_rebuild_tail_##SUFFIX##_range(                              \
        T *restrict v, const T *restrict r, const T *restrict x, const T *restrict b,   \
        T *restrict c, int64_t lo, int64_t hi, T gamma, T alpha) {                      \
        for (int64_t j = lo; j < hi; j++) {                                            \
            T s = r[j] + x[j];                                                          \
            v[j] = FMA(RELU(T, s) - x[j], -alpha, v[j]) / gamma;                        \
            c[j] = s > 0 ? b[j] : (T)0;                                                 \
        }                                                                               \
    }                                                                                   \
    void momres_rule_rebuild_tail_##SUFFIX(T *v, const T *r, const T *x, const T *b, T *c, \
                                           int64_t n, double gamma, double alpha,      \
                                           int threads) {                              \
        PARALLEL(n, threads, rule_rebuild_tail_##SUFFIX##_range(v, r, x, b, c, lo, hi,    \
                                                                (T)gamma, (T)alpha));  \
    }                                                                                   \
    /* Its inverse for v, in place: v <- (v - alpha*g) / gamma; with x (else NULL), g is  \
     * y - x, given y. */                                                               \
    CLONES static void rule_rebuild_##SUFFIX##_range(                                   \
        T *restrict v, const T *restrict g, const T *restrict x, int64_t lo, int64_t hi, \
        T gamma, T alpha) {                                                             \
        for (int64_t j = lo; j < hi; j++)                                              \
            v[j] = FMA(x ? g[j] - x[j] : g[j], -alpha, v[j]) / gamma;                   \
    }                                                                                   \
    void momres_rule_rebuild_##SUFFIX(T *v, const T *g, const T *x, int64_t n,           \
                                      double gamma, double alpha, int threads) {       \
        PARALLEL(n, threads, rule_rebuild_##SUFFIX##_range(v, g, x, lo, hi, (T)gamma,     \
                                                           (T)alpha));                 \
    }                                                                                   \
    /* The memory-free backward's gradients after a block's vector-Jacobian product j,    \
     * given b = dL/dx' + dL/dv': dL/dx <- dL/dx' + alpha*(j - b) (j alone for a residual   \
     * branch; (j + c) - b for a block ending in relu(r + x) whose branch's product j was   \
     * taken with c, its skip's share), dL/dv = gamma*b written over b. */                 \
    CLONES static void rule_grads_##SUFFIX##_range(                                     \
        T *restrict ax, T *restrict b, const T *restrict grad, const T *restrict c,     \
        int64_t lo, int64_t hi, T gamma, T alpha, int residual) {                      \
        if (residual) {                                                                 \
            for (int64_t j = lo; j < hi; j++) {                                        \
                ax[j] = FMA(grad[j], alpha, ax[j]);                                     \
                b[j] = b[j] * gamma;                                                    \
            }                                                                           \
        } else if (c) {                                                                 \
            for (int64_t j = lo; j < hi; j++) {                                        \
                ax[j] = FMA((grad[j] + c[j]) - b[j], alpha, ax[j]);                     \
                b[j] = b[j] * gamma;                                                    \
            }                                                                           \
        } else {                                                                        \
            for (int64_t j = lo; j < hi; j++) {                                        \
                ax[j] = FMA(grad[j] - b[j], alpha, ax[j]);                              \
                b[j] = b[j] * gamma;                                                    \
            }                                                                           \
        }                                                                               \
    }                                                                                   \
    void momres_rule_grads_##SUFFIX(T *ax, T *b, const T *grad, const T *c, int64_t n,   \
                                    double gamma, double alpha, int residual,          \
                                    int threads) {                                     \
        PARALLEL(n, threads, rule_grads_##SUFFIX##_range(ax, b, grad, c, lo, hi, (T)gamma, \
                                                         (T)alpha, residual));         \
    }                                                                                   \
    /* RuleStep's backward: b = a_x + a_v; dy = alpha*b; dv = gamma*b; dx = a_x - dy (a   \
     * block with its own skip) or a_x itself (a residual branch: not written). */       \
    CLONES static void rule_backward_##SUFFIX##_range(                                  \
        const T *restrict ax, const T *restrict av, T *restrict dx, T *restrict dv,      \
        T *restrict dy, int64_t lo, int64_t hi, T gamma, T alpha, int residual) {      \
        for (int64_t j = lo; j < hi; j++) {                                            \
            T b = ax[j] + av[j], d = b * alpha;                                         \
            dy[j] = d;                                                                  \
            dv[j] = b * gamma;                                                          \
            if (!residual)                                                              \
                dx[j] = ax[j] - d;                                                      \
        }                                                                               \
    }                                                                                   \
    void momres_rule_backward_##SUFFIX(const T *ax, const T *av, T *dx, T *dv, T *dy,    \
                                       int64_t n, double gamma, double alpha, int residual, \
                                       int threads) {                                  \
        PARALLEL(n, threads, rule_backward_##SUFFIX##_range(ax, av, dx, dv, dy, lo, hi,  \
                                                            (T)gamma, (T)alpha, residual)); \
    }                                                                                   \
    /* A block ending in relu(r + x), given its branch r: the block's own add and ReLU     \
     * taken in the rule's pass (y = relu(r + x) as torch rounds it, NaN and -0 kept; g =   \
     * y - x), and m = (r + x > 0), where ReLU passes gradients, written for the backward.  \
     * vo may be v itself (a velocity of the rule's own). */                             \
    CLONES static void rule_tail_##SUFFIX##_range(                                      \
        const T *restrict x, const T *v, const T *restrict r, T *restrict xo, T *vo,     \
        uint8_t *restrict m, int64_t lo, int64_t hi, T gamma, T alpha) {                \
        for (int64_t j = lo; j < hi; j++) {                                            \
            T s = r[j] + x[j];                                                          \
            T w = FMA(RELU(T, s) - x[j], alpha, v[j] * gamma);                          \
            m[j] = s > 0;                                                               \
            vo[j] = w;                                                                  \
            xo[j] = x[j] + w;                                                           \
        }                                                                               \
    }                                                                                   \
    void momres_rule_tail_##SUFFIX(const T *x, const T *v, const T *r, T *xo, T *vo,     \
                                   uint8_t *m, int64_t n, double gamma, double alpha,  \
                                   int threads) {                                      \
        PARALLEL(n, threads, rule_tail_##SUFFIX##_range(x, v, r, xo, vo, m, lo, hi,      \
                                                        (T)gamma, (T)alpha));          \
    }                                                                                   \
    /* Its backward: b = a_x + a_v; d = alpha*b; dv = gamma*b; through the ReLU where m,   \
     * dr = d and dx = a_x (the skip's share and the rule's cancel), elsewhere dr = 0 and   \
     * dx = a_x - d.  Either of a_x and a_v may be NULL: no gradient, zero. */            \
    CLONES static void rule_tail_backward_##SUFFIX##_range(                             \
        const T *restrict ax, const T *restrict av, const uint8_t *restrict m,          \
        T *restrict dx, T *restrict dv, T *restrict dr, int64_t lo, int64_t hi, T gamma, \
        T alpha) {                                                                      \
        for (int64_t j = lo; j < hi; j++) {                                            \
            T a = ax ? ax[j] : (T)0, b = !av ? a : !ax ? av[j] : a + av[j], d = b * alpha; \
            dv[j] = b * gamma;                                                          \
            dr[j] = m[j] ? d : (T)0;                                                    \
            dx[j] = m[j] ? a : a - d;                                                   \
        }                                                                               \
    }                                                                                   \
    void momres_rule_tail_backward_##SUFFIX(const T *ax, const T *av, const uint8_t *m,  \
                                            T *dx, T *dv, T *dr, int64_t n, double gamma, \
                                            double alpha, int threads) {               \
        PARALLEL(n, threads, rule_tail_backward_##SUFFIX##_range(ax, av, m, dx, dv, dr,  \
                                                                 lo, hi, (T)gamma,     \
                                                                 (T)alpha));           \
    }

RULE(f32, float, fmaf)
RULE(f64, double, fma)
