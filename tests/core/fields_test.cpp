// A field list writes, reads, checks and describes its struct from one declaration: every field out, the
// present ones in over the defaults, an unknown key refused naming it and the known ones (or ignored
// for a foreign format), a wrong type naming its key, nested lists read by their own list and described
// under "key.", a writer that leaves a field out.
#include "mdl/core/fields.h"

#include <gtest/gtest.h>

#include "test_util.h"

namespace mdl {
namespace {

struct Inner {
  double lr = 0.1;
};
struct Outer {
  int64_t steps = 10;
  std::string name;
  Inner inner;
};

const FieldList<Inner>& inner_fields() {
  static const FieldList<Inner> f =
      FieldList<Inner>("outer.inner").add("lr", &Inner::lr, "learning rate").check([](const Inner& i) {
        MDL_CHECK(i.lr > 0, "[outer.inner] lr must be > 0, got ", i.lr);
      });
  return f;
}

const FieldList<Outer>& outer_fields() {
  static const FieldList<Outer> f =
      FieldList<Outer>("outer")
          .add("steps", &Outer::steps, "how many")
          .add(
              "name",
              [](nlohmann::json& v, const Outer& o) {
                v = o.name.empty() ? nlohmann::json(nlohmann::json::value_t::discarded)
                                   : nlohmann::json(o.name);
              },
              [](const nlohmann::json& v, Outer& o) { o.name = v.get<std::string>(); }, "left out when empty")
          .add("inner", &Outer::inner, inner_fields(), "nested");
  return f;
}

TEST(Fields, WritesEveryFieldAndReadsThePresentOnesOverTheDefaults) {
  Outer o;
  o.steps = 3;
  o.inner.lr = 0.5;
  const nlohmann::json j = outer_fields().write(o);
  EXPECT_EQ(j, nlohmann::json({{"steps", 3}, {"inner", {{"lr", 0.5}}}}));  // "name" left out while empty
  const Outer back = outer_fields().read(j);
  EXPECT_EQ(back.steps, 3);
  EXPECT_EQ(back.inner.lr, 0.5);
  const Outer partial = outer_fields().read({{"name", "x"}});
  EXPECT_EQ(partial.steps, 10);
  EXPECT_EQ(partial.name, "x");
  EXPECT_EQ(partial.inner.lr, 0.1);
  EXPECT_EQ(outer_fields().keys(), (std::vector<std::string>{"steps", "name", "inner"}));
}

TEST(Fields, RefusesUnknownKeysWrongTypesAndBadValuesNamingThem) {
  EXPECT_THROW_WITH(outer_fields().read({{"stepz", 3}}), "[outer] no option 'stepz'",
                    "the options are steps, name, inner");
  EXPECT_EQ(outer_fields().read({{"stepz", 3}}, UnknownKeys::ignore).steps,
            10);  // a foreign format's extra keys
  EXPECT_THROW_WITH(outer_fields().read({{"steps", "many"}}), "[outer] option 'steps'", "\"many\"");
  EXPECT_THROW_WITH(outer_fields().read({{"inner", {{"lr", -1}}}}), "[outer.inner] lr must be > 0, got -1");
  EXPECT_THROW_WITH(outer_fields().read({{"inner", {{"lrr", 1}}}}), "[outer.inner] no option 'lrr'");
  EXPECT_THROW_WITH(outer_fields().read(nlohmann::json::array()),
                    "[outer] options must be a JSON object, got array");
}

TEST(Fields, DescribesEveryLeafWithItsDefault) {
  const std::vector<FieldHelp> h = outer_fields().help();
  ASSERT_EQ(h.size(), 3u);
  EXPECT_EQ(h[0].key, "steps");
  EXPECT_EQ(h[0].fallback, "10");
  EXPECT_EQ(h[1].key, "name");
  EXPECT_EQ(h[1].fallback, "\"\"");
  EXPECT_EQ(h[2].key, "inner.lr");
  EXPECT_EQ(h[2].help, "learning rate");
  const std::string table = format_help(h);
  EXPECT_NE(table.find("inner.lr"), std::string::npos) << table;
}

}  // namespace
}  // namespace mdl
