// Direct DCLS convolution for the "cupy" backend (docs/conv.md, section "GPU").
//
// The dense kernel K (B = out_channels * group_in rows of `cells` values) is built by
// construct_kernel (dcls.cu); the convolution then visits only the cells the elements touch:
//   conv_mark_kernel     marks the support box of every element (bilinear 2 cells per learned
//                        axis, triangle its support, gauss its cut support) in a byte mask;
//   conv_compact_kernel  lists each row's marked cells in ascending order: n_taps[row],
//                        tap_cell[row, t] (flat cell of the row), tap_val[row, t] = K[row, cell];
//   conv_forward_kernel  out[n, o, y] = sum_i sum_t tap_val * x[n, g*I+i, y*stride + k_t - pad];
//   conv_grad_input_kernel  the transposed convolution over the same taps;
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

// One thread per row: the marked cells in ascending order (at most `cap` of them).
template <typename T, typename I>
__global__ void conv_compact_kernel(const T* __restrict__ kernel, const unsigned char* __restrict__ mask,
                                    I* __restrict__ n_taps, I* __restrict__ tap_cell,
                                    typename Scalar<T>::acc* __restrict__ tap_val, I n_rows, I cells, I cap) {
    for (I row = (I)blockIdx.x * blockDim.x + threadIdx.x; row < n_rows; row += (I)gridDim.x * blockDim.x) {
        I n = 0;
        for (I c = 0; c < cells && n < cap; ++c) {
            if (mask[row * cells + c]) {
                tap_cell[row * cap + n] = c;
                tap_val[row * cap + n] = Scalar<T>::load(kernel[row * cells + c]);
                ++n;
            }
        }
        n_taps[row] = n;
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

// One thread per output value, accumulating over (input channel of the group, tap) in order.
template <typename T, int N, typename I>
__global__ void conv_forward_kernel(const T* __restrict__ x, const I* __restrict__ n_taps,
                                    const I* __restrict__ tap_cell, const typename Scalar<T>::acc* __restrict__ tap_val,
                                    T* __restrict__ out, const ConvGeometry<I> g) {
    typedef typename Scalar<T>::acc A;
    const I total = g.batch * g.out_channels * g.out_cells;
    for (I q = (I)blockIdx.x * blockDim.x + threadIdx.x; q < total; q += (I)gridDim.x * blockDim.x) {
        const I y_flat = q % g.out_cells;
        const I o = (q / g.out_cells) % g.out_channels;
        const I n = q / (g.out_cells * g.out_channels);
        I y[N];
        unravel_cells<N>(y_flat, g.out_spatial, y);
        const I group = o / g.group_out;
        A acc = A(0);
        for (I i = 0; i < g.group_in; ++i) {
            const I row = o * g.group_in + i;
            const T* plane = x + (n * g.in_channels + group * g.group_in + i) * g.in_cells;
            const I taps = n_taps[row];
            for (I t = 0; t < taps; ++t) {
                const I off = input_offset<N>(g, y, tap_cell[row * g.cap + t]);
                if (off >= 0) acc += tap_val[row * g.cap + t] * Scalar<T>::load(plane[off]);
            }
        }
        out[q] = Scalar<T>::store(acc);
    }
}

// One thread per input value: the output cells y with y * stride + k_t - pad = z, over the
// group's output channels and the taps of their rows, in order.
template <typename T, int N, typename I>
__global__ void conv_grad_input_kernel(const T* __restrict__ grad_out, const I* __restrict__ n_taps,
                                       const I* __restrict__ tap_cell,
                                       const typename Scalar<T>::acc* __restrict__ tap_val, T* __restrict__ grad_x,
                                       const ConvGeometry<I> g) {
    typedef typename Scalar<T>::acc A;
    const I total = g.batch * g.in_channels * g.in_cells;
    for (I q = (I)blockIdx.x * blockDim.x + threadIdx.x; q < total; q += (I)gridDim.x * blockDim.x) {
        const I z_flat = q % g.in_cells;
        const I c = (q / g.in_cells) % g.in_channels;
        const I n = q / (g.in_cells * g.in_channels);
        I z[N];
        unravel_cells<N>(z_flat, g.spatial, z);
        const I group = c / g.group_in;
        const I i = c - group * g.group_in;
        A acc = A(0);
        for (I oo = 0; oo < g.group_out; ++oo) {
            const I o = group * g.group_out + oo;
            const I row = o * g.group_in + i;
            const T* plane = grad_out + (n * g.out_channels + o) * g.out_cells;
            const I taps = n_taps[row];
            for (I t = 0; t < taps; ++t) {
                I k[N];
                unravel_cells<N>(tap_cell[row * g.cap + t], g.ksizes, k);
                I off = 0;
                bool inside = true;
#pragma unroll
                for (int a = 0; a < N; ++a) {
                    const I num = z[a] + g.pad[a] - k[a];
                    const I at = num / g.stride[a];
                    inside = inside && num >= 0 && at * g.stride[a] == num && at < g.out_spatial[a];
                    off = off * g.out_spatial[a] + at;
                }
                if (inside) acc += tap_val[row * g.cap + t] * Scalar<T>::load(plane[off]);
            }
        }
        grad_x[q] = Scalar<T>::store(acc);
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
