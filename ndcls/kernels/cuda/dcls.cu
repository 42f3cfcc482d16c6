// DCLS construction (forward) and gradient (backward) kernels for the "cupy" backend.
//
// Templates over the storage type T (float, double, ndcls::f16), the number M of learned
// axes, the interpolation KIND and the index type I (int or long long); everything else
// (batch, dense and element counts, sizes, strides, tile span, group width) is a kernel
// argument, so a new layer shape reuses the compiled specialisation.
//
// Arrays are the canonical C-contiguous forms of ndcls._registry:
//   weight (B, D, C); positions, sigma (M, B, D, C); kernel and grad_kernel (B, block).
// `layout` (a Layout<I>, passed by value: no device table, no host-to-device copy, so a launch
// can be captured in a CUDA graph) holds the M learned sizes and strides (element strides inside
// a block of prod(sizes) cells) and the sizes and strides of the N - M dense axes, from which
// each element's dense offset is computed.
//
// Threads work in groups of `group` lanes (a power of two <= 32, inside one warp): a group
// takes one element (b, d, c) at a time, writes its 1-D profiles over the support into a
// per-group shared-memory scratch (sum(learned_sizes) values per profile), then its lanes
// split the product of the supports between them.
#include "dcls_element.cuh"

namespace ndcls {

// Largest N (ndcls._spec.MAX_DIMS).
#define NDCLS_MAX_DIMS 8

// Kernel layout, by value. Entries past M (learned) or n_dense_axes (dense) are unused.
template <typename I>
struct Layout {
    I sizes[NDCLS_MAX_DIMS];          // learned sizes, row j of positions
    I strides[NDCLS_MAX_DIMS];        // learned strides
    I dense_sizes[NDCLS_MAX_DIMS];    // dense axes, in kernel axis order
    I dense_strides[NDCLS_MAX_DIMS];
    I n_dense_axes;
};

// Offset inside a batch block of the cell at dense index d (C order over the dense axes),
// learned coordinates 0. Unrolled over NDCLS_MAX_DIMS so that the struct is indexed statically.
template <typename I>
__device__ __forceinline__ I dense_offset(const Layout<I>& layout, I d) {
    I offset = 0;
#pragma unroll
    for (int kk = 0; kk < NDCLS_MAX_DIMS; ++kk) {
        const int k = NDCLS_MAX_DIMS - 1 - kk;
        if (k < layout.n_dense_axes) {
            const I size = layout.dense_sizes[k];
            offset += (d % size) * layout.dense_strides[k];
            d /= size;
        }
    }
    return offset;
}

struct Group {
    int lane;       // lane inside the group
    int id;         // group index inside the block
    int count;      // groups per block
    unsigned mask;  // warp lanes of this group, for __syncwarp and shuffles
};

__device__ __forceinline__ Group make_group(int group) {
    Group g;
    const int tid = threadIdx.x;
    g.lane = tid & (group - 1);
    g.id = tid / group;
    g.count = blockDim.x / group;
    const int first_lane = (tid & 31) & ~(group - 1);
    g.mask = group == 32 ? 0xffffffffu : ((1u << group) - 1u) << first_lane;
    return g;
}

// One element's rows: position, width, support [lo, lo + width) and where its profile
// starts in the group's scratch.
template <typename A, int M>
struct Element {
    A p[M];
    A s[M];
    A floor_p[M];
    int lo[M];
    int width[M];
    int off[M];
    int length;  // sum of the widths: the scratch used
};

// cpu._profiles, first half: validity of every row, then the supports; returns the status.
template <int KIND, typename T, typename A, typename I, int M>
__device__ __forceinline__ int load_element(const T* positions, const T* sigma, I e, I n_elements,
                                            const I* sizes, Element<A, M>& el) {
    bool valid = true;
#pragma unroll
    for (int j = 0; j < M; ++j) {
        el.p[j] = Scalar<T>::load(positions[j * n_elements + e]);
        el.s[j] = KIND == BILINEAR ? A(0) : Scalar<T>::load(sigma[j * n_elements + e]);
        valid = valid && element_valid<KIND>(el.p[j], el.s[j]);
    }
    if (!valid) return INVALID;
    int length = 0;
    bool empty = false;
#pragma unroll
    for (int j = 0; j < M; ++j) {
        int hi;
        support<KIND>(el.p[j], el.s[j], (long long)sizes[j], el.lo[j], hi);
        el.width[j] = hi - el.lo[j];
        el.off[j] = length;
        el.floor_p[j] = floor(el.p[j]);
        length += el.width[j];
        empty = empty || el.width[j] <= 0;
    }
    el.length = length;
    return empty ? EMPTY : OK;
}

// _element.fill_profile for every row, the lanes of a group sharing the cells.
template <int KIND, bool WITH_GRAD, typename A, int M>
__device__ __forceinline__ void fill_profiles(const Element<A, M>& el, const Group& g, int group, A* a, A* da_dp,
                                              A* da_ds) {
    for (int t = g.lane; t < el.length; t += group) {
        int j = 0;
#pragma unroll
        for (int k = 1; k < M; ++k) {
            if (t >= el.off[k]) j = k;
        }
        A d_p, d_s;
        a[t] = profile<KIND>(el.p[j], el.s[j], el.floor_p[j], el.lo[j] + (t - el.off[j]), d_p, d_s);
        if (WITH_GRAD) {
            da_dp[t] = d_p;
            da_ds[t] = d_s;
        }
    }
}

// _element.normalise_profile for every row, the lanes sharing the cells as in fill_profiles:
// a becomes n = a / sum_a, the derivative rows da - n * sum(da) (gauss: in the pivoted form,
// from gauss_pivots). The caller synchronises the group before (the sums read every cell) and after.
template <int KIND, bool WITH_GRAD, typename A, int M>
__device__ __forceinline__ void normalise_profiles(const Element<A, M>& el, const Group& g, int group, A* a, A* da_dp,
                                                   A* da_ds, const A* sum_a, const A* sum_dp, const A* sum_ds,
                                                   const A* pivot, const A* corr_p, const A* corr_s) {
    for (int t = g.lane; t < el.length; t += group) {
        int j = 0;
#pragma unroll
        for (int k = 1; k < M; ++k) {
            if (t >= el.off[k]) j = k;
        }
        const A value = a[t];
        if (WITH_GRAD && KIND == GAUSS) {
            if (value > A(0)) {  // a = 0 (underflow) also guards against (x - m) / s = inf
                const A x = A(el.lo[j] + (t - el.off[j]));
                const A dl = (x - pivot[j]) / el.s[j];
                da_dp[t] = value * (dl - corr_p[j]);
                da_ds[t] = value * (dl * ((x - el.p[j]) / el.s[j] + (pivot[j] - el.p[j]) / el.s[j]) - corr_s[j]);
            }
        } else if (WITH_GRAD) {
            da_dp[t] -= value / sum_a[j] * sum_dp[j];
            da_ds[t] -= value / sum_a[j] * sum_ds[j];
        }
        a[t] = value / sum_a[j];
    }
}

// Gauss rows (_element.normalise_profile): the pivot m (the cell nearest p, holding the most
// mass) and sum_k n_k (l_k - l_m) for l = u and u**2 (s * the scores). Reads the unnormalised
// profile; every lane computes them.
template <typename A, int M>
__device__ __forceinline__ void gauss_pivots(const Element<A, M>& el, const A* a, const A* sum_a, A* pivot, A* corr_p,
                                             A* corr_s) {
#pragma unroll
    for (int j = 0; j < M; ++j) {
        const A m = floor(fmin(fmax(el.p[j] + A(0.5), A(el.lo[j])), A(el.lo[j] + el.width[j] - 1)));
        const A u_m = (m - el.p[j]) / el.s[j];
        A cp = A(0), cs = A(0);
        for (int k = 0; k < el.width[j]; ++k) {
            const A value = a[el.off[j] + k];
            if (value > A(0)) {
                const A x = A(el.lo[j] + k);
                const A dl = (x - m) / el.s[j];
                cp += value * dl;
                cs += value * (dl * ((x - el.p[j]) / el.s[j] + u_m));
            }
        }
        pivot[j] = m;
        corr_p[j] = cp / sum_a[j];
        corr_s[j] = cs / sum_a[j];
    }
}

template <typename A>
__device__ __forceinline__ A row_sum(const A* x, int n) {
    A total = A(0);
    for (int i = 0; i < n; ++i) total += x[i];
    return total;
}

// Cell q of the product of the supports (last row fastest) -> index k[j] inside each support.
template <typename I, int M>
__device__ __forceinline__ void unravel(I q, const int* width, int* k) {
#pragma unroll
    for (int j = M - 1; j >= 0; --j) {
        k[j] = int(q % width[j]);
        q /= width[j];
    }
}

// Forward. Block r builds the flat range [r * span, r * span + span) of K (B * block cells) in
// shared memory: zeroed, every element that can touch it adds its cells with shared-memory
// atomics, then the range is written out once, coalesced. The host makes span a whole number
// of batch kernels when one fits in shared memory; otherwise span < block and each batch kernel
// is built in several ranges, each re-deriving the profiles of the elements whose bounding box
// meets it (the fallback; see docs/gpu-cupy.md).
// Shared memory: span accumulators, then one profile scratch of plen values per group.
template <typename T, int M, int KIND, typename I>
__global__ void construct_kernel(const T* __restrict__ weight, const T* __restrict__ positions,
                                 const T* __restrict__ sigma, T* __restrict__ kernel, const Layout<I> layout,
                                 I n_batch, I n_dense, I count, I block, I span, int plen, int group) {
    typedef typename Scalar<T>::acc A;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    A* tile = reinterpret_cast<A*>(smem_raw);
    const Group g = make_group(group);
    A* a = tile + span + (I)g.id * plen;

    const I* sizes = layout.sizes;
    const I* strides = layout.strides;
    const I per_batch = n_dense * count;
    const I n_elements = n_batch * per_batch;
    const I total = n_batch * block;
    const I n_ranges = (total + span - 1) / span;

    for (I range = blockIdx.x; range < n_ranges; range += gridDim.x) {
        const I r0 = range * span;
        const I extent = min(span, total - r0);
        for (I i = threadIdx.x; i < extent; i += blockDim.x) tile[i] = A(0);
        __syncthreads();

        const I e_end = ((r0 + extent - 1) / block + 1) * per_batch;
        for (I e = (r0 / block) * per_batch + g.id; e < e_end; e += g.count) {
            Element<A, M> el;
            if (load_element<KIND>(positions, sigma, e, n_elements, sizes, el) != OK) continue;
            const I b = e / per_batch;
            const I d = (e - b * per_batch) / count;
            const I base = b * block + dense_offset(layout, d) - r0;  // cell (lo...) is base + sum lo*stride
            I first = base, last = base;
#pragma unroll
            for (int j = 0; j < M; ++j) {
                first += (I)el.lo[j] * strides[j];
                last += (I)(el.lo[j] + el.width[j] - 1) * strides[j];
            }
            if (last < 0 || first >= extent) continue;  // its bounding box misses this range

            fill_profiles<KIND, false>(el, g, group, a, a, a);
            __syncwarp(g.mask);
            A scale = Scalar<T>::load(weight[e]);
            if (KIND != BILINEAR) {  // K = w * (S / Z) * prod of the normalised rows, S = prod of the sums
                A sums[M], total = A(1);
#pragma unroll
                for (int j = 0; j < M; ++j) {
                    sums[j] = row_sum(a + el.off[j], el.width[j]);
                    total *= sums[j];
                }
                __syncwarp(g.mask);
                bool empty = false;
#pragma unroll
                for (int j = 0; j < M; ++j) empty = empty || sums[j] == A(0);
                if (empty) continue;  // no mass in the kernel (the whole group skips)
                normalise_profiles<KIND, false>(el, g, group, a, a, a, sums, sums, sums, sums, sums, sums);
                __syncwarp(g.mask);
                A r, unused;
                normaliser_ratios(total, r, unused);
                scale *= r;
            }

            I cells = 1;
#pragma unroll
            for (int j = 0; j < M; ++j) cells *= el.width[j];
            for (I q = g.lane; q < cells; q += group) {
                int k[M];
                unravel<I, M>(q, el.width, k);
                A value = scale;
                I cell = base;
#pragma unroll
                for (int j = 0; j < M; ++j) {
                    value *= a[el.off[j] + k[j]];
                    cell += (I)(el.lo[j] + k[j]) * strides[j];
                }
                if (cell >= 0 && cell < extent) atomicAdd(tile + cell, value);
            }
            __syncwarp(g.mask);  // the scratch is rewritten by the next element
        }
        __syncthreads();
        for (I i = threadIdx.x; i < extent; i += blockDim.x) kernel[r0 + i] = Scalar<T>::store(tile[i]);
        __syncthreads();
    }
}

// Backward: a gather, one group per element (b, d, c); every gradient value is written once by
// lane 0 after a fixed-order shuffle reduction, so results are deterministic. Invalid elements
// get NaN, elements with an empty support get 0 (as cpu.py). For bilinear grad_sigma is not
// written (the host passes a placeholder pointer).
// Shared memory: per group, three profile scratches (a, da/dp, da/ds) of plen values.
template <typename T, int M, int KIND, typename I>
__global__ void construct_grad_kernel(const T* __restrict__ grad_kernel, const T* __restrict__ weight,
                                      const T* __restrict__ positions, const T* __restrict__ sigma,
                                      T* __restrict__ grad_weight, T* __restrict__ grad_positions,
                                      T* __restrict__ grad_sigma, const Layout<I> layout, I n_batch, I n_dense,
                                      I count, I block, int plen, int group) {
    typedef typename Scalar<T>::acc A;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const Group g = make_group(group);
    A* a = reinterpret_cast<A*>(smem_raw) + (I)g.id * 3 * plen;
    A* da_dp = a + plen;
    A* da_ds = a + 2 * plen;

    const I* sizes = layout.sizes;
    const I* strides = layout.strides;
    const I per_batch = n_dense * count;
    const I n_elements = n_batch * per_batch;

    for (I e = (I)blockIdx.x * g.count + g.id; e < n_elements; e += (I)gridDim.x * g.count) {
        Element<A, M> el;
        const int status = load_element<KIND>(positions, sigma, e, n_elements, sizes, el);
        if (status != OK) {
            if (g.lane == 0) {
                const T fill = Scalar<T>::store(status == INVALID ? A(__int_as_float(0x7fc00000)) : A(0));
                grad_weight[e] = fill;
#pragma unroll
                for (int j = 0; j < M; ++j) {
                    grad_positions[j * n_elements + e] = fill;
                    if (KIND != BILINEAR) grad_sigma[j * n_elements + e] = fill;
                }
            }
            continue;
        }
        fill_profiles<KIND, true>(el, g, group, a, da_dp, da_ds);
        __syncwarp(g.mask);
        A sum_a[M], sum_dp[M], sum_ds[M];
        A total = A(1);  // S = prod of the row sums
        bool empty = false;
#pragma unroll
        for (int j = 0; j < M; ++j) {
            sum_a[j] = row_sum(a + el.off[j], el.width[j]);
            sum_dp[j] = row_sum(da_dp + el.off[j], el.width[j]);
            sum_ds[j] = row_sum(da_ds + el.off[j], el.width[j]);
            total *= sum_a[j];
            empty = empty || sum_a[j] == A(0);
        }
        A pivot[M], corr_p[M], corr_s[M];
        if (KIND == GAUSS && !empty) gauss_pivots(el, a, sum_a, pivot, corr_p, corr_s);
        if (KIND != BILINEAR) {  // normalised rows and centred derivative rows (cpu.py, _element.py)
            __syncwarp(g.mask);  // every lane has read the whole profile
            if (empty) {  // no mass in the kernel: zero gradients, as an empty support
                if (g.lane == 0) {
                    grad_weight[e] = Scalar<T>::store(A(0));
#pragma unroll
                    for (int j = 0; j < M; ++j) {
                        grad_positions[j * n_elements + e] = Scalar<T>::store(A(0));
                        grad_sigma[j * n_elements + e] = Scalar<T>::store(A(0));
                    }
                }
                continue;
            }
            normalise_profiles<KIND, true>(el, g, group, a, da_dp, da_ds, sum_a, sum_dp, sum_ds, pivot, corr_p, corr_s);
            __syncwarp(g.mask);
        }

        const I b = e / per_batch;
        const I d = (e - b * per_batch) / count;
        const I base = b * block + dense_offset(layout, d);
        I cells = 1;
#pragma unroll
        for (int j = 0; j < M; ++j) cells *= el.width[j];
        // t: sum of G * prod a; u[j], v[j]: sums of G * d(prod a)/dp_j and d(prod a)/ds_j
        A t = A(0), u[M], v[M];
#pragma unroll
        for (int j = 0; j < M; ++j) u[j] = v[j] = A(0);
        for (I q = g.lane; q < cells; q += group) {
            int k[M];
            unravel<I, M>(q, el.width, k);
            I cell = base;
            A before[M + 1];  // before[j] = prod of a over rows < j
            before[0] = A(1);
#pragma unroll
            for (int j = 0; j < M; ++j) {
                cell += (I)(el.lo[j] + k[j]) * strides[j];
                before[j + 1] = before[j] * a[el.off[j] + k[j]];
            }
            const A gk = Scalar<T>::load(grad_kernel[cell]);
            t += gk * before[M];
            A after = gk;  // gk * prod of a over rows > j
#pragma unroll
            for (int j = M - 1; j >= 0; --j) {
                const int at = el.off[j] + k[j];
                u[j] += after * before[j] * da_dp[at];
                if (KIND != BILINEAR) v[j] += after * before[j] * da_ds[at];
                after *= a[at];
            }
        }
        for (int o = group >> 1; o > 0; o >>= 1) {
            t += __shfl_xor_sync(g.mask, t, o);
#pragma unroll
            for (int j = 0; j < M; ++j) {
                u[j] += __shfl_xor_sync(g.mask, u[j], o);
                if (KIND != BILINEAR) v[j] += __shfl_xor_sync(g.mask, v[j], o);
            }
        }
        if (g.lane == 0) {
            const A w = Scalar<T>::load(weight[e]);
            if (KIND == BILINEAR) {
                grad_weight[e] = Scalar<T>::store(t);
#pragma unroll
                for (int j = 0; j < M; ++j) grad_positions[j * n_elements + e] = Scalar<T>::store(w * u[j]);
            } else {  // t = sum of G * n; u[j], v[j] with the centred derivative rows
                A r, q;
                normaliser_ratios(total, r, q);
                grad_weight[e] = Scalar<T>::store(r * t);
#pragma unroll
                for (int j = 0; j < M; ++j) {
                    A others = A(1);
#pragma unroll
                    for (int k = 0; k < M; ++k) {
                        if (k != j) others *= sum_a[k];
                    }
                    const A scale = derivative_scale<KIND>(el.s[j]);
                    grad_positions[j * n_elements + e] =
                        Scalar<T>::store(normalised_gradient(w, t, u[j], sum_dp[j], sum_a[j], others, q, scale));
                    grad_sigma[j * n_elements + e] =
                        Scalar<T>::store(normalised_gradient(w, t, v[j], sum_ds[j], sum_a[j], others, q, scale));
                }
            }
        }
        __syncwarp(g.mask);  // the scratch is rewritten by the next element
    }
}

}  // namespace ndcls
