#include "mdl/io/safetensors.h"

#include <ATen/ATen.h>

#include <filesystem>

#include "test_util.h"

namespace mdl::io {
namespace {

using test::TempDir;

// A safetensors file from a header text and raw data, written byte by byte as the format says.
std::string raw_file(const std::string& header, const std::string& data, uint64_t claimed_len = UINT64_MAX) {
  uint64_t n = claimed_len == UINT64_MAX ? header.size() : claimed_len;
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + data;
}

TEST(Safetensors, RoundTripsEveryDtypeBitExact) {
  TempDir dir;
  std::map<std::string, at::Tensor> tensors;
  auto gen = at::detail::createCPUGenerator(7);
  at::Tensor base = at::randn({3, 5}, gen) * 100;
  for (auto type : {at::kDouble, at::kFloat, at::kHalf, at::kBFloat16, at::kLong, at::kInt, at::kShort,
                    at::kChar, at::kByte, at::kBool}) {
    at::Tensor t = type == at::kBool ? base > 0 : base.to(type);
    tensors["t_" + std::string(c10::toString(type))] = t;
  }
  tensors["scalar"] = at::tensor(3.5);
  tensors["empty"] = at::zeros({0, 4});
  tensors["strided"] = base.t();  // non-contiguous input is written contiguous
  save_safetensors(dir / "a.safetensors", tensors, {{"format", "pt"}, {"note", "hello"}});

  SafetensorsFile file(dir / "a.safetensors");
  EXPECT_EQ(file.metadata().at("note"), "hello");
  EXPECT_EQ(file.names().size(), tensors.size());
  for (const auto& [name, t] : tensors) {
    at::Tensor back = file.tensor(name);
    EXPECT_EQ(back.scalar_type(), t.scalar_type()) << name;
    EXPECT_EQ(back.sizes(), t.sizes()) << name;
    EXPECT_TRUE(at::equal(back, t.contiguous())) << name;
  }
  EXPECT_EQ(file.entry("t_Float").dtype, "F32");
  EXPECT_EQ(file.entry("t_BFloat16").dtype, "BF16");
  EXPECT_EQ(file.entry("t_Bool").dtype, "BOOL");
}

TEST(Safetensors, LoadingIsZeroCopyAndWritesNeverReachTheFile) {
  TempDir dir;
  save_safetensors(dir / "a.safetensors", {{"w", at::arange(16, at::kFloat)}});
  const std::string before = test::read_file(dir / "a.safetensors");
  {
    SafetensorsFile file(dir / "a.safetensors");
    at::Tensor a = file.tensor("w"), b = file.tensor("w");
    EXPECT_EQ(a.data_ptr(), b.data_ptr());  // both alias the mapping
    a.mul_(2);                              // copy-on-write: private to this process
    EXPECT_EQ(b[3].item<float>(), 6.0f);
  }
  EXPECT_EQ(test::read_file(dir / "a.safetensors"), before);
  // The mapping outlives the file object as long as a tensor does.
  at::Tensor kept;
  { kept = SafetensorsFile(dir / "a.safetensors").tensor("w"); }
  EXPECT_EQ(kept[15].item<float>(), 15.0f);
}

TEST(Safetensors, WritesAtomicallyAndKeepsTheOldFileOnError) {
  TempDir dir;
  save_safetensors(dir / "a.safetensors", {{"w", at::ones({2})}});
  std::map<std::string, at::Tensor> bad = {{"ok", at::ones({2})}, {"undefined", at::Tensor()}};
  EXPECT_THROW_WITH(save_safetensors(dir / "a.safetensors", bad), "undefined", "a.safetensors");
  EXPECT_TRUE(at::equal(load_safetensors(dir / "a.safetensors").at("w"), at::ones({2})));
  size_t files = 0;
  for (auto& e : std::filesystem::directory_iterator(dir.path())) ++files, (void)e;
  EXPECT_EQ(files, 1u) << "a temporary file was left behind";
  EXPECT_THROW_WITH(save_safetensors(dir / "missing/dir/a.safetensors", {{"w", at::ones({1})}}),
                    "missing/dir");
}

struct Corruption {
  const char* what;
  std::string bytes;
  std::vector<const char*> expected;
};

TEST(Safetensors, CorruptFilesGiveErrorsNamingFileAndTensor) {
  const std::string data8(8, '\0');
  std::vector<Corruption> cases = {
      {"empty", "", {"smaller than the 8-byte header"}},
      {"short", "abc", {"smaller than the 8-byte header"}},
      {"header beyond file", raw_file("{}", "", 1000), {"header is 1000 bytes", "incomplete download"}},
      {"invalid json", raw_file("{\"a\": [", ""), {"not valid JSON"}},
      {"not an object", raw_file("[1,2]", ""), {"must be a JSON object"}},
      {"unknown dtype",
       raw_file(R"({"w":{"dtype":"F8","shape":[2],"data_offsets":[0,2]}})", "ab"),
       {"'w'", "F8"}},
      {"missing offsets", raw_file(R"({"w":{"dtype":"F32","shape":[2]}})", data8), {"'w'", "data_offsets"}},
      {"negative shape",
       raw_file(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", data8),
       {"'w'", "non-negative"}},
      {"out of range",
       raw_file(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", data8),
       {"'w'", "extend past the data section", "truncated"}},
      {"byte count",
       raw_file(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", data8),
       {"'w'", "needs 12 bytes", "span 8"}},
      {"begin after end",
       raw_file(R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[8,4]}})", data8),
       {"'w'", "begin > end"}},
      {"overlap",
       raw_file(
           R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
           data8),
       {"'a'", "'b'", "overlap"}},
      {"metadata not strings", raw_file(R"({"__metadata__":{"k":1}})", ""), {"__metadata__", "'k'"}},
      {"huge shape",
       raw_file(R"({"w":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", data8),
       {"'w'", "overflow"}},
  };
  TempDir dir;
  for (const auto& c : cases) {
    const std::string path = dir / (std::string("bad-") + std::to_string(&c - cases.data()) + ".safetensors");
    test::write_file(path, c.bytes);
    SCOPED_TRACE(c.what);
    bool thrown = false;
    try {
      SafetensorsFile f(path);
    } catch (const std::exception& e) {
      thrown = true;
      std::string msg = e.what();
      EXPECT_NE(msg.find(path), std::string::npos) << msg;
      for (const char* part : c.expected)
        EXPECT_NE(msg.find(part), std::string::npos) << msg << "\n lacks " << part;
    }
    EXPECT_TRUE(thrown);
  }
  EXPECT_THROW_WITH(SafetensorsFile(dir / "nope.safetensors"), "nope.safetensors", "cannot open");
}

TEST(Safetensors, MisalignedDataIsCopiedNotMisread) {
  // One U8 byte first pushes the F32 tensor to an odd offset.
  std::string data = std::string(1, '\x07');
  float v[2] = {1.5f, -2.25f};
  data.append(reinterpret_cast<const char*>(v), sizeof(v));
  std::string header =
      R"({"b":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"f":{"dtype":"F32","shape":[2],"data_offsets":[1,9]}})";
  header.append((8 - header.size() % 8) % 8, ' ');
  TempDir dir;
  test::write_file(dir / "m.safetensors", raw_file(header, data));
  SafetensorsFile f(dir / "m.safetensors");
  at::Tensor t = f.tensor("f");
  EXPECT_FLOAT_EQ(t[0].item<float>(), 1.5f);
  EXPECT_FLOAT_EQ(t[1].item<float>(), -2.25f);
  EXPECT_EQ(f.tensor("b")[0].item<uint8_t>(), 7);
  EXPECT_THROW_WITH(f.tensor("zzz"), "no tensor 'zzz'");
}

}  // namespace
}  // namespace mdl::io
