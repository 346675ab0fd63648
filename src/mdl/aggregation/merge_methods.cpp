#include "mdl/aggregation/merge_methods.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/core/hash.h"

namespace mdl {

void to_json(nlohmann::json& j, const MergeOptions& o) {
  j = {{"method", o.method},
       {"weights", o.weights},
       {"density", o.density},
       {"lambda", o.lambda},
       {"normalize", o.normalize},
       {"t", o.t},
       {"rank", o.rank},
       {"convention", o.convention == MergeConvention::peft ? "peft" : "mergekit"},
       {"seed", o.seed}};
}

void validate(const MergeOptions& o, size_t n) {
  static const std::vector<std::string> methods = {"linear",    "task_arithmetic", "ties",  "dare_linear",
                                                   "dare_ties", "magnitude_prune", "slerp", "cat",
                                                   "svd"};
  MDL_CHECK(std::find(methods.begin(), methods.end(), o.method) != methods.end(), "[merge] unknown method '",
            o.method,
            "'; expected linear, task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune, slerp, cat "
            "or svd");
  MDL_CHECK(n >= 1, "[merge] no inputs");
  MDL_CHECK(o.weights.empty() || o.weights.size() == n, "[merge] ", o.weights.size(), " weights for ", n,
            " inputs; give one weight per input");
  MDL_CHECK(o.density > 0 && o.density <= 1, "[merge] density must be in (0, 1], got ", o.density);
  MDL_CHECK(o.method != "slerp" || n == 2, "[merge] slerp interpolates exactly 2 inputs, got ", n);
  MDL_CHECK(o.t >= 0 && o.t <= 1, "[merge] slerp t must be in [0, 1], got ", o.t);
  MDL_CHECK(o.rank >= 0, "[merge] rank must be >= 0, got ", o.rank);
  if (o.method == "linear" && o.normalize && !o.weights.empty()) {
    double sum = 0;
    for (double w : o.weights) sum += w;
    MDL_CHECK(std::abs(sum) > 1e-12,
              "[merge] linear averaging divides by the sum of the weights, which is 0; use "
              "task_arithmetic for weights that cancel");
  }
}

double magnitude_threshold(const at::Tensor& tau, double density) {
  if (density >= 1.0) return 0.0;
  const int64_t n = tau.numel(), keep = static_cast<int64_t>(std::ceil(density * n));
  if (keep == 0) return std::numeric_limits<double>::infinity();
  // The keep-th largest magnitude = the (n - keep + 1)-th smallest.
  return std::get<0>(tau.reshape({-1}).abs().kthvalue(n - keep + 1)).item<double>();
}

at::Tensor trim_to_density(const at::Tensor& tau, double density) {
  if (density >= 1.0) return tau;
  return trim_below(tau, magnitude_threshold(tau, density));
}

at::Tensor trim_below(const at::Tensor& tau, double threshold) {
  if (threshold <= 0) return tau;
  return tau * (tau.abs() >= threshold).to(tau.scalar_type());
}

at::Tensor dare(const at::Tensor& tau, double density, MergeConvention convention, uint64_t seed) {
  if (density >= 1.0) return tau;
  auto gen = at::detail::createCPUGenerator(seed);
  at::Tensor keep = at::empty(tau.sizes(), at::kFloat).bernoulli_(density, gen).to(tau.scalar_type());
  at::Tensor dropped = tau * keep;
  if (convention == MergeConvention::peft) return dropped / density;
  const double before = tau.abs().sum().item<double>(), after = dropped.abs().sum().item<double>();
  return after > 0 ? dropped * (before / after) : dropped;
}

at::Tensor slerp(const at::Tensor& a, const at::Tensor& b, double t) {
  at::Tensor fa = a.to(at::kDouble).reshape({-1}), fb = b.to(at::kDouble).reshape({-1});
  const double na = fa.norm().item<double>(), nb = fb.norm().item<double>();
  const double dot = na > 0 && nb > 0 ? (fa / na).dot(fb / nb).item<double>() : 1.0;
  at::Tensor out;
  if (std::abs(dot) > 0.9995) {
    out = (1 - t) * fa + t * fb;
  } else {
    const double theta = std::acos(dot), s = std::sin(theta);
    out = std::sin((1 - t) * theta) / s * fa + std::sin(t * theta) / s * fb;
  }
  return out.view(a.sizes()).to(a.scalar_type());
}

namespace {

double weight(const MergeOptions& o, size_t i) {
  return o.weights.empty() ? 1.0 : o.weights[i];
}

// TIES' sign election and disjoint mean over (already trimmed or dropped) task vectors.
at::Tensor disjoint_merge(const std::vector<at::Tensor>& taus, const MergeOptions& o) {
  at::Tensor weighted_sum = at::zeros_like(taus[0]), plain_sum = at::zeros_like(taus[0]);
  for (size_t i = 0; i < taus.size(); ++i) weighted_sum += weight(o, i) * taus[i], plain_sum += taus[i];
  at::Tensor sign = (o.convention == MergeConvention::peft ? plain_sum : weighted_sum).sign();
  at::Tensor numerator = at::zeros_like(taus[0]), divisor = at::zeros_like(taus[0]);
  for (size_t i = 0; i < taus.size(); ++i) {
    at::Tensor agree = (taus[i].sign() == sign).logical_and(taus[i] != 0).to(taus[0].scalar_type());
    numerator += weight(o, i) * taus[i] * agree;
    divisor += (o.convention == MergeConvention::peft ? 1.0 : weight(o, i)) * agree;
  }
  // Entries where nobody agrees stay zero.
  return at::where(divisor != 0, numerator / at::where(divisor != 0, divisor, at::ones_like(divisor)),
                   at::zeros_like(numerator));
}

}  // namespace

namespace {

// One block of rows of every input (the whole tensor when small): taus against the base, per-input trim
// thresholds computed on the whole tensor beforehand, DARE masks seeded per block.
at::Tensor merge_block(const std::vector<at::Tensor>& x, const at::Tensor& b, const MergeOptions& o,
                       const std::vector<double>& thresholds, uint64_t seed) {
  if (o.method == "linear") {  // a weighted average of the parameters themselves
    at::Tensor out = at::zeros_like(x[0]);
    double sum = 0;
    for (size_t i = 0; i < x.size(); ++i) out.add_(x[i], weight(o, i)), sum += weight(o, i);
    return o.normalize ? out / sum : out;
  }
  std::vector<at::Tensor> taus;
  for (const auto& t : x) taus.push_back(b.defined() ? t - b : t);
  at::Tensor merged;
  if (o.method == "task_arithmetic" || o.method == "magnitude_prune" || o.method == "dare_linear") {
    merged = at::zeros_like(taus[0]);
    for (size_t i = 0; i < taus.size(); ++i) {
      at::Tensor tau = taus[i];
      if (o.method == "magnitude_prune") tau = trim_below(tau, thresholds[i]);
      if (o.method == "dare_linear") tau = dare(tau, o.density, o.convention, seed + i);
      merged += weight(o, i) * tau;
    }
  } else if (o.method == "ties" || o.method == "dare_ties") {
    for (size_t i = 0; i < taus.size(); ++i)
      taus[i] = o.method == "ties" ? trim_below(taus[i], thresholds[i])
                                   : dare(taus[i], o.density, o.convention, seed + i);
    merged = disjoint_merge(taus, o);
  } else {
    MDL_FAIL("[merge] method '", o.method, "' works on LoRA modules (factors), not on single tensors");
  }
  at::Tensor out = o.lambda * merged;
  return b.defined() ? b + out : out;
}

constexpr int64_t kBlockElements = 1 << 18;  // temporaries stay about a MiB whatever the tensor's size

// magnitude_threshold without materialising |tau| for the whole tensor: a bisection over the float bit
// patterns of the threshold (non-negative floats order as their bits), counting block by block. Exact.
double blocked_threshold(const at::Tensor& input, const at::Tensor& base, double density, int64_t step) {
  const int64_t rows = input.size(0), n = input.numel();
  const int64_t keep = static_cast<int64_t>(std::ceil(density * n));
  if (density >= 1.0) return 0.0;
  if (keep == 0) return std::numeric_limits<double>::infinity();
  auto block = [&](int64_t r, int64_t m) {
    at::Tensor t = input.narrow(0, r, m).to(at::kFloat);
    return (base.defined() ? t - base.narrow(0, r, m).to(at::kFloat) : t).abs();
  };
  float max_abs = 0;
  for (int64_t r = 0; r < rows; r += step)
    max_abs = std::max(max_abs, block(r, std::min(step, rows - r)).max().item<float>());
  auto count_at_least = [&](float t) {
    int64_t c = 0;
    for (int64_t r = 0; r < rows; r += step)
      c += (block(r, std::min(step, rows - r)) >= t).sum().item<int64_t>();
    return c;
  };
  uint32_t lo = 0, hi = 0;  // invariant: count(>= bits lo) >= keep
  std::memcpy(&hi, &max_abs, sizeof(hi));
  if (count_at_least(max_abs) >= keep) return max_abs;
  while (hi - lo > 1) {  // count(>= hi) < keep
    const uint32_t mid = lo + (hi - lo) / 2;
    float t;
    std::memcpy(&t, &mid, sizeof(t));
    (count_at_least(t) >= keep ? lo : hi) = mid;
  }
  float t;
  std::memcpy(&t, &lo, sizeof(t));
  return t;
}

}  // namespace

void merge_tensors_into(const std::vector<at::Tensor>& inputs, const at::Tensor& base, const MergeOptions& o,
                        const std::string& name, const std::function<void(const at::Tensor&)>& sink) {
  validate(o, inputs.size());
  for (size_t i = 1; i < inputs.size(); ++i)
    MDL_CHECK(inputs[i].sizes() == inputs[0].sizes(), "[merge] '", name, "': input ", i + 1, " has shape ",
              inputs[i].sizes(), " but input 1 has ", inputs[0].sizes());
  MDL_CHECK(!base.defined() || base.sizes() == inputs[0].sizes(), "[merge] '", name, "': the base has shape ",
            base.sizes(), " but the inputs have ", inputs[0].sizes());
  const auto dtype = inputs[0].scalar_type();
  // Integer and boolean tensors (position ids, masks) are not merged: the first input's are kept.
  if (!at::isFloatingType(dtype)) return sink(inputs[0]);
  if (o.method == "slerp") return sink(slerp(inputs[0], inputs[1], o.t));  // needs the whole tensors' angle
  // Trim thresholds over the whole tensor (one task vector at a time), then the rest block by block.
  std::vector<double> thresholds(inputs.size(), 0.0);
  const bool small = inputs[0].dim() == 0 || inputs[0].numel() <= kBlockElements || inputs[0].size(0) == 1;
  const int64_t rows = small ? 1 : inputs[0].size(0);
  const int64_t step = small ? 1 : std::max<int64_t>(1, kBlockElements / (inputs[0].numel() / rows));
  if (o.method == "ties" || o.method == "magnitude_prune")
    for (size_t i = 0; i < inputs.size(); ++i)
      thresholds[i] =
          small ? magnitude_threshold(base.defined() ? inputs[i].to(at::kFloat) - base.to(at::kFloat)
                                                     : inputs[i].to(at::kFloat),
                                      o.density)
                : blocked_threshold(inputs[i], base, o.density, step);
  const uint64_t seed = fnv1a(name, kFnvOffset ^ o.seed);  // stable across builds and stream orders
  for (int64_t r = 0, block = 0; r < rows; r += step, ++block) {
    const int64_t n = std::min(step, rows - r);
    auto rows_of = [&](const at::Tensor& t) { return (small ? t : t.narrow(0, r, n)).to(at::kFloat); };
    std::vector<at::Tensor> x;
    for (const auto& t : inputs) x.push_back(rows_of(t));
    at::Tensor b = base.defined() ? rows_of(base) : at::Tensor();
    sink(merge_block(x, b, o, thresholds, seed + 7919u * static_cast<uint64_t>(block)).to(dtype));
  }
}

at::Tensor merge_tensors(const std::vector<at::Tensor>& inputs, const at::Tensor& base, const MergeOptions& o,
                         const std::string& name) {
  std::vector<at::Tensor> blocks;
  merge_tensors_into(inputs, base, o, name, [&](const at::Tensor& block) { blocks.push_back(block); });
  return blocks.size() == 1 ? blocks[0] : at::cat(blocks, 0);
}

LoraFactors lora_cat(const std::vector<LoraFactors>& inputs, const std::vector<double>& weights) {
  MDL_CHECK(!inputs.empty(), "[merge] cat: no inputs");
  std::vector<at::Tensor> as, bs;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const double w = weights.empty() ? 1.0 : weights[i];
    as.push_back(inputs[i].A.to(at::kFloat));
    bs.push_back(inputs[i].B.to(at::kFloat) * (w * inputs[i].scaling));  // weight and scaling on B, once
  }
  return {at::cat(as, 0), at::cat(bs, 1), 1.0};
}

SvdFactors lora_svd(const at::Tensor& delta, int64_t rank) {
  MDL_CHECK(delta.dim() == 2, "[merge] svd: delta must be (out, in), got ", delta.sizes());
  const int64_t r = std::min<int64_t>(rank, std::min(delta.size(0), delta.size(1)));
  MDL_CHECK(r >= 1, "[merge] svd: rank must be >= 1, got ", rank);
  auto [U, S, Vh] = at::linalg_svd(delta.to(at::kDouble), /*full_matrices=*/false);
  SvdFactors out;
  out.factors.B = (U.narrow(1, 0, r) * S.narrow(0, 0, r)).to(at::kFloat);  // (out, r)
  out.factors.A = Vh.narrow(0, 0, r).to(at::kFloat);                       // (r, in)
  out.factors.scaling = 1.0;
  const double total = S.pow(2).sum().item<double>();
  const double discarded = total - S.narrow(0, 0, r).pow(2).sum().item<double>();
  out.discarded_energy = total > 0 ? discarded / total : 0.0;
  out.error = std::sqrt(std::max(0.0, discarded));
  return out;
}

}  // namespace mdl
