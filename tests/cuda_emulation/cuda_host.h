// Host emulation of the few CUDA features ndcls/kernels/cuda/dcls.cu uses, so that its kernels
// run on the CPU (one std::thread per CUDA thread, blocks one after another) in tests without a
// GPU. float32/float64 and bfloat16 (integer conversions); the float16 path converts with PTX.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
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

template <typename Kernel, typename... Args>
void launch(Kernel kernel, int grid, int threads, int group, Args... args) {
    blockDim.x = threads;
    gridDim.x = grid;
    for (int b = 0; b < grid; ++b) {
        std::barrier<> all(threads);
        block_barrier = &all;
        group_barriers.clear();
        for (int g = 0; g < threads / group; ++g) group_barriers.emplace_back(new std::barrier<>(group));
        std::memset(ndcls::smem_raw, 0xff, 1 << 16);  // shared memory starts as garbage (NaN)
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t) {
            pool.emplace_back([=] {
                threadIdx.x = t;
                blockIdx.x = b;
                kernel(args...);
            });
        }
        for (auto& th : pool) th.join();
    }
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
