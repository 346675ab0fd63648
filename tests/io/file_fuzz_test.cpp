// Random mutations of small, valid files (safetensors, config.json, tokenizer.json, a whole checkpoint
// directory), a few hundred of each, seeded and bounded in count: every one either loads or throws an
// error that names its file. None crashes (a crash ends this binary), hangs (CTest's limit) or allocates
// past what the file could describe (the checkpoint case watches peak memory).
#include <ATen/ATen.h>
#include <torch/utils.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "backbones/fixtures.h"
#include "mdl/backbones/model.h"
#include "mdl/core/error.h"
#include "mdl/io/atomic_file.h"
#include "mdl/io/model_config.h"
#include "mdl/io/safetensors.h"
#include "mdl/tokenizers/tokenizer.h"
#include "test_util.h"

namespace mdl {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

class Mutator {
 public:
  explicit Mutator(uint64_t seed) : rng_(seed) {}
  size_t pick(size_t n) { return n ? static_cast<size_t>(rng_() % n) : 0; }

  /// Byte-level: flip, truncate, insert, duplicate a span, overwrite with a number's text.
  std::string bytes(std::string s) {
    const int edits = 1 + static_cast<int>(pick(3));
    for (int e = 0; e < edits && !s.empty(); ++e) {
      switch (pick(5)) {
        case 0:
          s[pick(s.size())] = static_cast<char>(rng_() & 0xFF);
          break;
        case 1:
          s.resize(pick(s.size()));
          break;
        case 2:
          s.insert(pick(s.size()), std::string(1 + pick(8), static_cast<char>(rng_() & 0xFF)));
          break;
        case 3: {
          const size_t at = pick(s.size()), n = pick(std::min<size_t>(64, s.size() - at));
          s.insert(pick(s.size()), s.substr(at, n));
          break;
        }
        default: {
          static const char* numbers[] = {
              "-1", "0", "1e308", "9223372036854775807", "-9223372036854775808", "1e-300", "nan"};
          s.insert(pick(s.size()), numbers[pick(7)]);
        }
      }
    }
    return s;
  }

  /// Structure-aware: a leaf of the JSON tree replaced by an extreme value, a key dropped or retyped.
  json value(json j, int depth = 0) {
    if (j.is_object() && !j.empty() && depth < 6) {
      auto it = j.begin();
      std::advance(it, static_cast<std::ptrdiff_t>(pick(j.size())));
      if (pick(8) == 0) {
        j.erase(it.key());
      } else {
        *it = value(*it, depth + 1);
      }
      return j;
    }
    if (j.is_array() && !j.empty() && depth < 6) {
      const size_t i = pick(j.size());
      j[i] = value(j[i], depth + 1);
      return j;
    }
    static const std::vector<json> extremes = {
        -1,   0,  1,        1000000000, int64_t{1} << 40, -(int64_t{1} << 40), 1e308,
        -0.5, "", "\u00fc", nullptr,    json::array(),    json::object(),      true};
    return extremes[pick(extremes.size())];
  }

 private:
  std::mt19937_64 rng_;
};

/// Runs `load` and accepts success or an exception (mdl's, or the standard library's for an impossible
/// allocation); anything else, a crash, fails the test.
template <class F>
bool loads(F load) {
  try {
    load();
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

/// `n` mutations, or $MDL_FUZZ_SCALE times as many (a longer run by hand: MDL_FUZZ_SCALE=50); the seed
/// moves with $MDL_FUZZ_SEED.
int scaled(int n) {
  const char* s = std::getenv("MDL_FUZZ_SCALE");
  return s ? n * std::max(1, std::atoi(s)) : n;
}
uint64_t fuzz_seed(uint64_t n) {
  const char* s = std::getenv("MDL_FUZZ_SEED");
  return s ? n + 1000 * static_cast<uint64_t>(std::atoll(s)) : n;
}

TEST(FileFuzz, MutatedSafetensorsLoadOrFailCleanly) {
  test::TempDir dir;
  io::save_safetensors(dir / "seed.safetensors",
                       {{"a", at::arange(12, at::kFloat).view({3, 4})},
                        {"b", at::ones({5}, at::kHalf)},
                        {"c", at::tensor(std::vector<int64_t>{1, 2, 3})}},
                       {{"format", "pt"}});
  const std::string seed = test::read_file(dir / "seed.safetensors");
  const uint64_t header = *reinterpret_cast<const uint64_t*>(seed.data());
  const json seed_header = json::parse(seed.substr(8, header));
  Mutator m(fuzz_seed(1));
  int loaded = 0;
  for (int i = 0; i < scaled(300); ++i) {
    std::string bytes;
    if (i % 2) {
      bytes = m.bytes(seed);
    } else {  // a structurally mutated header over the same data
      const std::string h = m.value(seed_header).dump(-1, ' ', false, json::error_handler_t::replace);
      const uint64_t n = h.size();
      bytes = std::string(reinterpret_cast<const char*>(&n), 8) + h + seed.substr(8 + header);
    }
    const std::string file = dir / "x.safetensors";
    test::write_file(file, bytes);
    loaded += loads([&] {
      for (const auto& [name, t] : io::load_safetensors(file))
        (void)t.to(at::kDouble).sum().item<double>();  // touch every byte
    });
  }
  std::printf("[fuzz] safetensors: %d of %d mutations loaded\n", loaded, scaled(300));
}

TEST(FileFuzz, MutatedConfigsAndTokenizersParseOrFailCleanly) {
  const std::string src = test::tiny_checkpoint("llama");
  const std::string config = test::read_file(src + "/config.json"),
                    tokenizer = test::read_file(src + "/tokenizer.json");
  const json config_json = json::parse(config), tokenizer_json = json::parse(tokenizer);
  Mutator m(fuzz_seed(2));
  int configs = 0, tokenizers = 0;
  for (int i = 0; i < scaled(300); ++i) {
    const std::string c = i % 2 ? m.bytes(config) : m.value(config_json).dump();
    configs += loads([&] { parse_model_config(c, "config.json"); });
  }
  for (int i = 0; i < scaled(200); ++i) {
    const std::string t = i % 2
                              ? m.bytes(tokenizer)
                              : m.value(tokenizer_json).dump(-1, ' ', false, json::error_handler_t::replace);
    tokenizers += loads([&] {
      const Tokenizer tok = Tokenizer::from_json(t, "tokenizer.json");
      const auto ids = tok.encode("the cat sat on the mat, ünïcödé 🙂");
      tok.decode(ids);
      tok.stable_length(ids, tok.decode(ids));
    });
  }
  std::printf("[fuzz] configs: %d of %d parsed; tokenizers: %d of %d loaded\n", configs, scaled(300),
              tokenizers, scaled(200));
}

// A whole checkpoint directory with a mutated config.json: whatever it says, load_model refuses it or
// builds a model no larger than what the file could describe.
TEST(FileFuzz, MutatedCheckpointConfigsNeverAllocateBeyondTheFile) {
  const std::string src = test::tiny_checkpoint("llama");
  test::TempDir dir;
  const std::string ckpt = dir / "ckpt";
  fs::create_directories(ckpt);
  fs::copy_file(src + "/model.safetensors", ckpt + "/model.safetensors");
  const json config = json::parse(test::read_file(src + "/config.json"));
  Mutator m(fuzz_seed(3));
  const long before = test::peak_rss_kib();
  int loaded = 0;
  for (int i = 0; i < scaled(200); ++i) {
    test::write_file(ckpt + "/config.json", m.value(config).dump());
    loaded += loads([&] {
      Model model = load_model(ckpt);
      torch::NoGradGuard g;
      ModelInput in;
      in.input_ids = at::arange(1, 5, at::kLong).view({1, -1});
      model->forward(in);
    });
  }
  std::printf("[fuzz] checkpoint configs: %d of %d loaded and ran\n", loaded, scaled(200));
  EXPECT_LT(test::peak_rss_kib() - before, 300 * 1024)
      << "a mutated config allocated far beyond its checkpoint";
}

}  // namespace
}  // namespace mdl
