// Per-channel kernel machinery of the CUDA BatchNorm(+ReLU) ops: 16-byte vector access, a
// one-launch deterministic per-channel reduction and a per-channel elementwise map. The ops
// (conv_bn_relu_kernel.cu) only supply what is computed per value and per channel.
//
// Tensors are (N, C, H, W), stored NCHW or NHWC (BnShape), with fewer than 2^31 elements.
//
// Vectors. One access reads or writes V values (16 bytes: 8 half/bfloat16, 4 float, 2 double).
// A vector must stay inside one channel's plane (NCHW: HW % V == 0) or one pixel's channels
// (NHWC: C % V == 0) and every pointer must be 16-byte aligned; otherwise the host launches the
// same kernels with V = 1 (vectorizable()). V divides the extent, so there is never a tail.
//
// Reductions (channel_reduce_kernel) take one launch. The grid is (channel tiles, splits) and a
// block of kThreads threads is (channel groups, rows): NHWC blocks cover up to 32 groups of L = V
// adjacent channels (one vector per row), NCHW blocks one channel (256 rows of vectors). Each
// block reduces one split of the rows into a partial per channel and writes it to a staging
// buffer; the last block of a tile to finish (an atomic counter per tile, zeroed by one memset
// before the launch) merges the partials of all splits in a fixed order: split s goes to thread
// row s % rows in increasing s, then the rows merge by a fixed tree. Which block finishes last
// does not change a bit of the result, so it is deterministic. With one split the block writes
// the result itself (no staging, no memset).
//
// Elementwise maps (channel_map_kernel): each block first computes every channel's coefficients
// (K values, e.g. mean, scale, shift) into shared memory, so no value needs a per-element rsqrt
// or division; then a grid-stride loop over vectors.
//
// Grids: a reduction gets at least two waves of blocks (a wave: as many as the GPU runs at once,
// from the occupancy calculator) wherever every thread still sums at least kMinRowsPerThread
// rows; an elementwise map gets two waves, or one vector per thread when there are fewer.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAMacros.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "common/bn_relu_args.h"

namespace fastunet {
namespace cuda_channel {

constexpr int kThreads = 256;
constexpr int kWaves = 2;
constexpr int kMinRowsPerThread = 8;
constexpr int kMaxSplits = 1024;
constexpr size_t kMaxSharedCoeffBytes = 32 << 10;  // larger tables go to global memory

template <typename T>
constexpr int kVec = 16 / int(sizeof(T));

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <int V, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& value) {
  *reinterpret_cast<Pack<T, V>*>(p) = value;
}

// Whether the V = kVec<scalar_t> kernels may run: vectors stay in one plane / pixel, and all
// pointers are 16-byte aligned.
template <typename scalar_t>
bool vectorizable(const BnShape& s, std::initializer_list<const void*> pointers) {
  if ((s.nhwc ? s.c : s.hw) % kVec<scalar_t> != 0) return false;
  return std::all_of(pointers.begin(), pointers.end(), [](const void* p) {
    return reinterpret_cast<uintptr_t>(p) % 16 == 0;
  });
}

// Calls f(std::integral_constant<int, V>{}, std::integral_constant<bool, kNhwc>{}) for the
// layout of s and the widest vector it allows.
template <typename scalar_t, typename F>
void dispatch_vector_layout(const BnShape& s, bool vector, F&& f) {
  using VecW = std::integral_constant<int, kVec<scalar_t>>;
  using One = std::integral_constant<int, 1>;
  using Nhwc = std::true_type;
  using Nchw = std::false_type;
  if (s.nhwc) {
    vector ? f(VecW{}, Nhwc{}) : f(One{}, Nhwc{});
  } else {
    vector ? f(VecW{}, Nchw{}) : f(One{}, Nchw{});
  }
}

inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Blocks of kThreads threads that the GPU runs at once (one wave) for a kernel.
template <typename Kernel>
int64_t blocks_per_wave(Kernel kernel, size_t shared_bytes) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads,
                                                               shared_bytes));
  return int64_t(std::max(per_sm, 1)) * sm_count();
}

// blocks_per_wave per device, computed on first use there (GPUs of one machine may differ in SM
// count and occupancy); 0 = not yet known.
using WaveCache = std::array<std::atomic<int64_t>, C10_COMPILE_TIME_MAX_GPUS>;

template <typename Kernel>
int64_t cached_blocks_per_wave(WaveCache& cache, Kernel kernel, size_t shared_bytes) {
  auto& cached = cache[c10::cuda::current_device()];
  int64_t wave = cached.load(std::memory_order_relaxed);
  if (wave == 0) {
    wave = blocks_per_wave(kernel, shared_bytes);
    cached.store(wave, std::memory_order_relaxed);
  }
  return wave;
}

// Channel of element e (< 2^31) of an NCHW or NHWC tensor, by multiply-shift division.
struct ChannelOf {
  at::cuda::detail::IntDivider<unsigned int> hw, c;
  ChannelOf(const BnShape& s)
      : hw(static_cast<unsigned int>(std::max<int64_t>(s.hw, 1))),
        c(static_cast<unsigned int>(std::max<int64_t>(s.c, 1))) {}
  template <bool kNhwc>
  __device__ __forceinline__ unsigned int get(unsigned int e) const {
    return kNhwc ? c.mod(e) : c.mod(hw.div(e));
  }
};

// ---------------------------------------------------------------------------------------------
// Reductions
//
// What the blocks of a reduction exchange about L channels: two values per channel (StatsOp:
// mean and M2; GradSumsOp: the two sums) and the count of values they summarise. Staged as two
// (splits x C) arrays of acc_t; the count of a split follows from its size.
template <typename acc_t, int L>
struct Partial {
  acc_t a[L], b[L];
  int64_t n;

  // Nothing summarised yet: the identity of both ops' merges.
  __device__ static Partial empty() {
    Partial p;
    p.n = 0;
    for (int l = 0; l < L; ++l) p.a[l] = p.b[l] = acc_t(0);
    return p;
  }
};

// An Op of lane count L (channels per thread) provides: acc_t; State = Partial<acc_t, L>;
// Thread (a thread's running sums); start(c0) -> Thread; add<V>(Thread&, element offset) of
// V values at that offset (value j belongs to lane j % L); state(Thread) -> State;
// merge(State&, const State&), with State::empty() its identity; finish(c0, State) (writes
// the outputs).

struct ReduceGeometry {
  int64_t channels;   // C
  int64_t units;      // per channel: rows (NHWC) or V-vectors (NCHW) to reduce
  int64_t per_split;  // units per split (the last split may have fewer)
  int64_t hw;         // NCHW: plane size
  at::cuda::detail::IntDivider<unsigned int> hw_div;  // NCHW: element -> (image, plane offset)
};

// Element offset of reduction unit u of the thread's first channel c0.
template <bool kNhwc, int V>
__device__ __forceinline__ int64_t unit_offset(const ReduceGeometry& g, int64_t u, int64_t c0) {
  if constexpr (kNhwc) {
    return u * g.channels + c0;
  } else {
    const unsigned int e = static_cast<unsigned int>(u) * V;
    const unsigned int n = g.hw_div.div(e);
    return (int64_t(n) * g.channels + c0) * g.hw + (e - n * static_cast<unsigned int>(g.hw));
  }
}

// Merges the States of the block's rows into row 0 (thread (tx, 0) holds its groups' result).
template <class Op, class State>
__device__ __forceinline__ void merge_rows(const Op& op, State* shared, const State& mine) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  shared[tid] = mine;
  __syncthreads();
  for (int stride = blockDim.y / 2; stride > 0; stride >>= 1) {
    if (int(threadIdx.y) < stride) {
      State a = shared[tid];
      op.merge(a, shared[tid + stride * blockDim.x]);
      shared[tid] = a;
    }
    __syncthreads();
  }
}

template <class Op, int V, bool kNhwc>
__global__ void __launch_bounds__(kThreads)
    channel_reduce_kernel(Op op, ReduceGeometry g, typename Op::acc_t* __restrict__ stage,
                          int* __restrict__ semaphores) {
  using State = typename Op::State;
  constexpr int64_t kValuesPerUnit = kNhwc ? 1 : V;  // values of one channel per unit
  __shared__ State shared[kThreads];
  __shared__ bool last_block;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c0 = kNhwc ? (int64_t(blockIdx.x) * blockDim.x + tx) * Op::kLanes
                           : int64_t(blockIdx.x);
  const bool active = c0 < g.channels;
  const int64_t begin = int64_t(blockIdx.y) * g.per_split;
  const int64_t end = begin + g.per_split < g.units ? begin + g.per_split : g.units;

  State mine = State::empty();
  if (active) {
    auto t = op.start(c0);
    for (int64_t u = begin + ty; u < end; u += blockDim.y)
      op.template add<V>(t, unit_offset<kNhwc, V>(g, u, c0));
    mine = op.state(t);
  }
  merge_rows(op, shared, mine);
  if (gridDim.y == 1) {
    if (ty == 0 && active) op.finish(c0, shared[tx]);
    return;
  }
  const int64_t stride = int64_t(gridDim.y) * g.channels;  // one staging array
  if (ty == 0 && active) {
    const int64_t at = int64_t(blockIdx.y) * g.channels + c0;
    for (int l = 0; l < Op::kLanes; ++l) {
      stage[at + l] = shared[tx].a[l];
      stage[stride + at + l] = shared[tx].b[l];
    }
    __threadfence();  // the partial is visible on the device before the counter moves
  }
  __syncthreads();
  if (tx == 0 && ty == 0)
    last_block = atomicAdd(semaphores + blockIdx.x, 1) == int(gridDim.y) - 1;
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  State merged = State::empty();
  if (active) {
    for (int64_t s = ty; s < gridDim.y; s += blockDim.y) {
      const int64_t s_begin = s * g.per_split;
      const int64_t s_end = s_begin + g.per_split < g.units ? s_begin + g.per_split : g.units;
      State part;
      for (int l = 0; l < Op::kLanes; ++l) {  // L2 reads: written by other blocks
        part.a[l] = __ldcg(stage + s * g.channels + c0 + l);
        part.b[l] = __ldcg(stage + stride + s * g.channels + c0 + l);
      }
      part.n = (s_end - s_begin) * kValuesPerUnit;
      op.merge(merged, part);
    }
  }
  merge_rows(op, shared, merged);
  if (ty == 0 && active) op.finish(c0, shared[tx]);
}

// Launches the reduction of `op` over the tensor of shape s (current stream and device).
template <int V, bool kNhwc, class Op>
void launch_channel_reduce(Op op, const BnShape& s, const at::TensorOptions& options) {
  using acc_t = typename Op::acc_t;
  constexpr int L = Op::kLanes;
  static_assert(L == (kNhwc ? V : 1), "NHWC threads own V channels, NCHW threads one");
  auto kernel = channel_reduce_kernel<Op, V, kNhwc>;
  static WaveCache waves{};
  const int64_t wave = cached_blocks_per_wave(waves, kernel, 0);
  ReduceGeometry g{s.c, kNhwc ? s.count() : s.count() / V, 0, s.hw,
                   at::cuda::detail::IntDivider<unsigned int>(
                       static_cast<unsigned int>(std::max<int64_t>(s.hw, 1)))};
  // Block shape: NHWC (groups of L channels, rows), NCHW (1, kThreads rows).
  int tx = 1;
  if (kNhwc) {
    const int64_t groups = s.c / L;
    while (tx < 32 && tx < groups) tx *= 2;
  }
  const int ty = kThreads / tx;
  const int64_t tiles = kNhwc ? (s.c / L + tx - 1) / tx : s.c;
  const int64_t want = (kWaves * wave + tiles - 1) / tiles;
  const int64_t most = std::max<int64_t>(1, g.units / (int64_t(ty) * kMinRowsPerThread));
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>({want, most, kMaxSplits}));
  g.per_split = (g.units + splits - 1) / splits;
  splits = (g.units + g.per_split - 1) / g.per_split;  // no empty split
  at::Tensor scratch;
  acc_t* stage = nullptr;
  int* semaphores = nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  if (splits > 1) {
    const int64_t stage_bytes = (2 * splits * s.c * int64_t(sizeof(acc_t)) + 15) / 16 * 16;
    scratch = at::empty({stage_bytes + tiles * int64_t(sizeof(int))},
                        options.dtype(at::kByte));
    stage = reinterpret_cast<acc_t*>(scratch.data_ptr());
    semaphores = reinterpret_cast<int*>(scratch.data_ptr<uint8_t>() + stage_bytes);
    C10_CUDA_CHECK(cudaMemsetAsync(semaphores, 0, tiles * sizeof(int), stream));
  }
  const dim3 grid(static_cast<unsigned int>(tiles), static_cast<unsigned int>(splits));
  kernel<<<grid, dim3(tx, ty), 0, stream>>>(op, g, stage, semaphores);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// Elementwise maps
//
// An Op derives from ChannelMap (its types, inputs and output; out may be in[0]) and provides
// coefficients(c, coeff_t* k) (the K coefficients of channel c) and value(const coeff_t* k,
// a, b) -> the output value from the inputs' values (b: a's when there is one input).
template <typename scalar_type, typename opmath_t, int kCoefficients, int kInputCount>
struct ChannelMap {
  using scalar_t = scalar_type;
  using coeff_t = opmath_t;
  static constexpr int K = kCoefficients, kInputs = kInputCount;
  const scalar_t* in[kInputCount];
  scalar_t* out;
};

template <class Op>
__global__ void channel_coeff_kernel(Op op, int64_t channels, typename Op::coeff_t* table) {
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < channels;
       c += int64_t(gridDim.x) * blockDim.x)
    op.coefficients(c, table + c * Op::K);
}

template <class Op, int V, bool kNhwc>
__global__ void __launch_bounds__(kThreads)
    channel_map_kernel(Op op, ChannelOf channel_of, int64_t channels, unsigned int vectors,
                       const typename Op::coeff_t* __restrict__ table) {
  using coeff_t = typename Op::coeff_t;
  using scalar_t = typename Op::scalar_t;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const coeff_t* coeff = table;
  if (table == nullptr) {  // the whole table fits in shared memory (host's choice)
    coeff_t* own = reinterpret_cast<coeff_t*>(shared_bytes);
    for (int64_t c = threadIdx.x; c < channels; c += blockDim.x)
      op.coefficients(c, own + c * Op::K);
    __syncthreads();
    coeff = own;
  }
  for (unsigned int v = blockIdx.x * blockDim.x + threadIdx.x; v < vectors;
       v += blockDim.x * gridDim.x) {
    const unsigned int e = v * V;
    const unsigned int c = channel_of.template get<kNhwc>(e);
    const Pack<scalar_t, V> a = load_pack<V>(op.in[0] + e);
    Pack<scalar_t, V> b;
    if constexpr (Op::kInputs == 2) b = load_pack<V>(op.in[1] + e);
    Pack<scalar_t, V> out;
#pragma unroll
    for (int j = 0; j < V; ++j)
      out.v[j] = op.value(coeff + (kNhwc ? c + j : c) * Op::K, a.v[j],
                          Op::kInputs == 2 ? b.v[j] : a.v[j]);
    store_pack<V>(op.out + e, out);
  }
}

// Launches the map of `op` over all s.numel() elements (current stream and device).
template <int V, bool kNhwc, class Op>
void launch_channel_map(const Op& op, const BnShape& s, const at::TensorOptions& options) {
  using coeff_t = typename Op::coeff_t;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t vectors = s.numel() / V;
  size_t shared = size_t(s.c) * Op::K * sizeof(coeff_t);
  at::Tensor table;
  if (shared > kMaxSharedCoeffBytes) {
    table = at::empty({s.c * Op::K}, options.dtype(c10::CppTypeToScalarType<coeff_t>::value));
    const int blocks = static_cast<int>(std::min<int64_t>((s.c + kThreads - 1) / kThreads, 1024));
    channel_coeff_kernel<Op><<<blocks, kThreads, 0, stream>>>(op, s.c, table.data_ptr<coeff_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    shared = 0;
  }
  auto kernel = channel_map_kernel<Op, V, kNhwc>;
  // Waves depend on the shared memory per block: cached per 4 KiB step of it.
  static std::array<WaveCache, kMaxSharedCoeffBytes / 4096 + 1> waves{};
  const int64_t wave = cached_blocks_per_wave(waves[(shared + 4095) / 4096], kernel,
                                              (shared + 4095) / 4096 * 4096);
  const int64_t blocks = std::min<int64_t>((vectors + kThreads - 1) / kThreads, kWaves * wave);
  kernel<<<static_cast<unsigned int>(blocks), kThreads, shared, stream>>>(
      op, ChannelOf(s), s.c, static_cast<unsigned int>(vectors),
      table.defined() ? table.data_ptr<coeff_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda_channel
}  // namespace fastunet
