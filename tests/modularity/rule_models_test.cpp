// Rule data against its formulas written per sample (MLP, MHA by a search loop, RNN by its recurrence),
// out-of-distribution scaling and rule priors; GroupLinear against a loop over groups; the four model
// families' routing (modular sums to one, modular-op depends on the rule alone, GT is the rule) and that
// each learns the MLP task; bad settings refused.
#include "mdl/modularity/rule_models.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/optim/adam.h>

#include <cmath>

#include "mdl/modularity/group_linear.h"
#include "mdl/modularity/rule_data.h"
#include "test_util.h"

namespace mdl {
namespace {

TEST(RuleData, MlpTargetsFollowTheirRules) {
  RuleDataOptions o;
  o.rules = 3;
  RuleData data(o);
  const RuleBatch b = data.sample(50);
  ASSERT_EQ(b.input.sizes(), (std::vector<int64_t>{50, 5}));
  for (int64_t i = 0; i < 50; ++i) {
    const int64_t c = b.rule[i].item<int64_t>();
    EXPECT_EQ(b.input[i][2 + c].item<float>(), 1.0f);
    const double y = data.alpha[c].item<double>() * b.input[i][0].item<double>() +
                     data.beta[c].item<double>() * b.input[i][1].item<double>();
    EXPECT_NEAR(b.target[i][0].item<double>(), y, 1e-5);
  }
  // Out of distribution doubles a and b; a one-hot prior draws only that rule; classification is the sign.
  RuleData twin(o);
  const RuleBatch ood = twin.sample(50, 2.0);
  EXPECT_CLOSE(ood.input.narrow(1, 0, 2), b.input.narrow(1, 0, 2) * 2, 1e-6);
  const RuleBatch only = data.sample(40, 1.0, at::tensor({0.0, 0.0, 1.0}));
  EXPECT_TRUE((only.rule == 2).all().item<bool>());
  o.classification = true;
  const RuleBatch cls = RuleData(o).sample(20);
  EXPECT_TRUE(((cls.target == 0) | (cls.target == 1)).all().item<bool>());
  EXPECT_THROW_WITH(data.sample(5, 1.0, at::tensor({1.0, 1.0})), "the rule prior must be (3)");
  o.task = "cnn";
  EXPECT_THROW_WITH(RuleData{o}, "[rule-data] task 'cnn' is unknown");
}

TEST(RuleData, MhaSearchesAndRetrievesAndRnnFollowsItsDynamics) {
  RuleDataOptions o;
  o.task = "mha";
  o.rules = 2;
  o.length = 6;
  RuleData mha(o);
  const RuleBatch b = mha.sample(4);
  ASSERT_EQ(b.input.sizes(), (std::vector<int64_t>{4, 6, 10}));
  for (int64_t s = 0; s < 4; ++s)
    for (int64_t n = 0; n < 6; ++n) {
      const int64_t r = b.rule[s][n].item<int64_t>();
      auto feature = [&](int64_t i, int64_t k) { return b.input[s][i][4 * r + k].item<double>(); };
      auto nearest = [&](int64_t k) {
        int64_t best = -1;
        double d = 1e300;
        for (int64_t i = 0; i < 6; ++i)
          if (i != n && std::abs(feature(n, k) - feature(i, k)) < d)
            d = std::abs(feature(n, k) - feature(i, k)), best = i;
        return best;
      };
      const double y = mha.alpha[r].item<double>() * feature(nearest(0), 2) +
                       mha.beta[r].item<double>() * feature(nearest(1), 3);
      EXPECT_NEAR(b.target[s][n][0].item<double>(), y, 1e-5) << s << "," << n;
    }
  o.task = "rnn";
  o.dim = 2;
  o.order = 2;
  RuleData rnn(o);
  const RuleBatch q = rnn.sample(3);
  for (int64_t s = 0; s < 3; ++s)
    for (int64_t t = 0; t < 6; ++t) {
      const int64_t r = q.rule[s][t].item<int64_t>();
      at::Tensor want = at::mv(rnn.B[r], q.input[s][t].narrow(0, 0, 2));
      for (int64_t k = 1; k <= 2 && t - k >= 0; ++k) want += at::mv(rnn.A[r][k - 1], q.target[s][t - k]);
      EXPECT_CLOSE(q.target[s][t], want, 1e-5) << s << "," << t;
    }
}

TEST(GroupLinear, EqualsALoopOverGroups) {
  GroupLinear g(3, 4, 5, 1);
  const at::Tensor x = at::randn({6, 3, 4});
  const at::Tensor y = g->forward(x);
  for (int64_t k = 0; k < 3; ++k)
    EXPECT_CLOSE(y.select(1, k), at::matmul(x.select(1, k), g->weight[k]) + g->bias[k], 1e-6);
  EXPECT_LE(g->weight.abs().max().item<double>(), 0.5 + 1e-9);  // U(+-1/sqrt(4))
  EXPECT_THROW_WITH(g->forward(at::randn({6, 2, 4})), "[group-linear] expects (N, 3, 4)");
}

TEST(RuleModels, EachFamilyRoutesAsItShouldAndLearns) {
  RuleDataOptions d;
  d.rules = 4;
  RuleData data(d);
  const RuleBatch test = data.sample(256);
  for (const std::string family : {"monolithic", "modular", "modular_op", "gt"}) {
    RuleModelOptions o;
    o.family = family;
    o.rules = o.modules = 4;
    o.encoder = 16;
    o.dim = 32;
    RuleMlpModel model(o, 3);
    const RuleOutput out = model->forward(test.input);
    ASSERT_EQ(out.prediction.sizes(), (std::vector<int64_t>{256, 1})) << family;
    if (family == "monolithic") {
      EXPECT_FALSE(out.routing.defined());
    } else {
      EXPECT_CLOSE(out.routing.sum(1), at::ones({256}), 1e-5) << family;
    }
    if (family == "gt") EXPECT_CLOSE(out.routing, at::one_hot(test.rule, 4).to(at::kFloat), 0.0);
    if (family == "modular_op") {  // one routing per rule, whatever a and b are
      for (int64_t i = 1; i < 256; ++i)
        if (test.rule[i].item<int64_t>() == test.rule[0].item<int64_t>())
          EXPECT_CLOSE(out.routing[i], out.routing[0], 1e-6);
    }
    // A few hundred Adam steps cut the L1 loss.
    torch::optim::Adam adam(model->parameters(), torch::optim::AdamOptions(3e-3));
    const double before = at::l1_loss(out.prediction, test.target).item<double>();
    for (int step = 0; step < 300; ++step) {
      const RuleBatch b = data.sample(128);
      adam.zero_grad();
      at::l1_loss(model->forward(b.input).prediction, b.target).backward();
      adam.step();
    }
    const double after = at::l1_loss(model->forward(test.input).prediction, test.target).item<double>();
    EXPECT_LT(after, 0.5 * before) << family << ": " << before << " -> " << after;
  }
  // Every family's weights come from its own seed, not the global generator.
  for (const std::string family : {"monolithic", "modular"}) {
    RuleModelOptions o;
    o.family = family;
    at::manual_seed(1);
    RuleMlpModel a(o, 9);
    at::manual_seed(2);
    RuleMlpModel b(o, 9);
    EXPECT_CLOSE(a->forward(test.input).prediction, b->forward(test.input).prediction, 0.0) << family;
  }
  RuleModelOptions bad;
  bad.family = "gt";
  bad.modules = 2;
  EXPECT_THROW_WITH(RuleMlpModel(bad, 1), "gt routes by the true rule: it needs modules = rules");
  bad.family = "modular";
  bad.dim = 101;
  EXPECT_THROW_WITH(RuleMlpModel(bad, 1), "dim a multiple of modules");
  bad.family = "transformer";
  EXPECT_THROW_WITH(RuleMlpModel(bad, 1), "family 'transformer' is unknown");
  EXPECT_THROW_WITH(RuleMlpModel(RuleModelOptions{}, 1)->forward(at::zeros({2, 3})), "expects (N, 6) inputs");
}

TEST(RuleModels, SequenceFamiliesRouteEveryStepAndLearn) {
  for (const std::string task : {"mha", "rnn"}) {
    RuleDataOptions d;
    d.task = task;
    d.rules = 3;
    d.length = 6;
    RuleData data(d);
    const RuleBatch test = data.sample(32);
    int64_t mono_params = 0;
    for (const std::string family : {"monolithic", "modular", "modular_op", "gt"}) {
      RuleSequenceOptions o;
      o.task = task;
      o.family = family;
      o.rules = 3;
      o.input = test.input.size(2);
      o.output = test.target.size(2);
      o.dim = 16;
      o.att_dim = 24;
      o.heads = 2;
      o.hidden = 16;
      RuleSequenceModel model(o, 5);
      int64_t params = 0;
      for (const auto& p : model->parameters()) params += p.numel();
      if (family == "monolithic") mono_params = params;
      const RuleOutput out = model->forward(test.input);
      ASSERT_EQ(out.prediction.sizes(), test.target.sizes()) << task << " " << family;
      if (family == "monolithic") {
        EXPECT_FALSE(out.routing.defined());
      } else {
        ASSERT_EQ(out.routing.sizes(), (std::vector<int64_t>{32, 6, 3})) << task << " " << family;
        EXPECT_CLOSE(out.routing.sum(-1), at::ones({32, 6}), 1e-5) << task << " " << family;
      }
      if (family == "gt") EXPECT_CLOSE(out.routing, at::one_hot(test.rule, 3).to(at::kFloat), 0.0);
      if (task == "rnn" && family != "monolithic")  // the cells' width keeps the parameter budget
        EXPECT_NEAR(static_cast<double>(params) / mono_params, 1.0, 0.35) << family << " " << params;
      torch::optim::Adam adam(model->parameters(), torch::optim::AdamOptions(3e-3));
      const double before = at::l1_loss(out.prediction, test.target).item<double>();
      // Fitting one batch (MHA's search-and-retrieve takes thousands of fresh batches to learn: the demo's
      // --full): every part trains.
      for (int step = 0; step < 200; ++step) {
        adam.zero_grad();
        at::l1_loss(model->forward(test.input).prediction, test.target).backward();
        adam.step();
      }
      const double after = at::l1_loss(model->forward(test.input).prediction, test.target).item<double>();
      EXPECT_LT(after, 0.7 * before) << task << " " << family << ": " << before << " -> " << after;
    }
  }
  RuleSequenceOptions bad;
  bad.task = "cnn";
  EXPECT_THROW_WITH(RuleSequenceModel(bad, 1), "[rule-model] task 'cnn' is unknown");
  bad.task = "mha";
  EXPECT_THROW_WITH(RuleSequenceModel(bad, 1)->forward(at::zeros({2, 5, 7})), "expects (N, L, 20) inputs");
}

}  // namespace
}  // namespace mdl
