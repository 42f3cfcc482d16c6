// Per-element 1-D profile math: a line-by-line CUDA transcription of ndcls/kernels/_element.py.
//
// Included by dcls.cu (the Python side inlines it, so CuPy's compile cache keys on the whole
// text). Needs nothing beyond what NVRTC provides: float16 is converted with PTX `cvt`.
#pragma once

namespace ndcls {

// Interpolation codes, as in _element.py.
enum { BILINEAR = 0, TRIANGLE = 1, GAUSS = 2 };

// Status of one element (as in cpu.py): skipped with NaN gradients, skipped with zero
// gradients (empty support), or computed.
enum { INVALID = 0, EMPTY = 1, OK = 2 };

// The normalisation epsilon of the reference implementation (ndcls._spec.EPS).
#define NDCLS_EPS 1e-7

// IEEE binary16 storage: the raw bits (CuPy float16 and torch.half share this layout).
struct f16 {
    unsigned short bits;
};

// Storage type T -> accumulation type A and the conversions between them.
template <typename T>
struct Scalar;

template <>
struct Scalar<float> {
    typedef float acc;
    static __device__ __forceinline__ float load(float x) { return x; }
    static __device__ __forceinline__ float store(float x) { return x; }
};

template <>
struct Scalar<double> {
    typedef double acc;
    static __device__ __forceinline__ double load(double x) { return x; }
    static __device__ __forceinline__ double store(double x) { return x; }
};

// ---- bfloat16 (storage only; arithmetic in float32) --------------------------------------
// The upper 16 bits of an IEEE binary32 (torch.bfloat16's layout; the array API hands its
// bits over as int16). Plain integer code, so the host emulation runs it as the GPU does.
struct bf16 {
    unsigned short bits;
};

template <>
struct Scalar<bf16> {
    typedef float acc;
    static __device__ __forceinline__ float load(bf16 x) { return __uint_as_float((unsigned)x.bits << 16); }
    // round to nearest, ties to even; NaN stays a (quiet) NaN of the same sign
    static __device__ __forceinline__ bf16 store(float x) {
        const unsigned u = __float_as_uint(x);
        bf16 h;
        if ((u & 0x7fffffffu) > 0x7f800000u) {
            h.bits = (unsigned short)((u >> 16) | 0x40u);
        } else {
            h.bits = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        }
        return h;
    }
};
// ---- end bfloat16 ---------------------------------------------------------------------------

#if defined(__CUDACC__) || defined(NDCLS_HOST_EMULATION)  // the emulation translates the PTX (tests/_cuda_emulator.py)
template <>
struct Scalar<f16> {
    typedef float acc;  // half inputs accumulate in float32
    static __device__ __forceinline__ float load(f16 x) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
        return f;
    }
    static __device__ __forceinline__ f16 store(float x) {
        f16 h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
        return h;
    }
};
#endif

// _element.element_valid: whether an element's position (and width, for normalised kinds)
// along one axis is usable.
template <int KIND, typename A>
__device__ __forceinline__ bool element_valid(A p, A s) {
    if (!isfinite(p)) return false;
    if (KIND != BILINEAR && !(isfinite(s) && s > A(0))) return false;
    return true;
}

// _element.support: half-open cell range [lo, hi) outside which the profile and its
// derivatives are 0. Assumes element_valid. The bounds are clamped to [0, size] as floats
// before any cast (p - s or p + s may be +-inf, never NaN); float(size) may round above size,
// so the cast goes through 64 bits and is clamped to size again.
template <int KIND, typename A>
__device__ __forceinline__ void support(A p, A s, long long size, int& lo, int& hi) {
    if (KIND == GAUSS) {
        lo = 0;
        hi = int(size);
        return;
    }
    A first, last;
    if (KIND == BILINEAR) {
        first = floor(p);
        last = first + A(1);
    } else {
        first = ceil(p - s);
        last = floor(p + s);
    }
    const A top = A(size);
    first = fmin(fmax(first, A(0)), top);
    last = fmin(fmax(last + A(1), A(0)), top);
    lo = int(min((long long)first, size));
    hi = int(min((long long)last, size));
}

// _element.cut_support: support() with the Gaussian cut at `radius` widths beyond the cell
// nearest p (hypot: no underflow for tiny widths); bilinear and triangle as support(). Clamps
// every bound as a float before the cast, so NaN-free infinities never become an index.
template <int KIND, typename A>
__device__ __forceinline__ void cut_support(A p, A s, long long size, A radius, int& lo, int& hi) {
    A first, last;
    if (KIND == BILINEAR) {
        first = floor(fmin(fmax(p, A(-2)), A(size) + A(1)));
        last = first + A(1);
    } else {
        A reach = s;
        if (KIND == GAUSS) {
            const A nearest = floor(fmin(fmax(p, A(0)), A(size) - A(1)) + A(0.5));
            const A gap = fabs(p - nearest);
            if (gap > A(40) * s) {
                lo = hi = 0;
                return;
            }
            reach = hypot(radius * s, gap);
        }
        first = ceil(fmin(fmax(p - reach, A(-2)), A(size) + A(1)));
        last = floor(fmin(fmax(p + reach, A(-2)), A(size) + A(1)));
    }
    const A top = A(size);
    first = fmin(fmax(first, A(0)), top);
    last = fmin(fmax(last + A(1), A(0)), top);
    lo = int(min((long long)first, size));
    hi = int(min((long long)last, size));
}

// One cell of _element.fill_profile: profile value at cell i, and its derivatives with
// respect to the position (d_p) and the width (d_s). i lies in the element's support.
template <int KIND, typename A>
__device__ __forceinline__ A profile(A p, A s, A floor_p, int i, A& d_p, A& d_s) {
    const A x = A(i);
    A value = A(0);
    d_p = A(0);
    d_s = A(0);
    if (KIND == BILINEAR) {
        const A r = p - floor_p;
        if (x == floor_p) {
            value = A(1) - r;
            d_p = A(-1);
        } else {
            value = r;
            d_p = A(1);
        }
    } else if (KIND == TRIANGLE) {
        const A dist = fabs(x - p);
        if (dist < s) {
            value = s - dist;
            d_s = A(1);
            if (x > p) {
                d_p = A(1);
            } else if (x < p) {
                d_p = A(-1);
            }
        }
    } else {
        const A u = (x - p) / s;
        value = exp(A(-0.5) * u * u);
        if (value > A(0)) {  // times s, as _element.fill_profile: bounded whatever s
            d_p = value * u;
            d_s = d_p * u;
        }
    }
    return value;
}

// _element.derivative_scale: what profile() multiplied the derivatives by.
template <int KIND, typename A>
__device__ __forceinline__ A derivative_scale(A s) {
    return KIND == GAUSS ? s : A(1);
}

// _element.normaliser_ratios: r = S / Z and q = eps / Z for Z = S + eps, S >= 0 (may be inf),
// without division by 0 or inf / inf.
template <typename A>
__device__ __forceinline__ void normaliser_ratios(A s, A& r, A& q) {
    if (s > A(1)) {
        const A e = A(NDCLS_EPS) / s;
        r = A(1) / (A(1) + e);
        q = e * r;
    } else {
        const A z = s + A(NDCLS_EPS);
        r = s / z;
        q = A(NDCLS_EPS) / z;
    }
}

// _element.normalised_gradient: w * O_j / Z * (u + q * t * d_sum) / scale, the gradient along
// one parameter of row j of a normalised element (normalised rows, centred derivative rows).
template <typename A>
__device__ __forceinline__ A normalised_gradient(A w, A t, A u, A d_sum, A s_row, A others, A q, A scale) {
    const A c = others > A(1) ? w / (s_row + A(NDCLS_EPS) / others) : w * others / (s_row * others + A(NDCLS_EPS));
    return c * (u + q * t * d_sum) / scale;
}

}  // namespace ndcls
