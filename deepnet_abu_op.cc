// Fused activation kernels, CPU: the Adaptive Blending Unit of the blend5 set
// (relu, elu, tanh, swish, identity) and the scaled relu of 1_relu.
//
//   y = w0 relu(x) + w1 elu(x) + w2 tanh(x) + w3 x sigmoid(beta x) + w4 x
//
// DeepnetAbuForward computes y in one pass over x. DeepnetAbuBackward recomputes the
// functions from x (nothing is stored between the passes) and returns, in one pass over
// (x, dy), dx plus the reductions dL/dw_i = sum dy f_i(x) and dL/dbeta. Per element it
// needs two exponentials, both of non-positive arguments so nothing overflows for large |x|:
// one polynomial gives e = exp(-|x|) and m = expm1(-|x|), from which come elu's negative
// branch and its slope, and tanh(|x|) = -m (2 + m) / (2 + 2m + m^2) without cancellation
// near 0; u = exp(-|beta x|) gives the sigmoid. tanh and the sigmoid share one division.
// DeepnetScaledRelu / DeepnetScaledReluGrad do the same for y = w relu(x).
// float runs on packs of values as wide as the target's vector registers (GCC/clang vector
// extensions: 16 with AVX-512, 8 with AVX2, 4 with SSE/NEON), double element by element with <cmath>.
// Sums are taken per fixed block of elements and added in block order, so results do not
// depend on the number of threads. Each op writes into its input's buffer (y into x's, dx into
// dy's) when TensorFlow hands it over, i.e. when nothing else reads that input: no fresh memory
// for the OS to fault in, which on 2 cores cost ABU steps more than the functions themselves; so
// every loop reads an element's inputs before it writes its output. deepnet_network.py builds this
// file on first use and reports when it cannot (the plain composition of TF ops is then used).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace deepnet_abu {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

constexpr int kWeights = 5;
constexpr int kSums = kWeights + 1;  // the five blend weights and beta

// ---------------------------------------------------------------- packs of values

#define DEEPNET_INLINE inline __attribute__((always_inline))

// Packs per loop step: one pack's chain of dependent operations is long, so the loops give the CPU
// several independent packs to overlap.
constexpr int kUnroll = 8, kUnrollBackward = 4;

// The target's vector width: wider packs are split into several registers and run far slower (AVX2: ~7x).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX2__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;  // SSE2, NEON
#endif
typedef float FloatPack __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IntPack __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint32_t UIntPack __attribute__((vector_size(kLanes * sizeof(uint32_t))));

// What one step of the loops below works on: a pack of floats, or one double.
template <typename T>
struct Pack;
template <>
struct Pack<float> {
  using type = FloatPack;
  static constexpr int64_t size = kLanes;
};
template <>
struct Pack<double> {
  using type = double;
  static constexpr int64_t size = 1;
};

// count <= the pack's size values from p; missing lanes are 0 (so they add 0 to every sum).
template <typename P, typename T>
DEEPNET_INLINE P Load(const T* p, int64_t count) {
  P v{};
  std::memcpy(&v, p, count * sizeof(T));
  return v;
}

template <typename P, typename T>
DEEPNET_INLINE void Store(T* p, const P& v, int64_t count) {
  std::memcpy(p, &v, count * sizeof(T));
}

DEEPNET_INLINE FloatPack Splat(float c) { return FloatPack{} + c; }
DEEPNET_INLINE FloatPack Select(IntPack mask, FloatPack a, FloatPack b) { return mask ? a : b; }

// The lanes' sum in lane order, in double.
inline double LaneSum(const FloatPack& v) {
  double s = 0.0;
  for (int lane = 0; lane < kLanes; ++lane) s += v[lane];
  return s;
}
inline double LaneSum(double v) { return v; }

// ---------------------------------------------------------------- the five functions

// exp(v) for v <= 0 from one polynomial: v = n ln2 + r with |r| <= ln2/2, q = expm1(r) = r + r^2 P(r) with
// P of degree 4 fitted to expm1's relative error on that interval (8.9e-8 in float arithmetic, the same as its
// Taylor series to r^7), then exp(v) = 2^n (1 + q) and expm1(v) = 2^n q + (2^n - 1), which keeps expm1's
// relative accuracy near 0. v is clamped at -87 (beyond float's normal range), so exp(v) is 1.6e-38 there and
// expm1(v) is -1; ExpExactZero gives 0 below it. n is taken from the bits of t = n + 1.5 * 2^23 (t lies in
// [2^23, 2^24), where the bits count in ones): t's bits shifted by 23 are n's, mod 2^32, and adding 127's makes 2^n.
struct ExpParts {
  FloatPack scale, q;  // exp(v) = scale (1 + q)
};

DEEPNET_INLINE ExpParts ExpOfNonPositive(FloatPack v) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;  // ln2 = hi + lo
  const float kRound = 12582912.0f;                              // 1.5 * 2^23: adding it rounds to an integer
  const FloatPack vc = Select(v < -87.0f, Splat(-87.0f), v);
  const FloatPack t = vc * kLog2e + kRound;
  const FloatPack n = t - kRound;
  const FloatPack r = (vc - n * kLn2Hi) - n * kLn2Lo;
  FloatPack p = Splat(1.391566505e-3f);
  p = p * r + 8.366091702e-3f;
  p = p * r + 4.166668720e-2f;
  p = p * r + 1.666654689e-1f;
  p = p * r + 4.999999976e-1f;
  return {(FloatPack)(((UIntPack)t << 23) + 0x3f800000u), (p * r) * r + r};
}

// exp(v) for v <= 0, exactly 0 below -87.
DEEPNET_INLINE FloatPack ExpExactZero(FloatPack v) {
  const ExpParts x = ExpOfNonPositive(v);
  return Select(v < -87.0f, Splat(0.0f), x.scale * x.q + x.scale);
}

DEEPNET_INLINE FloatPack NegativeAbs(FloatPack v) { return (FloatPack)((UIntPack)v | 0x80000000u); }

// The five functions at one point (or pack of points) and what their derivatives need.
template <typename P>
struct Point {
  P relu, elu, tanh, sig;  // swish = x sig
  P drelu, delu, dtanh, dsig;  // d relu/dx, d elu/dx, d tanh/dx, sig (1 - sig)
};

DEEPNET_INLINE Point<FloatPack> Evaluate(FloatPack x, float beta) {
  Point<FloatPack> p;
  const IntPack pos = x > 0.0f;
  const ExpParts a = ExpOfNonPositive(NegativeAbs(x));
  const FloatPack e = a.scale * a.q + a.scale;           // exp(-|x|)
  const FloatPack m = a.scale * a.q + (a.scale - 1.0f);  // expm1(-|x|)
  const FloatPack tanh_num = (-2.0f - m) * m;  // 1 - e^2
  const FloatPack tanh_den = 2.0f - tanh_num;  // 1 + e^2
  const FloatPack z = beta * x;
  const FloatPack u = ExpExactZero(NegativeAbs(z));  // exp(-|z|)
  const FloatPack one_u = 1.0f + u;
  const FloatPack inv = 1.0f / (tanh_den * one_u);  // both denominators lie in [1, 2]
  const FloatPack tanh_a = tanh_num * one_u * inv;  // tanh(|x|)
  const FloatPack r = tanh_den * inv;               // 1 / (1 + u)
  const FloatPack ur = u * r;
  p.relu = Select(pos, x, Splat(0.0f));
  p.drelu = Select(pos, Splat(1.0f), Splat(0.0f));
  p.elu = Select(pos, x, m);
  p.delu = Select(pos, Splat(1.0f), e);
  p.tanh = (FloatPack)((UIntPack)tanh_a ^ ((UIntPack)x & 0x80000000u));  // tanh(|x|) with x's sign
  p.dtanh = 1.0f - tanh_a * tanh_a;
  p.sig = Select(z >= 0.0f, r, ur);
  p.dsig = ur * r;
  return p;
}

DEEPNET_INLINE Point<double> Evaluate(double x, double beta) {
  Point<double> p;
  const bool pos = x > 0;
  const double t = std::tanh(x), z = beta * x, u = std::exp(-std::fabs(z)), r = 1 / (1 + u);
  p.relu = pos ? x : 0;
  p.drelu = pos ? 1 : 0;
  p.elu = pos ? x : std::expm1(x);
  p.delu = pos ? 1 : std::exp(x);
  p.tanh = t;
  p.dtanh = 1 - t * t;
  p.sig = z >= 0 ? r : u * r;
  p.dsig = u * r * r;
  return p;
}

// ---------------------------------------------------------------- the ops

template <typename T>
struct Weights {
  T w[kWeights];
  T beta;
};

template <typename T>
Weights<T> ReadWeights(const Tensor& weights, const Tensor& beta) {
  Weights<T> out;
  const auto w = weights.flat<T>();
  for (int i = 0; i < kWeights; ++i) out.w[i] = w(i);
  out.beta = beta.scalar<T>()();
  return out;
}

absl::Status CheckParameters(const Tensor& weights, const Tensor& beta) {
  if (weights.dims() != 1 || weights.NumElements() != kWeights)
    return absl::InvalidArgumentError("weights must be a vector of 5 elements");
  if (beta.dims() != 0) return absl::InvalidArgumentError("beta must be a scalar");
  return absl::OkStatus();
}

// Runs work(begin, end) over [0, total) on TF's CPU worker threads.
template <typename Work>
void Parallel(OpKernelContext* ctx, int64_t total, int64_t cost_per_unit, Work work) {
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  tensorflow::Shard(workers->num_threads, workers->workers, total, cost_per_unit, work);
}

template <typename T>
class ForwardOp : public OpKernel {
 public:
  explicit ForwardOp(OpKernelConstruction* c) : OpKernel(c) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x_in = ctx->input(0);
    OP_REQUIRES_OK(ctx, CheckParameters(ctx->input(1), ctx->input(2)));
    const Weights<T> p = ReadWeights<T>(ctx->input(1), ctx->input(2));
    Tensor* y_out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, x_in.shape(), &y_out));
    const T* x = x_in.flat<T>().data();
    T* y = y_out->flat<T>().data();
    Parallel(ctx, x_in.NumElements(), 15, [&](int64_t begin, int64_t end) { Span(p, x, y, begin, end); });
  }

 private:
  static void Span(const Weights<T> p, const T* x, T* y, int64_t begin, int64_t end) {
    constexpr int64_t kSize = Pack<T>::size;
    int64_t i = begin;
    for (; i + kUnroll * kSize <= end; i += kUnroll * kSize) {
#pragma GCC unroll 8
      for (int k = 0; k < kUnroll; ++k) Step(p, x + i + k * kSize, y + i + k * kSize, kSize);
    }
    for (; i + kSize <= end; i += kSize) Step(p, x + i, y + i, kSize);
    if (i < end) Step(p, x + i, y + i, end - i);
  }

  // y for count <= the pack's size values.
  static DEEPNET_INLINE void Step(const Weights<T>& p, const T* x, T* y, int64_t count) {
    using P = typename Pack<T>::type;
    const P xi = Load<P>(x, count);
    const Point<P> f = Evaluate(xi, p.beta);
    Store(y, p.w[0] * f.relu + p.w[1] * f.elu + p.w[2] * f.tanh + p.w[3] * (xi * f.sig) + p.w[4] * xi, count);
  }
};

template <typename T>
class BackwardOp : public OpKernel {
 public:
  explicit BackwardOp(OpKernelConstruction* c) : OpKernel(c) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x_in = ctx->input(0);
    const Tensor& dy_in = ctx->input(1);
    OP_REQUIRES(ctx, x_in.shape() == dy_in.shape(),
                absl::InvalidArgumentError("x and dy must have the same shape"));
    OP_REQUIRES_OK(ctx, CheckParameters(ctx->input(2), ctx->input(3)));
    const Weights<T> p = ReadWeights<T>(ctx->input(2), ctx->input(3));
    Tensor *dx_out = nullptr, *dw_out = nullptr, *dbeta_out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({1}, 0, x_in.shape(), &dx_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({kWeights}), &dw_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({}), &dbeta_out));
    const int64_t n = x_in.NumElements();
    const int64_t n_blocks = (n + kBlock - 1) / kBlock;
    // One row of partial sums per fixed block: the result does not depend on the threads.
    std::vector<double> partial(n_blocks * kSums, 0.0);
    const T* x = x_in.flat<T>().data();
    const T* dy = dy_in.flat<T>().data();
    T* dx = dx_out->flat<T>().data();
    Parallel(ctx, n_blocks, kBlock * 20, [&](int64_t first, int64_t last) {
      for (int64_t b = first; b < last; ++b) {
        const int64_t begin = b * kBlock, end = std::min(n, begin + kBlock);
        Block(p, x, dy, dx, begin, end, &partial[b * kSums]);
      }
    });
    double total[kSums] = {};
    for (int64_t b = 0; b < n_blocks; ++b)
      for (int k = 0; k < kSums; ++k) total[k] += partial[b * kSums + k];
    auto dw = dw_out->flat<T>();
    for (int k = 0; k < kWeights; ++k) dw(k) = static_cast<T>(total[k]);
    dbeta_out->scalar<T>()() = static_cast<T>(p.w[3] * total[kWeights]);
  }

 private:
  static constexpr int64_t kBlock = 8192;

  // dx over [begin, end) and the block's sums: dy f_i(x) for i < 5, dy x^2 sig'(beta x).
  static void Block(const Weights<T> p, const T* x, const T* dy, T* dx, int64_t begin, int64_t end,
                    double* sums) {
    constexpr int64_t kSize = Pack<T>::size;
    typename Pack<T>::type acc[kUnrollBackward][kSums] = {};  // one set per unrolled pack: shorter chains of adds
    int64_t i = begin;
    for (; i + kUnrollBackward * kSize <= end; i += kUnrollBackward * kSize) {
#pragma GCC unroll 8
      for (int k = 0; k < kUnrollBackward; ++k)
        Step(p, x + i + k * kSize, dy + i + k * kSize, dx + i + k * kSize, kSize, acc[k]);
    }
    for (; i + kSize <= end; i += kSize) Step(p, x + i, dy + i, dx + i, kSize, acc[0]);
    if (i < end) Step(p, x + i, dy + i, dx + i, end - i, acc[0]);
    for (int s = 0; s < kSums; ++s) {
      sums[s] = 0.0;
      for (int k = 0; k < kUnrollBackward; ++k) sums[s] += LaneSum(acc[k][s]);
    }
  }

  // dx for count <= the pack's size values, their terms added to acc (missing lanes add 0).
  template <typename P>
  static DEEPNET_INLINE void Step(const Weights<T>& p, const T* x, const T* dy, T* dx, int64_t count, P* acc) {
    const P xi = Load<P>(x, count), gi = Load<P>(dy, count);
    const Point<P> f = Evaluate(xi, p.beta);
    const P slope = p.w[0] * f.drelu + p.w[1] * f.delu + p.w[2] * f.dtanh +
                    p.w[3] * (f.sig + (p.beta * xi) * f.dsig) + p.w[4];
    Store(dx, gi * slope, count);
    const P gx = gi * xi;
    acc[0] += gi * f.relu;
    acc[1] += gi * f.elu;
    acc[2] += gi * f.tanh;
    acc[3] += gx * f.sig;
    acc[4] += gx;
    acc[5] += gx * (xi * f.dsig);
  }
};

// y = w relu(x) (1_relu, fixed or adaptive scaling) as one pass, so the conv before it and
// this op cost what conv + bias + relu + the multiply by w cost in plain TF ops.
template <typename T>
class ScaledReluOp : public OpKernel {
 public:
  explicit ScaledReluOp(OpKernelConstruction* c) : OpKernel(c) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x_in = ctx->input(0);
    OP_REQUIRES(ctx, ctx->input(1).dims() == 0, absl::InvalidArgumentError("weight must be a scalar"));
    const T w = ctx->input(1).scalar<T>()();
    Tensor* y_out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, x_in.shape(), &y_out));
    const T* x = x_in.flat<T>().data();
    T* y = y_out->flat<T>().data();
    Parallel(ctx, x_in.NumElements(), 2, [&](int64_t begin, int64_t end) { Span(w, x, y, begin, end); });
  }

 private:
  static void Span(T w, const T* x, T* y, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) y[i] = w * (x[i] > T(0) ? x[i] : T(0));
  }
};

// Its gradient in one pass: dx = dy w where x > 0 (else 0, as ReluGrad), dw = sum dy relu(x).
template <typename T>
class ScaledReluGradOp : public OpKernel {
 public:
  explicit ScaledReluGradOp(OpKernelConstruction* c) : OpKernel(c) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x_in = ctx->input(0);
    const Tensor& dy_in = ctx->input(1);
    OP_REQUIRES(ctx, x_in.shape() == dy_in.shape(),
                absl::InvalidArgumentError("x and dy must have the same shape"));
    OP_REQUIRES(ctx, ctx->input(2).dims() == 0, absl::InvalidArgumentError("weight must be a scalar"));
    const T w = ctx->input(2).scalar<T>()();
    Tensor *dx_out = nullptr, *dw_out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({1}, 0, x_in.shape(), &dx_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({}), &dw_out));
    const int64_t n = x_in.NumElements();
    const int64_t n_blocks = (n + kBlock - 1) / kBlock;
    std::vector<double> partial(n_blocks, 0.0);
    const T* x = x_in.flat<T>().data();
    const T* dy = dy_in.flat<T>().data();
    T* dx = dx_out->flat<T>().data();
    Parallel(ctx, n_blocks, kBlock * 4, [&](int64_t first, int64_t last) {
      for (int64_t b = first; b < last; ++b) {
        const int64_t begin = b * kBlock, end = std::min(n, begin + kBlock);
        partial[b] = Block(w, x, dy, dx, begin, end);
      }
    });
    double total = 0.0;
    for (int64_t b = 0; b < n_blocks; ++b) total += partial[b];
    dw_out->scalar<T>()() = static_cast<T>(total);
  }

 private:
  static constexpr int64_t kBlock = 16384;

  // dx over [begin, end); returns the block's sum of dy relu(x).
  static double Block(T w, const T* x, const T* dy, T* dx, int64_t begin, int64_t end) {
    T acc[kLanes] = {};
    int64_t i = begin;
    for (; i + kLanes <= end; i += kLanes)
      for (int lane = 0; lane < kLanes; ++lane) {
        const T xi = x[i + lane], gi = dy[i + lane];
        dx[i + lane] = xi > T(0) ? gi * w : T(0);
        acc[lane] += gi * (xi > T(0) ? xi : T(0));
      }
    double s = 0.0;
    for (; i < end; ++i) {
      const T xi = x[i], gi = dy[i];  // read before dx[i] is written: dx may be dy's buffer
      dx[i] = xi > T(0) ? gi * w : T(0);
      s += gi * (xi > T(0) ? xi : T(0));
    }
    for (int lane = 0; lane < kLanes; ++lane) s += acc[lane];
    return s;
  }
};

absl::Status ScaledReluShape(InferenceContext* c) {
  ShapeHandle unused;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 0, &unused));
  c->set_output(0, c->input(0));
  return absl::OkStatus();
}

absl::Status ScaledReluGradShape(InferenceContext* c) {
  ShapeHandle unused;
  TF_RETURN_IF_ERROR(c->Merge(c->input(0), c->input(1), &unused));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 0, &unused));
  c->set_output(0, c->input(0));
  c->set_output(1, c->Scalar());
  return absl::OkStatus();
}

absl::Status ForwardShape(InferenceContext* c) {
  ShapeHandle unused;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &unused));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 0, &unused));
  c->set_output(0, c->input(0));
  return absl::OkStatus();
}

absl::Status BackwardShape(InferenceContext* c) {
  ShapeHandle unused;
  TF_RETURN_IF_ERROR(c->Merge(c->input(0), c->input(1), &unused));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &unused));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 0, &unused));
  c->set_output(0, c->input(0));
  c->set_output(1, c->Vector(kWeights));
  c->set_output(2, c->Scalar());
  return absl::OkStatus();
}

}  // namespace deepnet_abu

REGISTER_OP("DeepnetAbuForward")
    .Input("x: T")
    .Input("weights: T")
    .Input("beta: T")
    .Output("y: T")
    .Attr("T: {float, double}")
    .SetShapeFn(deepnet_abu::ForwardShape);

REGISTER_OP("DeepnetAbuBackward")
    .Input("x: T")
    .Input("dy: T")
    .Input("weights: T")
    .Input("beta: T")
    .Output("dx: T")
    .Output("dweights: T")
    .Output("dbeta: T")
    .Attr("T: {float, double}")
    .SetShapeFn(deepnet_abu::BackwardShape);

REGISTER_OP("DeepnetScaledRelu")
    .Input("x: T")
    .Input("weight: T")
    .Output("y: T")
    .Attr("T: {float, double}")
    .SetShapeFn(deepnet_abu::ScaledReluShape);

REGISTER_OP("DeepnetScaledReluGrad")
    .Input("x: T")
    .Input("dy: T")
    .Input("weight: T")
    .Output("dx: T")
    .Output("dweight: T")
    .Attr("T: {float, double}")
    .SetShapeFn(deepnet_abu::ScaledReluGradShape);

#define DEEPNET_ABU_KERNELS(T)                                                                    \
  REGISTER_KERNEL_BUILDER(                                                                        \
      Name("DeepnetAbuForward").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"),            \
      deepnet_abu::ForwardOp<T>);                                                                 \
  REGISTER_KERNEL_BUILDER(                                                                        \
      Name("DeepnetAbuBackward").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"),           \
      deepnet_abu::BackwardOp<T>);                                                                \
  REGISTER_KERNEL_BUILDER(                                                                        \
      Name("DeepnetScaledRelu").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"),            \
      deepnet_abu::ScaledReluOp<T>);                                                              \
  REGISTER_KERNEL_BUILDER(                                                                        \
      Name("DeepnetScaledReluGrad").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"),        \
      deepnet_abu::ScaledReluGradOp<T>);
DEEPNET_ABU_KERNELS(float)
DEEPNET_ABU_KERNELS(double)
