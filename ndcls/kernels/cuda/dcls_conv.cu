// Direct DCLS convolution for the "cupy" backend (docs/conv.md, section "GPU").
//
// The dense kernel K (B = out_channels * group_in rows of `cells` values) is built by
// construct_kernel (dcls.cu); the convolution then visits only the cells the elements touch:
//   conv_mark_kernel     marks the support box of every element (bilinear 2 cells per learned
//                        axis, triangle its support, gauss its cut support) in a byte mask;
//   conv_compact_kernel  lists each row's marked cells in ascending order: n_taps[row],
//                        tap_cell[row, t] (flat cell of the row), tap_val[row, t] = K[row, cell];
//   conv_planes_kernel   the forward, out[n, o, y] = sum_i sum_t tap_val * x[n, g*I+i, y*stride + k_t - pad],
//                        and (TRANSPOSED) the input gradient, the transposed convolution over the same taps;
//   conv_grad_taps_kernel   dL/dK at the taps, a block per (row, chunk of batch x output cells)
//                        with a fixed-order tree reduction, one partial sum per chunk;
//   conv_scatter_kernel  dK[row, tap_cell] = sum of the partials in chunk order; the shared
//                        chain rule (construct_grad_kernel) then gives the element gradients.
// Buffer sizes follow from the shapes alone (no host synchronisation: CUDA-graph safe). Every
// output is written by one thread in a fixed order: results are deterministic. Templates over
// the storage type T, the number N of spatial axes and the index type I (int or long long).
#include "dcls.cu"

namespace ndcls {

// Convolution geometry, by value (every field of type I: no padding; NumPy twin in cupy_conv.py).
template <typename I>
struct ConvGeometry {
    I spatial[NDCLS_MAX_DIMS];      // input spatial sizes
    I out_spatial[NDCLS_MAX_DIMS];  // output spatial sizes
    I ksizes[NDCLS_MAX_DIMS];       // kernel sizes along all N axes
    I stride[NDCLS_MAX_DIMS];
    I pad[NDCLS_MAX_DIMS];          // zero padding before each axis
    I batch, in_channels, out_channels, group_in, group_out;
    I in_cells, out_cells, cells;   // prod(spatial), prod(out_spatial), prod(ksizes)
    I cap;                          // tap slots per row (<= cells)
};

// Flat index q over `sizes` (C order) -> coordinates.
template <int N, typename I>
__device__ __forceinline__ void unravel_cells(I q, const I* sizes, I* c) {
#pragma unroll
    for (int a = N - 1; a >= 0; --a) {
        c[a] = q % sizes[a];
        q /= sizes[a];
    }
}

// Marks the cells of every element's support box (learned rows: cut_support; dense axes: the
// element's own dense index). Invalid elements mark nothing. Several elements may mark a cell.
template <typename T, int M, int KIND, typename I>
__global__ void conv_mark_kernel(const T* __restrict__ positions, const T* __restrict__ sigma,
                                 unsigned char* __restrict__ mask, const Layout<I> layout, I n_batch, I n_dense,
                                 I count, I block, double radius) {
    typedef typename Scalar<T>::acc A;
    const I per_batch = n_dense * count;
    const I n_elements = n_batch * per_batch;
    for (I e = (I)blockIdx.x * blockDim.x + threadIdx.x; e < n_elements; e += (I)gridDim.x * blockDim.x) {
        A p[M], s[M];
        bool valid = true;
#pragma unroll
        for (int j = 0; j < M; ++j) {
            p[j] = Scalar<T>::load(positions[j * n_elements + e]);
            s[j] = KIND == BILINEAR ? A(0) : Scalar<T>::load(sigma[j * n_elements + e]);
            valid = valid && element_valid<KIND>(p[j], s[j]);
        }
        if (!valid) continue;
        int lo[M], width[M];
        I cells = 1;
#pragma unroll
        for (int j = 0; j < M; ++j) {
            int hi;
            cut_support<KIND>(p[j], s[j], (long long)layout.sizes[j], A(radius), lo[j], hi);
            width[j] = hi - lo[j];
            cells *= width[j] > 0 ? width[j] : 0;
        }
        const I b = e / per_batch;
        const I d = (e - b * per_batch) / count;
        const I base = b * block + dense_offset(layout, d);
        for (I q = 0; q < cells; ++q) {
            int k[M];
            unravel<I, M>(q, width, k);
            I cell = base;
#pragma unroll
            for (int j = 0; j < M; ++j) cell += (I)(lo[j] + k[j]) * layout.strides[j];
            mask[cell] = 1;
        }
    }
}

// One block per row: the marked cells in ascending order (at most `cap` of them), blockDim.x
// cells at a time, placed by a shared-memory prefix sum (Hillis-Steele). Shared memory:
// blockDim.x ints.
template <typename T, typename I>
__global__ void conv_compact_kernel(const T* __restrict__ kernel, const unsigned char* __restrict__ mask,
                                    I* __restrict__ n_taps, I* __restrict__ tap_cell,
                                    typename Scalar<T>::acc* __restrict__ tap_val, I n_rows, I cells, I cap) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    int* scan = reinterpret_cast<int*>(smem_raw);
    const int tid = threadIdx.x;
    for (I row = blockIdx.x; row < n_rows; row += gridDim.x) {
        I placed = 0;
        for (I c0 = 0; c0 < cells; c0 += blockDim.x) {
            const I c = c0 + tid;
            const int flag = c < cells && mask[row * cells + c] ? 1 : 0;
            scan[tid] = flag;
            __syncthreads();
            for (int step = 1; step < (int)blockDim.x; step *= 2) {
                const int add = tid >= step ? scan[tid - step] : 0;
                __syncthreads();
                scan[tid] += add;
                __syncthreads();
            }
            const I at = placed + scan[tid] - flag;
            if (flag && at < cap) {
                tap_cell[row * cap + at] = c;
                tap_val[row * cap + at] = Scalar<T>::load(kernel[row * cells + c]);
            }
            placed += scan[blockDim.x - 1];
            __syncthreads();  // scan is rewritten by the next chunk
        }
        if (tid == 0) n_taps[row] = min(placed, cap);
    }
}

// Input offset inside one (n, c) plane of output cell y shifted by kernel cell `cell`, or -1
// when that input cell lies in the zero padding.
template <int N, typename I>
__device__ __forceinline__ I input_offset(const ConvGeometry<I>& g, const I* y, I cell) {
    I k[N];
    unravel_cells<N>(cell, g.ksizes, k);
    I off = 0;
#pragma unroll
    for (int a = 0; a < N; ++a) {
        const I at = y[a] * g.stride[a] + k[a] - g.pad[a];
        if (at < 0 || at >= g.spatial[a]) return -1;
        off = off * g.spatial[a] + at;
    }
    return off;
}

// Forward (TRANSPOSED = false) and input gradient (TRANSPOSED = true), one destination plane at
// a time: blockIdx.y walks the planes (n, o) of `out` (forward) or (n, c) of grad_x, blockIdx.x
// tiles of the plane's cells, one cell per thread. The taps of the source rows (forward: pairs
// o * I + i, i < I; transposed: pairs o * I + i for the group's outputs o) are staged in shared
// memory, `rows` rows of at most `span` taps at a time (kernel coordinates and values), and
// every thread accumulates over them in order (row, tap): the forward reads
// src = x[n, g * I + i, y * stride + k - pad]; the transposed reads src = grad_out[n, o, y] for
// the y with y * stride = z + pad - k. Cells in the padding are skipped. Shared memory:
// rows * span * (N ints + one A) + rows ints (the host sizes the launch, cupy_conv.plan).
template <typename T, int N, typename I, bool TRANSPOSED>
__global__ void conv_planes_kernel(const T* __restrict__ src, const I* __restrict__ n_taps,
                                   const I* __restrict__ tap_cell, const typename Scalar<T>::acc* __restrict__ tap_val,
                                   T* __restrict__ dst, const ConvGeometry<I> g, int rows, int span) {
    typedef typename Scalar<T>::acc A;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    A* val = reinterpret_cast<A*>(smem_raw);
    int* coords = reinterpret_cast<int*>(val + rows * span);
    int* counts = coords + rows * span * N;
    const I dst_channels = TRANSPOSED ? g.in_channels : g.out_channels;
    const I dst_cells = TRANSPOSED ? g.in_cells : g.out_cells;
    const I src_channels = TRANSPOSED ? g.out_channels : g.in_channels;
    const I src_cells = TRANSPOSED ? g.out_cells : g.in_cells;
    const I* dst_sizes = TRANSPOSED ? g.spatial : g.out_spatial;
    const I* src_sizes = TRANSPOSED ? g.out_spatial : g.spatial;
    const I n_src = TRANSPOSED ? g.group_out : g.group_in;  // source rows per destination plane
    for (I plane = blockIdx.y; plane < g.batch * dst_channels; plane += gridDim.y) {
        const I n = plane / dst_channels;
        const I ch = plane - n * dst_channels;
        const I group = TRANSPOSED ? ch / g.group_in : ch / g.group_out;
        for (I first = (I)blockIdx.x * blockDim.x; first < dst_cells; first += (I)gridDim.x * blockDim.x) {
            const I q = first + threadIdx.x;
            const bool active = q < dst_cells;
            I y[N];
            unravel_cells<N>(active ? q : 0, dst_sizes, y);
            A acc = A(0);
            for (I r0 = 0; r0 < n_src; r0 += rows) {
                for (I t0 = 0; t0 < g.cap; t0 += span) {
                    __syncthreads();  // the previous stage has been read
                    for (int e = threadIdx.x; e < rows * span; e += blockDim.x) {
                        const I r = r0 + e / span;
                        const I t = t0 + e % span;
                        if (r >= n_src) continue;
                        const I row = TRANSPOSED ? (group * g.group_out + r) * g.group_in + (ch - group * g.group_in)
                                                 : ch * g.group_in + r;
                        if (t >= n_taps[row]) continue;
                        I k[N];
                        unravel_cells<N>(tap_cell[row * g.cap + t], g.ksizes, k);
#pragma unroll
                        for (int a = 0; a < N; ++a) coords[e * N + a] = int(k[a]);
                        val[e] = tap_val[row * g.cap + t];
                    }
                    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
                        I c = 0;
                        if (r0 + r < n_src) {
                            const I row = TRANSPOSED ? (group * g.group_out + r0 + r) * g.group_in + (ch - group * g.group_in)
                                                     : ch * g.group_in + r0 + r;
                            c = min(max(n_taps[row] - t0, (I)0), (I)span);
                        }
                        counts[r] = int(c);
                    }
                    __syncthreads();
                    if (!active) continue;
                    for (int r = 0; r < rows && r0 + r < n_src; ++r) {
                        const I src_ch = TRANSPOSED ? group * g.group_out + r0 + r : group * g.group_in + r0 + r;
                        const T* plane_src = src + (n * src_channels + src_ch) * src_cells;
                        for (int t = 0; t < counts[r]; ++t) {
                            const int e = r * span + t;
                            I off = 0;
                            bool inside = true;
#pragma unroll
                            for (int a = 0; a < N; ++a) {
                                I at;
                                if (TRANSPOSED) {
                                    const I num = y[a] + g.pad[a] - coords[e * N + a];
                                    at = num / g.stride[a];
                                    inside = inside && num >= 0 && at * g.stride[a] == num;
                                } else {
                                    at = y[a] * g.stride[a] + coords[e * N + a] - g.pad[a];
                                    inside = inside && at >= 0;
                                }
                                inside = inside && at < src_sizes[a];
                                off = off * src_sizes[a] + at;
                            }
                            if (inside) acc += val[e] * Scalar<T>::load(plane_src[off]);
                        }
                    }
                }
            }
            if (active) dst[plane * dst_cells + q] = Scalar<T>::store(acc);
        }
    }
}

// dL/dK at the taps of one row, over one chunk of the batch x output cells: block
// (row, chunk) = blockIdx.x / n_chunks, % n_chunks. Each thread sums a strided share, then a
// shared-memory tree gives the block's sum (fixed order), written to
// partial[(row * n_chunks + chunk) * cap + t]. Shared memory: blockDim.x values of A.
template <typename T, int N, typename I>
__global__ void conv_grad_taps_kernel(const T* __restrict__ grad_out, const T* __restrict__ x,
                                      const I* __restrict__ n_taps, const I* __restrict__ tap_cell,
                                      typename Scalar<T>::acc* __restrict__ partial, const ConvGeometry<I> g,
                                      I n_rows, I n_chunks) {
    typedef typename Scalar<T>::acc A;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    A* sums = reinterpret_cast<A*>(smem_raw);
    const I work = g.batch * g.out_cells;
    for (I blk = blockIdx.x; blk < n_rows * n_chunks; blk += gridDim.x) {
        const I row = blk / n_chunks;
        const I chunk = blk - row * n_chunks;
        const I o = row / g.group_in;
        const I c = (o / g.group_out) * g.group_in + (row - o * g.group_in);
        const I first = chunk * work / n_chunks;
        const I last = (chunk + 1) * work / n_chunks;
        const I taps = n_taps[row];
        for (I t = 0; t < taps; ++t) {
            const I cell = tap_cell[row * g.cap + t];
            A acc = A(0);
            for (I j = first + threadIdx.x; j < last; j += blockDim.x) {
                const I n = j / g.out_cells;
                const I y_flat = j - n * g.out_cells;
                I y[N];
                unravel_cells<N>(y_flat, g.out_spatial, y);
                const I off = input_offset<N>(g, y, cell);
                if (off >= 0) {
                    acc += Scalar<T>::load(grad_out[(n * g.out_channels + o) * g.out_cells + y_flat]) *
                           Scalar<T>::load(x[(n * g.in_channels + c) * g.in_cells + off]);
                }
            }
            sums[threadIdx.x] = acc;
            __syncthreads();
            for (int half = blockDim.x / 2; half > 0; half /= 2) {
                if ((int)threadIdx.x < half) sums[threadIdx.x] += sums[threadIdx.x + half];
                __syncthreads();
            }
            if (threadIdx.x == 0) partial[(row * n_chunks + chunk) * g.cap + t] = sums[0];
            __syncthreads();  // sums[0] is read before the next tap overwrites it
        }
    }
}

// dK[row, tap_cell[row, t]] = sum over chunks (in order) of the partials; dK is zero elsewhere
// (the host zeroes it). One thread per tap slot.
template <typename T, typename I>
__global__ void conv_scatter_kernel(const I* __restrict__ n_taps, const I* __restrict__ tap_cell,
                                    const typename Scalar<T>::acc* __restrict__ partial, T* __restrict__ grad_kernel,
                                    I n_rows, I cells, I cap, I n_chunks) {
    typedef typename Scalar<T>::acc A;
    for (I q = (I)blockIdx.x * blockDim.x + threadIdx.x; q < n_rows * cap; q += (I)gridDim.x * blockDim.x) {
        const I row = q / cap;
        const I t = q - row * cap;
        if (t >= n_taps[row]) continue;
        A total = A(0);
        for (I chunk = 0; chunk < n_chunks; ++chunk) total += partial[(row * n_chunks + chunk) * cap + t];
        grad_kernel[row * cells + tap_cell[q]] = Scalar<T>::store(total);
    }
}

}  // namespace ndcls
