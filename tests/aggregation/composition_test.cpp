// The composition language: valid expressions and their canonical form, invalid ones with their exact
// messages, and what an expression does to a model's modules (sums, averages, stacks, merges, refusals).
#include "mdl/aggregation/composition.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <filesystem>

#include "backbones/fixtures.h"
#include "mdl/modules/module_set.h"

namespace mdl {
namespace {

TEST(CompositionParser, ValidExpressions) {
  EXPECT_EQ(parse_composition("stack(lang/de, task/nli)").to_string(), "stack(lang/de, task/nli)");
  EXPECT_EQ(parse_composition(" avg( a:0.7 ,b:0.3 ) ").to_string(), "avg(a:0.7, b:0.3)");
  EXPECT_EQ(parse_composition("a:0.5 + b:0.5").to_string(), "sum(a:0.5, b:0.5)");
  EXPECT_EQ(parse_composition("ties(a, b, c; density=0.5)").to_string(), "ties(a, b, c; density=0.5)");
  EXPECT_EQ(parse_composition("a,b:-0.5").to_string(), "stack(a, b:-0.5)");
  EXPECT_EQ(parse_composition("stack(de, svd(x, y; rank=4):2)").to_string(),
            "stack(de, svd(x, y; rank=4):2)");
  Composition c = parse_composition("stack(a, avg(b, c))");
  EXPECT_EQ(c.kind, Composition::Kind::stack);
  EXPECT_EQ(c.children[1].kind, Composition::Kind::avg);
  EXPECT_EQ(c.children[1].column, 10);
}

// Names in any script; quoted names with spaces, commas or parentheses; canonical text quotes what needs
// it, so that it parses back to the same tree.
TEST(CompositionParser, NamesInAnyScriptAndQuoted) {
  EXPECT_EQ(parse_composition("stack(modül, 日本/タスク)").to_string(), "stack(modül, 日本/タスク)");
  const Composition c = parse_composition("stack(\"my module\", 'a, (b)':0.5)");
  ASSERT_EQ(c.children.size(), 2u);
  EXPECT_EQ(c.children[0].name, "my module");
  EXPECT_EQ(c.children[1].name, "a, (b)");
  EXPECT_EQ(c.children[1].scale, 0.5);
  EXPECT_EQ(c.to_string(), "stack(\"my module\", \"a, (b)\":0.5)");
  EXPECT_EQ(parse_composition(c.to_string()).to_string(), c.to_string());
  EXPECT_EQ(parse_composition("'say \"hi\"'").to_string(), "'say \"hi\"'");
}

void expect_message(const std::string& text, const std::string& message) {
  try {
    parse_composition(text);
    ADD_FAILURE() << "no error for '" << text << "'";
  } catch (const std::exception& e) {
    const std::string what = e.what();
    EXPECT_EQ(what.substr(0, what.find('\n')), message) << text;
  }
}

TEST(CompositionParser, ErrorsPointAtTheColumn) {
  expect_message("stack(a, b", "[compose] column 11: expected ')' to close 'stack(', found the end");
  expect_message("foo(a)",
                 "[compose] column 1: unknown function 'foo'; expected stack, avg, sum, fuse, or a merge: "
                 "linear, task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune, slerp, cat, svd");
  expect_message("avg(a:x)", "[compose] column 7: expected a finite number, found 'x'");
  expect_message("a +", "[compose] column 4: expected a module name, found the end");
  expect_message("stack(a; density=1)", "[compose] column 8: only merges take parameters after ';'");
  expect_message("ties(a, b; dens=1)",
                 "[compose] column 12: unknown parameter 'dens'; expected density, rank, t, lambda or seed");
  expect_message("a b", "[compose] column 3: unexpected 'b' after a complete expression");
  expect_message(
      "", "[compose] column 1: empty expression; expected a module name or a function like stack(a, b)");
  expect_message("stack(a b)", "[compose] column 9: expected ',' or ')', found 'b'");
  expect_message("stack(a ü)", "[compose] column 9: expected ',' or ')', found 'ü'");  // a whole character
  expect_message("'open", "[compose] column 1: the quoted name is not closed: expected ' before the end");
  expect_message("\"\"", "[compose] column 1: an empty quoted name");
  expect_message("a:nan", "[compose] column 3: expected a finite number, found 'n'");
  expect_message("a:1e999", "[compose] column 3: expected a finite number, found '1e999'");
  std::string deep = "a";
  for (int i = 0; i < 33; ++i) deep = "stack(" + deep + ")";
  expect_message(deep, "[compose] column 193: compositions nest at most 32 levels deep");
  std::string ok = "a";
  for (int i = 0; i < 32; ++i) ok = "stack(" + ok + ")";
  EXPECT_NO_THROW(parse_composition(ok));
  try {
    parse_composition("stack(a, b");
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("\n  stack(a, b\n            ^"), std::string::npos) << e.what();
  }
}

class Compose : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new test::TempDir();
    ModuleSet set(load_model(test::tiny_checkpoint("llama")));
    ModuleConfig lora;
    lora.lora.init = "random";
    set.add("a", lora);
    lora.seed = 9;
    set.add("b", lora);
    ModuleConfig adapter;
    adapter.type = "adapter";
    set.add("c", adapter);
    adapter.seed = 4;
    set.add("d", adapter);
    ModuleConfig prompt;
    prompt.type = "prompt";
    set.add("p", prompt);
    {
      torch::NoGradGuard g;
      for (const char* n : {"c", "d"})
        for (auto& [k, t] : set.tensors(n)) t.copy_(at::randn_like(t) * 0.3);
    }
    for (const char* n : {"a", "b", "c", "d", "p"}) set.save(n, *dir_ / n);
  }
  static void TearDownTestSuite() { delete dir_; }
  static at::Tensor run(const std::string& expr) {
    ModuleSet set(load_model(test::tiny_checkpoint("llama")));
    ComposeOptions o;
    o.model_dir = test::tiny_checkpoint("llama");
    o.modules_dir = dir_->path();
    compose(set, parse_composition(expr), o);
    torch::NoGradGuard g;
    ModelInput in;
    in.input_ids = at::arange(3, 15, at::kLong).view({2, 6});
    return set.model()->forward(in);
  }
  static test::TempDir* dir_;
};
test::TempDir* Compose::dir_ = nullptr;

TEST_F(Compose, SumsAveragesAndStacks) {
  // avg normalises the weights: avg(a:3, b:1) == a:0.75 + b:0.25.
  EXPECT_TRUE(at::allclose(run("avg(a:3, b:1)"), run("a:0.75 + b:0.25"), 1e-5, 1e-5));
  EXPECT_FALSE(at::allclose(run("avg(a:3, b:1)"), run("avg(a, b)"), 1e-5, 1e-5));
  // Averaging identical modules gives that module.
  EXPECT_TRUE(at::allclose(run("avg(a, a)"), run("a"), 1e-5, 1e-5));
  // Stack order matters for adapters.
  EXPECT_FALSE(at::allclose(run("stack(c, d)"), run("stack(d, c)"), 1e-5, 1e-5));
  EXPECT_TRUE(at::allclose(run("stack(c, d)"), run("c,d"), 1e-6, 1e-6));
  // A merge is a module: cat of a and b with weights equals their weighted sum.
  EXPECT_TRUE(at::allclose(run("cat(a:0.5, b:0.5)"), run("a:0.5 + b:0.5"), 1e-4, 1e-4));
  EXPECT_TRUE(std::filesystem::exists(dir_->path() + "/.mdl-merged"));
  // fuse: an attention fusion over the adapters' outputs, not their stack.
  EXPECT_FALSE(at::allclose(run("fuse(c, d)"), run("stack(c, d)"), 1e-5, 1e-5));
  EXPECT_TRUE(at::equal(run("fuse(c, d)"), run("fuse(c, d)")));
}

TEST_F(Compose, NonsenseIsRefusedWithTheReason) {
  EXPECT_THROW_WITH(run("avg(a, c)"), "[compose] column 8: avg combines additive modules",
                    "'c' is a adapter module", "use stack(...)");
  EXPECT_THROW_WITH(run("stack(a, zzz)"), "[compose] column 10: unknown module 'zzz'",
                    "not in the modules directory");
  EXPECT_THROW_WITH(run("fuse(p, c)"), "[compose] column 6: cannot fuse 'p', a prompt module",
                    "no output for fusion to attend over");
  EXPECT_THROW_WITH(run("fuse(c)"), "fuse needs at least 2 modules");
  EXPECT_THROW_WITH(run("ties(a, stack(b))"), "ties(...) merges module directories");
}

}  // namespace
}  // namespace mdl
