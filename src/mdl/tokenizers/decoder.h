// Decoders of tokenizer.json ("decoder"): ByteLevel, WordPiece, Metaspace, Replace, ByteFallback, Fuse,
// Strip, BPEDecoder and Sequence. Each rewrites the list of token strings (HF's decode_chain).
#pragma once

#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

namespace mdl {

/// Turns token strings back into text pieces.
class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual void decode_chain(std::vector<std::string>& tokens) const = 0;
};

/// The byte of a byte-fallback token ("<0x41>" -> 0x41), or -1 for any other token.
int byte_fallback_value(const std::string& token);

/// Builds the decoder described by `j` (null: none, tokens are concatenated).
std::unique_ptr<Decoder> make_decoder(const nlohmann::json& j);

}  // namespace mdl
