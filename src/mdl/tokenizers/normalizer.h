// Normalizers of tokenizer.json ("normalizer"): NFC/NFD/NFKC/NFKD, Lowercase, Strip, StripAccents,
// Replace, Prepend, BertNormalizer and Sequence.
#pragma once

#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>

namespace mdl {

/// Rewrites text before pre-tokenisation.
class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual std::string normalize(const std::string& text) const = 0;
};

/// Builds the normalizer described by `j` (null: none, returns nullptr); throws naming unknown types.
std::unique_ptr<Normalizer> make_normalizer(const nlohmann::json& j);

}  // namespace mdl
