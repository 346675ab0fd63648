// Batches: examples padded with their mask and targets, their task and language ids, and with fixed
// routing each example's modules looked up by id: its language's, then its task's, in that order.
#include "mdl/training/batch.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "test_util.h"

namespace mdl {
namespace {

Dataset two_languages_two_tasks() {
  Dataset d;
  d.tasks = {"nli", "qa"};
  d.languages = {"de", "sw"};
  const std::vector<std::tuple<std::vector<int64_t>, std::string, std::string>> rows = {
      {{5, 6, 7}, "nli", "de"}, {{8}, "qa", "sw"}, {{9, 10}, "qa", "de"}};
  int64_t line = 1;
  for (const auto& [ids, task, language] : rows) {
    Example e;
    e.ids = ids;
    e.label = line % 2;
    e.task = task;
    e.language = language;
    e.line = line++;
    d.examples.push_back(e);
  }
  return d;
}

TEST(Batch, PadsAndRoutesEachExampleByItsIdsLanguageFirst) {
  const Dataset d = two_languages_two_tasks();
  ExampleRouting r;
  r.by_language = {{"de", {"lang-de"}}, {"sw", {"lang-sw"}}};
  r.by_task = {{"nli", {"task-nli"}}, {"qa", {"task-qa", "task-qa-2"}}};
  const Batch b = collate(d, {2, 0, 1}, /*pad=*/0, at::kCPU, r);
  EXPECT_TRUE(at::equal(b.ids, at::tensor({9, 10, 0, 5, 6, 7, 8, 0, 0}, at::kLong).view({3, 3})));
  EXPECT_TRUE(at::equal(b.mask, at::tensor({1, 1, 0, 1, 1, 1, 1, 0, 0}, at::kLong).view({3, 3})));
  EXPECT_TRUE(at::equal(b.routing.task_ids, at::tensor({1, 0, 1}, at::kLong)));
  EXPECT_TRUE(at::equal(b.routing.language_ids, at::tensor({0, 0, 1}, at::kLong)));
  ASSERT_EQ(b.routing.modules.size(), 3u);
  auto names = [](const std::vector<ModuleChoice>& m) {
    std::vector<std::string> out;
    for (const auto& c : m) out.push_back(c.name);
    return out;
  };
  EXPECT_EQ(names(b.routing.modules[0]), (std::vector<std::string>{"lang-de", "task-qa", "task-qa-2"}));
  EXPECT_EQ(names(b.routing.modules[1]), (std::vector<std::string>{"lang-de", "task-nli"}));
  EXPECT_EQ(names(b.routing.modules[2]), (std::vector<std::string>{"lang-sw", "task-qa", "task-qa-2"}));
  // Without tables the batch carries ids only.
  EXPECT_TRUE(collate(d, {0}, 0, at::kCPU, ExampleRouting()).routing.modules.empty());
}

TEST(Batch, ATaskOrLanguageATableLacksIsRefusedNamingIt) {
  const Dataset d = two_languages_two_tasks();
  ExampleRouting r;
  r.by_task = {{"nli", {"task-nli"}}};
  EXPECT_THROW_WITH(collate(d, {0}, 0, at::kCPU, r), "the data's task 'qa' has no entry in routing.by_task");
  Dataset untagged = d;
  untagged.tasks.clear();
  for (auto& e : untagged.examples) e.task.clear();
  EXPECT_THROW_WITH(collate(untagged, {0}, 0, at::kCPU, r),
                    "the data's task '' has no entry in routing.by_task");
}

}  // namespace
}  // namespace mdl
