// Fused activation kernels, CPU: the Adaptive Blending Unit of the blend5 set
// (relu, elu, tanh, swish, identity) and the scaled relu of 1_relu.
//
//   y = w0 relu(x) + w1 elu(x) + w2 tanh(x) + w3 x sigmoid(beta x) + w4 x
//
// DeepnetAbuForward computes y in one pass over x. DeepnetAbuBackward recomputes the
// functions from x (nothing is stored between the passes) and returns, in one pass over
// (x, dy), dx plus the reductions dL/dw_i = sum dy f_i(x) and dL/dbeta. Per element it
// needs two exponentials: e = exp(-|x|) gives tanh and the negative branch of elu, and
// u = exp(-|beta x|) gives the sigmoid; both are <= 1, so nothing overflows for large |x|.
// DeepnetScaledRelu / DeepnetScaledReluGrad do the same for y = w relu(x).
// Sums are taken per fixed block of elements and added in block order, so results do not
// depend on the number of threads. deepnet_network.py builds this file on first use and
// falls back to the plain composition of TF ops when it cannot.
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

// exp(v) for v <= 0 as 2^n * p(r), |r| <= ln2/2; plain arithmetic so loops vectorise.
// Below -87 the result would leave the normal float range and is returned as 0.
inline float ExpNonPositive(float v) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;  // ln2 = hi + lo
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float vc = v < -87.0f ? -87.0f : v;
  const float n = (vc * kLog2e + kRound) - kRound;
  const float r = (vc - n * kLn2Hi) - n * kLn2Lo;
  // Taylor coefficients 1/k! for k = 7..2, then exp(r) = 1 + r + r^2 p(r)
  float p = 1.9841270e-4f;
  p = p * r + 1.3888889e-3f;
  p = p * r + 8.3333333e-3f;
  p = p * r + 4.1666667e-2f;
  p = p * r + 1.6666667e-1f;
  p = p * r + 0.5f;
  p = (p * r) * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return v < -87.0f ? 0.0f : p * scale;
}
inline double ExpNonPositive(double v) { return std::exp(v); }

// tanh(a) for a >= 0 from e2 = exp(-2a); a Taylor series near 0 avoids the cancellation.
inline float TanhNonNegative(float a, float e2) {
  const float a2 = a * a;
  const float series =
      a * (1.0f + a2 * (-1.0f / 3 + a2 * (2.0f / 15 + a2 * (-17.0f / 315 + a2 * (62.0f / 2835)))));
  return a < 0.25f ? series : (1.0f - e2) / (1.0f + e2);
}
inline double TanhNonNegative(double a, double) { return std::tanh(a); }

// exp(v) - 1 for v <= 0 from e = exp(v); a Taylor series near 0 avoids the cancellation.
inline float Expm1NonPositive(float v, float e) {
  const float series =
      v * (1.0f + v * (0.5f + v * (1.0f / 6 + v * (1.0f / 24 + v * (1.0f / 120 + v * (1.0f / 720 + v * (1.0f / 5040)))))));
  return v > -0.25f ? series : e - 1.0f;
}
inline double Expm1NonPositive(double v, double) { return std::expm1(v); }

// The five functions at one point and what their derivatives need.
template <typename T>
struct Point {
  T relu, elu, tanh, sig;  // swish = x sig
  T delu, dtanh, dsig;     // d elu/dx, d tanh/dx, sig (1 - sig)
};

template <typename T>
inline Point<T> Evaluate(T x, T beta) {
  Point<T> p;
  const bool pos = x > T(0);
  const T a = pos ? x : -x;
  const T e = ExpNonPositive(-a);  // exp(x) where x <= 0
  const T tanh_a = TanhNonNegative(a, e * e);
  p.relu = pos ? x : T(0);
  p.elu = pos ? x : Expm1NonPositive(-a, e);
  p.delu = pos ? T(1) : e;
  p.tanh = x < T(0) ? -tanh_a : tanh_a;
  p.dtanh = T(1) - tanh_a * tanh_a;
  const T z = beta * x;
  const T u = ExpNonPositive(z < T(0) ? z : -z);  // exp(-|z|)
  const T r = T(1) / (T(1) + u);
  p.sig = z >= T(0) ? r : u * r;
  p.dsig = u * r * r;
  return p;
}

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
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x_in.shape(), &y_out));
    const T* x = x_in.flat<T>().data();
    T* y = y_out->flat<T>().data();
    Parallel(ctx, x_in.NumElements(), 40, [&](int64_t begin, int64_t end) { Span(p, x, y, begin, end); });
  }

 private:
  // Parameters by value, so stores to y cannot alias them and the loop vectorises.
  static void Span(const Weights<T> p, const T* x, T* y, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T xi = x[i];
      const Point<T> f = Evaluate(xi, p.beta);
      y[i] = p.w[0] * f.relu + p.w[1] * f.elu + p.w[2] * f.tanh + p.w[3] * (xi * f.sig) + p.w[4] * xi;
    }
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
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x_in.shape(), &dx_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({kWeights}), &dw_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({}), &dbeta_out));
    const int64_t n = x_in.NumElements();
    const int64_t n_blocks = (n + kBlock - 1) / kBlock;
    // One row of partial sums per fixed block: the result does not depend on the threads.
    std::vector<double> partial(n_blocks * kSums, 0.0);
    const T* x = x_in.flat<T>().data();
    const T* dy = dy_in.flat<T>().data();
    T* dx = dx_out->flat<T>().data();
    Parallel(ctx, n_blocks, kBlock * 60, [&](int64_t first, int64_t last) {
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
  static constexpr int kLanes = 16;  // independent accumulators, so the loop vectorises

  // dx over [begin, end) and the block's sums: dy f_i(x) for i < 5, dy x^2 sig'(beta x).
  static void Block(const Weights<T> p, const T* x, const T* dy, T* dx, int64_t begin, int64_t end,
                    double* sums) {
    T acc[kSums][kLanes] = {};
    auto element = [&](int64_t i, int lane) {
      const T xi = x[i], gi = dy[i];
      const Point<T> f = Evaluate(xi, p.beta);
      const T z = p.beta * xi;
      const T slope = p.w[0] * (xi > T(0) ? T(1) : T(0)) + p.w[1] * f.delu + p.w[2] * f.dtanh +
                      p.w[3] * (f.sig + z * f.dsig) + p.w[4];
      dx[i] = gi * slope;
      const T gx = gi * xi;
      acc[0][lane] += gi * f.relu;
      acc[1][lane] += gi * f.elu;
      acc[2][lane] += gi * f.tanh;
      acc[3][lane] += gx * f.sig;
      acc[4][lane] += gx;
      acc[5][lane] += gx * (xi * f.dsig);
    };
    int64_t i = begin;
    for (; i + kLanes <= end; i += kLanes)
      for (int lane = 0; lane < kLanes; ++lane) element(i + lane, lane);
    for (; i < end; ++i) element(i, 0);
    for (int k = 0; k < kSums; ++k) {
      double s = 0.0;
      for (int lane = 0; lane < kLanes; ++lane) s += acc[k][lane];
      sums[k] = s;
    }
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
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x_in.shape(), &y_out));
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
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x_in.shape(), &dx_out));
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
  static constexpr int kLanes = 16;

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
      dx[i] = x[i] > T(0) ? dy[i] * w : T(0);
      s += dy[i] * (x[i] > T(0) ? x[i] : T(0));
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
