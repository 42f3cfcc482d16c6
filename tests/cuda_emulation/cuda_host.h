// Host emulation of the few CUDA features ndcls/kernels/cuda/dcls.cu uses, so that its kernels
// run on the CPU (one std::thread per CUDA thread, blocks one after another) in tests without a
// GPU. bfloat16 converts with integer code (dcls_element.cuh); the few PTX conversions the
// kernels use (float16 loads and stores) are rewritten by tests/_cuda_emulator.py into calls of
// emu::narrow / emu::widen below, which implement IEEE binary formats of any exponent and
// mantissa width with PTX's rounding modes (f16 is <5, 10>).
#pragma once
#define NDCLS_HOST_EMULATION 1
#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __align__(n) __attribute__((aligned(n)))
#define __shared__

using std::ceil;
using std::exp;
using std::fabs;
using std::floor;
using std::fmax;
using std::fmin;
using std::hypot;
using std::isfinite;
using std::max;
using std::min;

struct dim3_ {
    unsigned x = 1, y = 1, z = 1;
};
thread_local dim3_ threadIdx, blockIdx;
dim3_ blockDim, gridDim;

namespace ndcls {
alignas(16) unsigned char smem_raw[1 << 23];  // the block's dynamic shared memory
}

namespace emu {
std::barrier<>* block_barrier;
std::vector<std::unique_ptr<std::barrier<>>> group_barriers;  // one per group of lanes
double exchange[1024];                                        // shuffle slots, one per thread

inline std::barrier<>& group_of(unsigned mask) {
    return *group_barriers[threadIdx.x / std::popcount(mask)];
}

// A launch of grid_x * grid_y blocks of `threads` threads (blocks one after another; lanes in
// groups of `group` for __syncwarp and shuffles).
template <typename Kernel, typename... Args>
void launch_2d(Kernel kernel, int grid_x, int grid_y, int threads, int group, Args... args) {
    blockDim.x = threads;
    gridDim.x = grid_x;
    gridDim.y = grid_y;
    for (int by = 0; by < grid_y; ++by) {
        for (int bx = 0; bx < grid_x; ++bx) {
            std::barrier<> all(threads);
            block_barrier = &all;
            group_barriers.clear();
            for (int g = 0; g < threads / group; ++g) group_barriers.emplace_back(new std::barrier<>(group));
            std::memset(ndcls::smem_raw, 0xff, 1 << 16);  // shared memory starts as garbage (NaN)
            std::vector<std::thread> pool;
            for (int t = 0; t < threads; ++t) {
                pool.emplace_back([=] {
                    threadIdx.x = t;
                    blockIdx.x = bx;
                    blockIdx.y = by;
                    kernel(args...);
                });
            }
            for (auto& th : pool) th.join();
        }
    }
}

template <typename Kernel, typename... Args>
void launch(Kernel kernel, int grid, int threads, int group, Args... args) {
    launch_2d(kernel, grid, 1, threads, group, args...);
}
}  // namespace emu

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned mask) { emu::group_of(mask).arrive_and_wait(); }

template <typename A>
inline A __shfl_xor_sync(unsigned mask, A value, int lane_mask) {
    auto& barrier = emu::group_of(mask);
    emu::exchange[threadIdx.x] = double(value);
    barrier.arrive_and_wait();
    const A other = A(emu::exchange[threadIdx.x ^ lane_mask]);
    barrier.arrive_and_wait();
    return other;
}

template <typename A>
inline A atomicAdd(A* address, A value) {
    return std::atomic_ref<A>(*address).fetch_add(value);
}

inline float __int_as_float(int bits) {
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

// ---- bfloat16 support (ndcls::bf16 in dcls_element.cuh): bit casts of float ----------------
inline unsigned __float_as_uint(float x) {
    unsigned u;
    std::memcpy(&u, &x, sizeof u);
    return u;
}

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
// ---- end bfloat16 support --------------------------------------------------------------------

namespace emu {
// PTX rounding modifiers of cvt: to nearest even, toward zero, toward -inf, toward +inf.
enum class Round { rn, rz, rm, rp };

// float -> IEEE binary format with E exponent bits and MB mantissa bits (the raw bits), as PTX
// cvt.<R>.<format>.f32 does: correctly rounded in mode R, subnormals kept, overflow to inf or to
// the largest finite value as the mode says, NaN to a quiet NaN.
template <int E, int MB, Round R>
inline unsigned short narrow(float f) {
    constexpr int bias = (1 << (E - 1)) - 1;
    constexpr unsigned inf_bits = ((1u << E) - 1) << MB;
    const bool neg = std::signbit(f);
    const unsigned sign = neg ? 1u << (E + MB) : 0u;
    if (std::isnan(f)) return (unsigned short)(sign | inf_bits | (1u << (MB - 1)));
    const double v = std::fabs(double(f));
    const double largest = std::ldexp(2.0 - std::ldexp(1.0, -MB), bias);
    if (std::isinf(v)) return (unsigned short)(sign | inf_bits);
    int e;
    std::frexp(v, &e);  // v = fr * 2**e, fr in [0.5, 1): v in [2**(e-1), 2**e)
    const int exponent = std::max(e - 1, 1 - bias);  // below 2**(1 - bias): the subnormal spacing
    const double ulp = std::ldexp(1.0, exponent - MB);
    const double q = v / ulp;  // exact (a power of 2)
    double lo = std::floor(q);
    const double rem = q - lo;
    bool up = false;
    if (R == Round::rn) up = rem > 0.5 || (rem == 0.5 && std::fmod(lo, 2.0) == 1.0);
    if (R == Round::rp) up = rem > 0.0 && !neg;
    if (R == Round::rm) up = rem > 0.0 && neg;
    const double m = (up ? lo + 1.0 : lo) * ulp;
    if (m > largest) {
        const bool to_inf = R == Round::rn || (R == Round::rp && !neg) || (R == Round::rm && neg);
        return (unsigned short)(sign | (to_inf ? inf_bits : inf_bits - 1));
    }
    if (m < std::ldexp(1.0, 1 - bias)) return (unsigned short)(sign | unsigned(m / std::ldexp(1.0, 1 - bias - MB)));
    std::frexp(m, &e);
    const unsigned mant = unsigned((m / std::ldexp(1.0, e - 1) - 1.0) * double(1u << MB));
    return (unsigned short)(sign | unsigned(e - 1 + bias) << MB | mant);
}

// The raw bits of a binary format with E exponent and MB mantissa bits -> float (exact).
template <int E, int MB>
inline float widen(unsigned short bits) {
    constexpr int bias = (1 << (E - 1)) - 1;
    const bool neg = (bits >> (E + MB)) & 1u;
    const unsigned biased = (bits >> MB) & ((1u << E) - 1);
    const unsigned mant = bits & ((1u << MB) - 1);
    double v;
    if (biased == (1u << E) - 1) {
        v = mant ? std::nan("") : INFINITY;
    } else if (biased == 0) {
        v = std::ldexp(double(mant), 1 - bias - MB);
    } else {
        v = std::ldexp(1.0 + double(mant) / double(1u << MB), int(biased) - bias);
    }
    return float(neg ? -v : v);
}
}  // namespace emu
