// UTF-8 and Unicode helpers for the tokenizers (utf8proc underneath).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mdl::unicode {

/// Splits UTF-8 text into code points; invalid bytes become U+FFFD.
std::vector<char32_t> decode(const std::string& text);
/// Encodes one code point / a sequence as UTF-8.
std::string encode(char32_t cp);
std::string encode(const std::vector<char32_t>& cps);
/// Splits UTF-8 text into one string per code point.
std::vector<std::string> chars(const std::string& text);
/// `text` with each byte that is not part of valid UTF-8 replaced by U+FFFD: always valid UTF-8.
std::string valid_utf8(const std::string& text);
/// The largest m <= n that is a character boundary of `text` (not inside a multi-byte sequence).
size_t char_boundary(const std::string& text, size_t n);

bool is_whitespace(char32_t cp);   ///< \s in the Unicode sense (Z categories, \t \n \v \f \r, U+0085)
bool is_control(char32_t cp);      ///< C categories other than \t \n \r
bool is_punctuation(char32_t cp);  ///< ASCII non-alphanumeric symbols or a Unicode P category (BERT's rule)
bool is_cjk(char32_t cp);          ///< CJK ideographs (BERT pads them with spaces)
bool is_digit(char32_t cp);        ///< Unicode N categories
bool is_mark_nonspacing(char32_t cp);  ///< Mn (accents after NFD)

/// Normalisation forms "NFC", "NFD", "NFKC", "NFKD".
std::string normalize(const std::string& text, const std::string& form);
/// Unicode lowercase.
std::string lowercase(const std::string& text);
/// NFD, then drop non-spacing marks.
std::string strip_accents(const std::string& text);

/// GPT-2's byte -> printable code point table (bytes that print map to themselves).
const std::vector<char32_t>& bytes_to_unicode();
/// Inverse of bytes_to_unicode; -1 for code points that are not byte images.
int unicode_to_byte(char32_t cp);

}  // namespace mdl::unicode
