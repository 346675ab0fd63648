// Training data from files: JSONL records of four shapes, and IDX image files (MNIST, Fashion-MNIST),
// gzip read directly. Each JSONL example may carry a `task` and a `language`.
//   classification  {"text": str, "label": str | int}
//   tagging         {"tokens": [str], "tags": [str | int]}        (a label per word; sub-tokens after the
//                                                                   first of a word get -100, as HF does)
//   instruction     {"prompt": str, "completion": str}            (loss on the completion only)
//   text            {"text": str}                                  (causal LM on every token)
// A bad record (invalid JSON, a missing or mistyped field, an unknown label) is an error naming the file,
// the line and the field, or, with on_bad_record = skip, a warning and a count.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace mdl {

class Tokenizer;

/// One tokenised example.
struct Example {
  std::vector<int64_t> ids;      ///< token ids
  std::vector<int64_t> targets;  ///< per-token targets (-100: no loss) for tagging, instruction, text
  int64_t label = -1;            ///< classification label index
  int64_t image = -1;            ///< row of Dataset::images (vision data); -1 for text
  std::string task, language;    ///< optional routing context
  int64_t line = 0;              ///< 1-based line in the file
};

/// How to read a JSONL file.
struct DatasetOptions {
  std::string kind = "classification";  ///< classification | tagging | instruction | text
  std::string on_bad_record = "fail";   ///< fail | skip
  int64_t max_length = 512;             ///< longer examples are truncated
  std::vector<std::string> labels;  ///< label names in index order; empty: collected in order of appearance
};

/// A loaded dataset.
struct Dataset {
  std::vector<Example> examples;
  std::vector<std::string> labels;     ///< label names, index = label id
  std::vector<std::string> tasks;      ///< distinct tasks in order of appearance
  std::vector<std::string> languages;  ///< distinct languages in order of appearance (ids in batches)
  at::Tensor images;                   ///< (N, C, H, W) float images the examples index (vision data)
  int64_t skipped = 0;                 ///< bad records skipped
};

/// An image classification dataset: `images` (N, H, W) or (N, C, H, W), uint8 (scaled to [0, 1]) or
/// float, with `labels` (N) integer class ids indexing `label_names`; every example gets `task`.
Dataset image_dataset(const at::Tensor& images, const at::Tensor& labels,
                      std::vector<std::string> label_names, const std::string& task = "");

/// Reads and tokenises a JSONL file.
Dataset load_jsonl(const std::string& path, const Tokenizer& tokenizer, const DatasetOptions& options);
/// The JSONL fields each data kind reads, as help text (`mdl train --help-config`).
std::string data_kinds_help();

/// An IDX file (optionally gzipped: MNIST's *-ubyte.gz), as a uint8 / int8 / int16 / int32 / float /
/// double tensor of its declared shape. Corrupt headers and short data are errors naming the file.
at::Tensor read_idx(const std::string& path);

/// Multi-task sampling probabilities from per-task sizes: proportional (n_i / sum), temperature
/// (n_i^(1/T) normalised; T = 1 is proportional, large T approaches uniform) or uniform.
std::vector<double> task_sampling_probabilities(const std::vector<int64_t>& sizes, const std::string& kind,
                                                double temperature = 1.0);

}  // namespace mdl
