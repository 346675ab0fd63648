#include "mdl/io/checkpoint.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "mdl/io/safetensors.h"
#include "test_util.h"

namespace mdl::io {
namespace {

TEST(Checkpoint, ShardsWithAnIndexAndReadsThemBack) {
  test::TempDir dir;
  std::map<std::string, at::Tensor> tensors;
  for (int i = 0; i < 6; ++i)
    tensors["layer." + std::to_string(i) + ".w"] = at::full({64}, static_cast<float>(i));
  save_checkpoint_tensors(dir.path(), tensors, {}, /*max_shard_bytes=*/600);
  EXPECT_FALSE(std::filesystem::exists(dir / "model.safetensors"));
  auto index = nlohmann::json::parse(test::read_file(dir / "model.safetensors.index.json"));
  EXPECT_EQ(index["metadata"]["total_size"].get<int64_t>(), 6 * 64 * 4);
  EXPECT_EQ(index["weight_map"].size(), 6u);
  CheckpointReader reader(dir.path());
  EXPECT_EQ(reader.files().size(), 3u);
  EXPECT_EQ(reader.names().size(), 6u);
  for (const auto& [name, t] : tensors) {
    EXPECT_TRUE(at::equal(reader.tensor(name), t)) << name;
    EXPECT_EQ(reader.shape(name), std::vector<int64_t>{64});
    EXPECT_EQ(reader.dtype(name), "F32");
  }
  EXPECT_THROW_WITH(reader.tensor("nope"), "no tensor 'nope'");
}

TEST(Checkpoint, SingleFileDirectoryAndFilePath) {
  test::TempDir dir;
  save_checkpoint_tensors(dir.path(), {{"a", at::ones({2})}});
  EXPECT_TRUE(std::filesystem::exists(dir / "model.safetensors"));
  EXPECT_EQ(CheckpointReader(dir.path()).names(), std::vector<std::string>{"a"});
  EXPECT_EQ(CheckpointReader(dir / "model.safetensors").names(), std::vector<std::string>{"a"});
}

TEST(Checkpoint, BrokenIndexesAreReported) {
  test::TempDir dir;
  EXPECT_THROW_WITH(CheckpointReader(dir.path()),
                    "neither model.safetensors nor model.safetensors.index.json");
  EXPECT_THROW_WITH(CheckpointReader(dir / "absent"), "does not exist");
  test::write_file(dir / "model.safetensors.index.json", "{not json");
  EXPECT_THROW_WITH(CheckpointReader(dir.path()), "index.json", "not valid JSON");
  test::write_file(dir / "model.safetensors.index.json", R"({"weight_map": {"a": "shard-1.safetensors"}})");
  EXPECT_THROW_WITH(CheckpointReader(dir.path()), "'a'", "shard-1.safetensors", "does not exist");
  // Shards are files of the checkpoint directory: the probe's index opened /etc/passwd.
  for (const std::string escape : {"../../../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors"}) {
    test::write_file(dir / "model.safetensors.index.json",
                     nlohmann::json({{"weight_map", {{"a", escape}}}}).dump());
    EXPECT_THROW_WITH(CheckpointReader(dir.path()), escape.c_str(), "not a file inside",
                      "relative to the checkpoint");
  }
  test::write_file(dir / "model.safetensors.index.json", R"({"weight_map": {"a": "shard-1.safetensors"}})");
  save_safetensors(dir / "shard-1.safetensors", {{"b", at::ones({1})}});
  CheckpointReader stale(dir.path());
  EXPECT_THROW_WITH(stale.tensor("a"), "'a'", "stale index");
}

}  // namespace
}  // namespace mdl::io
