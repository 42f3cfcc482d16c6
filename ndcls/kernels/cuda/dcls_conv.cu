// Direct DCLS convolution for the "cupy" backend (docs/conv.md, section "GPU").
//
// The kernel has B = out_channels * group_in rows of `cells` cells; the convolution visits only
// the cells the elements touch, without building the dense kernel K:
//   conv_mark_kernel     marks the support box of every element (bilinear 2 cells per learned
//                        axis, triangle its support, gauss its cut support) in a byte mask, and
//                        keeps each element's scale and row sums (its normalisation);
//   conv_compact_kernel  lists each row's marked cells in ascending order: n_taps[row],
//                        tap_cell[row, t] (flat cell of the row), tap_val[row, t] = K[row, cell],
//                        summed over the row's elements in their order (tap_value);
//   conv_planes_kernel   the forward, out[n, o, y] = sum_i sum_t tap_val * x[n, g*I+i, y*stride + k_t - pad],
//                        and (TRANSPOSED) the input gradient, the transposed convolution over the same
//                        taps; the source rows' taps are packed into shared memory, each block serves
//                        up to NDCLS_CONV_BATCH batch items with them;
//   conv_grad_taps_kernel   dL/dK at the taps, a block per (row, chunk of batch x output cells)
//                        with a fixed-order block sum (warp shuffles), one partial sum per chunk;
//   conv_scatter_kernel  dK[row, tap_cell] = sum of the partials in chunk order; the shared
//                        chain rule (construct_grad_kernel) then gives the element gradients.
// Buffer sizes follow from the shapes alone (no host synchronisation: CUDA-graph safe). No
// float atomics: every value is written by one thread in a fixed order, so results are bitwise
// reproducible. Templates over the storage type T, the number N of spatial axes (M learned, of
// interpolation KIND) and the index type I (int or long long).
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

// Batch items one block of conv_planes_kernel accumulates at once, in registers (the planner's
// cupy_conv.BATCH_PER_BLOCK).
#define NDCLS_CONV_BATCH 8

// Flat index 0 <= q < prod(sizes) (C order) -> coordinates (N - 1 divisions: none for N = 1).
template <int N, typename I>
__device__ __forceinline__ void unravel_cells(I q, const I* sizes, I* c) {
#pragma unroll
    for (int a = N - 1; a > 0; --a) {
        c[a] = q % sizes[a];
        q /= sizes[a];
    }
    c[0] = q;
}

// Inclusive prefix sum over the block of one int per thread (Hillis-Steele in `scan`, blockDim.x
// ints of shared memory): returns this thread's sum and leaves every thread's in `scan`. Called by
// every thread of the block; ends synchronised.
__device__ __forceinline__ int block_inclusive_scan(int* scan, int value) {
    const int tid = threadIdx.x;
    scan[tid] = value;
    __syncthreads();
    for (int step = 1; step < (int)blockDim.x; step *= 2) {
        const int add = tid >= step ? scan[tid - step] : 0;
        __syncthreads();
        scan[tid] += add;
        __syncthreads();
    }
    return scan[tid];
}

// Sum over the block of one value per thread, in a fixed order (butterflies within each warp,
// then over the warps' sums in warp 0): the total is returned to thread 0. blockDim.x is a
// multiple of 32; `sums` holds blockDim.x / 32 values of shared memory. Called by every thread
// of the block; ends synchronised, so `sums` may be reused at once.
template <typename A>
__device__ __forceinline__ A block_sum(A value, A* sums) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int o = 16; o > 0; o /= 2) value += __shfl_xor_sync(0xffffffffu, value, o);
    if (lane == 0) sums[warp] = value;
    __syncthreads();
    A total = A(0);
    if (warp == 0) {
        total = lane < (int)blockDim.x / 32 ? sums[lane] : A(0);
#pragma unroll
        for (int o = 16; o > 0; o /= 2) total += __shfl_xor_sync(0xffffffffu, total, o);
    }
    __syncthreads();
    return total;
}

// One thread per element: marks the cells of its support box (learned rows: cut_support; dense
// axes: the element's own dense index; invalid elements mark nothing, several elements may mark
// a cell) and writes what the compaction needs to evaluate its value at any cell, as the
// construction kernel would add it to K: `scale[e]` = w (bilinear) or w * S / Z (S the product
// of the row sums, Z = S + eps), 0 for an element the construction skips (invalid, empty
// support, a row of zero mass), and the row sums `row_sums[j * n_elements + e]` over the
// (uncut) support, summed in the construction's order.
template <typename T, int M, int KIND, typename I>
__global__ void conv_mark_kernel(const T* __restrict__ weight, const T* __restrict__ positions,
                                 const T* __restrict__ sigma, unsigned char* __restrict__ mask,
                                 typename Scalar<T>::acc* __restrict__ scale, typename Scalar<T>::acc* __restrict__ row_sums,
                                 const Layout<I> layout, I n_batch, I n_dense, I count, I block, double radius) {
    typedef typename Scalar<T>::acc A;
    const I per_batch = n_dense * count;
    const I n_elements = n_batch * per_batch;
    for (I e = (I)blockIdx.x * blockDim.x + threadIdx.x; e < n_elements; e += (I)gridDim.x * blockDim.x) {
        Element<A, M> el;
        const int status = load_element<KIND>(positions, sigma, e, n_elements, layout.sizes, el);
        scale[e] = A(0);
        if (status == INVALID) continue;
        int lo[M], width[M];
        I cells = 1;
#pragma unroll
        for (int j = 0; j < M; ++j) {
            int hi;
            cut_support<KIND>(el.p[j], el.s[j], (long long)layout.sizes[j], A(radius), lo[j], hi);
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
        if (status != OK) continue;  // an empty support: the construction adds nothing
        A w = Scalar<T>::load(weight[e]);
        if (KIND != BILINEAR) {  // the construction's row sums (fill_profiles, then row_sum)
            A total = A(1);
            bool empty = false;
#pragma unroll
            for (int j = 0; j < M; ++j) {
                A sum = A(0), unused_p, unused_s;
                for (int i = 0; i < el.width[j]; ++i)
                    sum += profile<KIND>(el.p[j], el.s[j], el.floor_p[j], el.lo[j] + i, unused_p, unused_s);
                row_sums[j * n_elements + e] = sum;
                total *= sum;
                empty = empty || sum == A(0);
            }
            if (empty) continue;
            A r, unused;
            normaliser_ratios(total, r, unused);
            w *= r;
        }
        scale[e] = w;
    }
}

// The value at kernel cell `cell` of row `row`: the contributions of the row's elements at that
// cell's dense index, added in element order (the construction kernel adds the same products,
// in an order its atomics choose).
template <typename T, int M, int KIND, typename I>
__device__ __forceinline__ typename Scalar<T>::acc tap_value(const T* positions, const T* sigma,
                                                             const typename Scalar<T>::acc* scale,
                                                             const typename Scalar<T>::acc* row_sums,
                                                             const Layout<I>& layout, I n_elements, I n_dense,
                                                             I count, I row, I cell) {
    typedef typename Scalar<T>::acc A;
    I d = 0;  // the dense index: C order over the dense axes
#pragma unroll
    for (int k = 0; k < NDCLS_MAX_DIMS; ++k) {
        if (k < layout.n_dense_axes) d = d * layout.dense_sizes[k] + (cell / layout.dense_strides[k]) % layout.dense_sizes[k];
    }
    int at[M];
#pragma unroll
    for (int j = 0; j < M; ++j) at[j] = int((cell / layout.strides[j]) % layout.sizes[j]);
    A total = A(0);
    const I first = (row * n_dense + d) * count;
    for (I e = first; e < first + count; ++e) {
        A value = scale[e];
        if (value == A(0)) continue;  // skipped by the construction, or a zero weight
        bool inside = true;
#pragma unroll
        for (int j = 0; j < M; ++j) {
            const A p = Scalar<T>::load(positions[j * n_elements + e]);
            const A s = KIND == BILINEAR ? A(0) : Scalar<T>::load(sigma[j * n_elements + e]);
            int lo, hi;
            support<KIND>(p, s, (long long)layout.sizes[j], lo, hi);
            inside = inside && lo <= at[j] && at[j] < hi;
            if (inside) {
                A unused_p, unused_s;
                const A a = profile<KIND>(p, s, floor(p), at[j], unused_p, unused_s);
                value *= KIND == BILINEAR ? a : a / row_sums[j * n_elements + e];
            }
        }
        if (inside) total += value;
    }
    return total;
}

// One block per row: the marked cells in ascending order (at most `cap` of them), blockDim.x
// cells at a time, placed by a block prefix sum, each with its value (tap_value). Shared
// memory: blockDim.x ints.
template <typename T, int M, int KIND, typename I>
__global__ void conv_compact_kernel(const T* __restrict__ positions, const T* __restrict__ sigma,
                                    const typename Scalar<T>::acc* __restrict__ scale,
                                    const typename Scalar<T>::acc* __restrict__ row_sums,
                                    const unsigned char* __restrict__ mask, I* __restrict__ n_taps,
                                    I* __restrict__ tap_cell, typename Scalar<T>::acc* __restrict__ tap_val,
                                    const Layout<I> layout, I n_rows, I n_dense, I count, I cells, I cap) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    int* scan = reinterpret_cast<int*>(smem_raw);
    const int tid = threadIdx.x;
    const I n_elements = n_rows * n_dense * count;
    for (I row = blockIdx.x; row < n_rows; row += gridDim.x) {
        I placed = 0;
        for (I c0 = 0; c0 < cells; c0 += blockDim.x) {
            const I c = c0 + tid;
            const int flag = c < cells && mask[row * cells + c] ? 1 : 0;
            const I at = placed + block_inclusive_scan(scan, flag) - flag;
            if (flag && at < cap) {
                tap_cell[row * cap + at] = c;
                tap_val[row * cap + at] =
                    tap_value<T, M, KIND, I>(positions, sigma, scale, row_sums, layout, n_elements, n_dense, count, row, c);
            }
            placed += scan[blockDim.x - 1];
            __syncthreads();  // scan is rewritten by the next chunk
        }
        if (tid == 0) n_taps[row] = min(placed, cap);
    }
}

// Forward (TRANSPOSED = false) and input gradient (TRANSPOSED = true). blockIdx.y walks the items
// (channel, batch chunk) of the destination, out[n, o] (forward) or grad_x[n, c], blockIdx.x the
// tiles of a plane's cells, one cell per thread; each thread accumulates the cell of up to
// `batch_per_block` (<= NDCLS_CONV_BATCH) batch items n0 + b in registers, so that the staged taps
// serve them all. The source rows of the channel (forward: pairs o * I + i, i < I; transposed:
// pairs o * I + i for the group's outputs o) have their taps packed into shared memory, stage
// after stage: a block prefix sum over the counts of the next blockDim.x rows (at most `span` taps
// of a row per pass over the rows, passes t0 = 0, span, ...) takes the rows that fit in `entries`
// slots, and the slots hold the taps' kernel coordinates and values. Every thread then sums in
// the fixed order (pass, row, tap): the forward reads x[n, g * I + i, y * stride + k - pad];
// the transposed reads grad_out[n, o, y] for the y with y * stride = z + pad - k. Cells in the
// padding are skipped. Shared memory: entries * (N ints + one A) + (blockDim.x + 1) ints (the host
// sizes the launch: cupy_conv.stage).
template <typename T, int N, typename I, bool TRANSPOSED>
__global__ void conv_planes_kernel(const T* __restrict__ src, const I* __restrict__ n_taps,
                                   const I* __restrict__ tap_cell, const typename Scalar<T>::acc* __restrict__ tap_val,
                                   T* __restrict__ dst, const ConvGeometry<I> g, int entries, int span,
                                   int batch_per_block) {
    typedef typename Scalar<T>::acc A;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    A* val = reinterpret_cast<A*>(smem_raw);
    int* coords = reinterpret_cast<int*>(val + entries);
    int* ends = coords + entries * N;      // inclusive end of each staged row's taps
    int* stage_rows = ends + blockDim.x;   // rows staged in this stage
    const I dst_channels = TRANSPOSED ? g.in_channels : g.out_channels;
    const I dst_cells = TRANSPOSED ? g.in_cells : g.out_cells;
    const I src_channels = TRANSPOSED ? g.out_channels : g.in_channels;
    const I src_cells = TRANSPOSED ? g.out_cells : g.in_cells;
    const I* dst_sizes = TRANSPOSED ? g.spatial : g.out_spatial;
    const I* src_sizes = TRANSPOSED ? g.out_spatial : g.spatial;
    const I n_src = TRANSPOSED ? g.group_out : g.group_in;  // source rows per destination channel
    const I src_batch_step = src_channels * src_cells;      // from batch item n to n + 1
    batch_per_block = min(batch_per_block, NDCLS_CONV_BATCH);  // the registers' sums
    span = min(span, entries);  // a row's pass always fits one stage: every stage takes a row
    const I chunks = (g.batch + batch_per_block - 1) / batch_per_block;
    for (I item = blockIdx.y; item < dst_channels * chunks; item += gridDim.y) {
        const I ch = item / chunks;
        const I n0 = (item - ch * chunks) * batch_per_block;
        const int nb = (int)min((I)batch_per_block, g.batch - n0);
        const I group = TRANSPOSED ? ch / g.group_in : ch / g.group_out;
        // the row holding the taps of source r (which reads source channel first_src_ch + r)
        auto row_of = [&](I r) -> I {
            return TRANSPOSED ? (group * g.group_out + r) * g.group_in + (ch - group * g.group_in) : ch * g.group_in + r;
        };
        const I first_src_ch = TRANSPOSED ? group * g.group_out : group * g.group_in;
        for (I first = (I)blockIdx.x * blockDim.x; first < dst_cells; first += (I)gridDim.x * blockDim.x) {
            const I q = first + threadIdx.x;
            const bool active = q < dst_cells;
            I y[N], base[N];
            unravel_cells<N>(active ? q : 0, dst_sizes, y);
#pragma unroll
            for (int a = 0; a < N; ++a) base[a] = TRANSPOSED ? y[a] + g.pad[a] : y[a] * g.stride[a] - g.pad[a];
            A acc[NDCLS_CONV_BATCH];
#pragma unroll
            for (int b = 0; b < NDCLS_CONV_BATCH; ++b) acc[b] = A(0);
            for (I t0 = 0; t0 < g.cap; t0 += span) {
                for (I r0 = 0; r0 < n_src;) {
                    const I r = r0 + threadIdx.x;
                    const int count = r < n_src ? (int)min(max(n_taps[row_of(r)] - t0, (I)0), (I)span) : 0;
                    __syncthreads();  // the previous stage has been read
                    const int end = block_inclusive_scan(ends, count);
                    // rows r0 .. r0 + taken - 1 fit (row r0 always does: span <= entries)
                    const bool fits = r < n_src && end <= entries;
                    const bool next_fits = threadIdx.x + 1 < blockDim.x && r + 1 < n_src && ends[threadIdx.x + 1] <= entries;
                    if (fits && !next_fits) *stage_rows = (int)threadIdx.x + 1;
                    __syncthreads();
                    const int taken = *stage_rows;
                    const int total = ends[taken - 1];
                    for (int e = threadIdx.x; e < total; e += blockDim.x) {
                        int lo = 0, hi = taken - 1;  // the staged row holding slot e: the first with ends > e
                        while (lo < hi) {
                            const int mid = (lo + hi) / 2;
                            if (ends[mid] > e) hi = mid; else lo = mid + 1;
                        }
                        const I slot = row_of(r0 + lo) * g.cap + t0 + (e - (lo > 0 ? ends[lo - 1] : 0));
                        I k[N];
                        unravel_cells<N>(tap_cell[slot], g.ksizes, k);
#pragma unroll
                        for (int a = 0; a < N; ++a) coords[e * N + a] = int(k[a]);
                        val[e] = tap_val[slot];
                    }
                    __syncthreads();
                    if (active) {
                        int e = 0;
                        for (int s = 0; s < taken; ++s) {
                            const T* plane_src = src + (n0 * src_channels + first_src_ch + r0 + s) * src_cells;
                            for (const int row_end = ends[s]; e < row_end; ++e) {
                                I off = 0;
                                bool inside = true;
#pragma unroll
                                for (int a = 0; a < N; ++a) {
                                    I at = base[a] + (TRANSPOSED ? -coords[e * N + a] : coords[e * N + a]);
                                    if (TRANSPOSED && g.stride[a] != 1) {  // y * stride = z + pad - k must divide
                                        const I num = at;
                                        at = num / g.stride[a];
                                        inside = inside && at * g.stride[a] == num;
                                    }
                                    inside = inside && at >= 0 && at < src_sizes[a];
                                    off = off * src_sizes[a] + at;
                                }
                                if (inside) {
                                    const A v = val[e];
#pragma unroll
                                    for (int b = 0; b < NDCLS_CONV_BATCH; ++b)
                                        if (b < nb) acc[b] += v * Scalar<T>::load(plane_src[b * src_batch_step + off]);
                                }
                            }
                        }
                    }
                    r0 += taken;
                }
            }
            if (active) {
#pragma unroll
                for (int b = 0; b < NDCLS_CONV_BATCH; ++b)
                    if (b < nb) dst[((n0 + b) * dst_channels + ch) * dst_cells + q] = Scalar<T>::store(acc[b]);
            }
        }
    }
}

// dL/dK at the taps of one row, over one chunk of the batch x output cells: block
// (row, chunk) = blockIdx.x / n_chunks, % n_chunks. For each tap, each thread sums a strided
// share (positions j = first + threadIdx.x + m * blockDim.x, walked as (n, y) without
// divisions), then block_sum gives the block's sum in a fixed order, written to
// partial[(row * n_chunks + chunk) * cap + t]. Shared memory: blockDim.x / 32 values of A.
template <typename T, int N, typename I>
__global__ void conv_grad_taps_kernel(const T* __restrict__ grad_out, const T* __restrict__ x,
                                      const I* __restrict__ n_taps, const I* __restrict__ tap_cell,
                                      typename Scalar<T>::acc* __restrict__ partial, const ConvGeometry<I> g,
                                      I n_rows, I n_chunks) {
    typedef typename Scalar<T>::acc A;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    A* sums = reinterpret_cast<A*>(smem_raw);
    const I work = g.batch * g.out_cells;
    const I jump_n = (I)blockDim.x / g.out_cells;  // a thread's step from j to j + blockDim.x, as (n, y)
    const I jump_y = (I)blockDim.x - jump_n * g.out_cells;
    const I gy_batch_step = g.out_channels * g.out_cells, x_batch_step = g.in_channels * g.in_cells;
    for (I blk = blockIdx.x; blk < n_rows * n_chunks; blk += gridDim.x) {
        const I row = blk / n_chunks;
        const I chunk = blk - row * n_chunks;
        const I o = row / g.group_in;
        const I c = (o / g.group_out) * g.group_in + (row - o * g.group_in);
        const I first = (I)((long long)chunk * work / n_chunks) + threadIdx.x;  // chunk * work may pass 2**31
        const I last = (I)((long long)(chunk + 1) * work / n_chunks);
        const I n_first = first / g.out_cells, y_first = first - n_first * g.out_cells;
        const T* gy_plane = grad_out + o * g.out_cells;
        const T* x_plane = x + c * g.in_cells;
        const I taps = n_taps[row];
        for (I t = 0; t < taps; ++t) {
            I shift[N];
            unravel_cells<N>(tap_cell[row * g.cap + t], g.ksizes, shift);
#pragma unroll
            for (int a = 0; a < N; ++a) shift[a] -= g.pad[a];
            A acc = A(0);
            I n = n_first, y_flat = y_first;
            for (I j = first; j < last; j += blockDim.x) {
                I y[N];
                unravel_cells<N>(y_flat, g.out_spatial, y);
                I off = 0;
                bool inside = true;
#pragma unroll
                for (int a = 0; a < N; ++a) {
                    const I at = y[a] * g.stride[a] + shift[a];
                    inside = inside && at >= 0 && at < g.spatial[a];
                    off = off * g.spatial[a] + at;
                }
                if (inside) {
                    acc += Scalar<T>::load(gy_plane[n * gy_batch_step + y_flat]) * Scalar<T>::load(x_plane[n * x_batch_step + off]);
                }
                n += jump_n;
                y_flat += jump_y;
                if (y_flat >= g.out_cells) {
                    y_flat -= g.out_cells;
                    ++n;
                }
            }
            const A total = block_sum(acc, sums);
            if (threadIdx.x == 0) partial[(row * n_chunks + chunk) * g.cap + t] = total;
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
