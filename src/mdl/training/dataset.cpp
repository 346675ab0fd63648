#include "mdl/training/dataset.h"

#include <ATen/ATen.h>
#include <zlib.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/core/log.h"
#include "mdl/tokenizers/tokenizer.h"

namespace mdl {
namespace {

using nlohmann::json;

const json& field(const json& j, const char* name, json::value_t type, const std::string& where) {
  MDL_CHECK(j.contains(name), where, "missing field '", name, "'");
  const json& f = j[name];
  const bool ok = type == json::value_t::number_integer ? f.is_number_integer() : f.type() == type;
  MDL_CHECK(ok, where, "field '", name, "' must be ",
            type == json::value_t::string  ? "a string"
            : type == json::value_t::array ? "an array"
                                           : "an integer",
            ", found ", f.type_name());
  return f;
}

int64_t label_index(const json& v, std::vector<std::string>& names, bool fixed, const std::string& where) {
  if (v.is_number_integer()) {
    // Integer labels are class ids: the table of names grows to the largest, so it is bounded.
    constexpr int64_t kMaxClasses = int64_t{1} << 16;
    const int64_t i = v.get<int64_t>();
    MDL_CHECK(i >= 0 && (!fixed || i < static_cast<int64_t>(names.size())) && i < kMaxClasses, where,
              "label ", i, " out of range",
              fixed ? " (" + std::to_string(names.size()) + " labels)"
                    : "; integer labels are class ids in 0.." + std::to_string(kMaxClasses - 1) +
                          " (name the labels, or give the label set: data.labels)");
    while (!fixed && static_cast<int64_t>(names.size()) <= i) names.push_back(std::to_string(names.size()));
    return i;
  }
  MDL_CHECK(v.is_string(), where, "a label must be a string or an integer, found ", v.type_name());
  const std::string s = v.get<std::string>();
  for (size_t i = 0; i < names.size(); ++i)
    if (names[i] == s) return static_cast<int64_t>(i);
  MDL_CHECK(!fixed, where, "unknown label '", s, "'; the labels are given and do not include it");
  names.push_back(s);
  return static_cast<int64_t>(names.size()) - 1;
}

Example parse(const json& j, const Tokenizer& tok, const DatasetOptions& o, Dataset& d,
              const std::string& where) {
  MDL_CHECK(j.is_object(), where, "a record must be a JSON object, found ", j.type_name());
  Example e;
  const bool fixed = !o.labels.empty();
  if (o.kind == "classification") {
    e.ids = tok.encode(field(j, "text", json::value_t::string, where).get<std::string>());
    MDL_CHECK(j.contains("label"), where, "missing field 'label'");
    e.label = label_index(j["label"], d.labels, fixed, where);
  } else if (o.kind == "text") {
    e.ids = tok.encode(field(j, "text", json::value_t::string, where).get<std::string>());
    e.targets = e.ids;
  } else if (o.kind == "instruction") {
    std::vector<int64_t> prompt =
        tok.encode(field(j, "prompt", json::value_t::string, where).get<std::string>());
    std::vector<int64_t> completion =
        tok.encode(field(j, "completion", json::value_t::string, where).get<std::string>(), false);
    e.ids = prompt;
    e.ids.insert(e.ids.end(), completion.begin(), completion.end());
    e.targets.assign(prompt.size(), -100);
    e.targets.insert(e.targets.end(), completion.begin(), completion.end());
  } else {  // tagging
    const json& tokens = field(j, "tokens", json::value_t::array, where);
    const json& tags = field(j, "tags", json::value_t::array, where);
    MDL_CHECK(tokens.size() == tags.size(), where, "'tokens' has ", tokens.size(), " entries but 'tags' has ",
              tags.size());
    for (size_t w = 0; w < tokens.size(); ++w) {
      MDL_CHECK(tokens[w].is_string(), where, "tokens[", w, "] must be a string");
      const int64_t tag = label_index(tags[w], d.labels, fixed, where);
      std::vector<int64_t> pieces = tok.encode((w ? " " : "") + tokens[w].get<std::string>(), false);
      for (size_t p = 0; p < pieces.size(); ++p)
        e.ids.push_back(pieces[p]), e.targets.push_back(p == 0 ? tag : -100);
    }
  }
  if (j.contains("task")) {
    e.task = field(j, "task", json::value_t::string, where).get<std::string>();
    if (std::find(d.tasks.begin(), d.tasks.end(), e.task) == d.tasks.end()) d.tasks.push_back(e.task);
  }
  if (j.contains("language")) {
    e.language = field(j, "language", json::value_t::string, where).get<std::string>();
    if (std::find(d.languages.begin(), d.languages.end(), e.language) == d.languages.end())
      d.languages.push_back(e.language);
  }
  MDL_CHECK(!e.ids.empty(), where, "the record encodes to no tokens");
  if (static_cast<int64_t>(e.ids.size()) > o.max_length) {
    e.ids.resize(static_cast<size_t>(o.max_length));
    if (!e.targets.empty()) e.targets.resize(static_cast<size_t>(o.max_length));
  }
  return e;
}

}  // namespace

Dataset load_jsonl(const std::string& path, const Tokenizer& tokenizer, const DatasetOptions& o) {
  MDL_CHECK(o.kind == "classification" || o.kind == "tagging" || o.kind == "instruction" || o.kind == "text",
            "[data] kind '", o.kind, "' is unknown; expected classification, tagging, instruction or text");
  MDL_CHECK(o.on_bad_record == "fail" || o.on_bad_record == "skip",
            "[data] on_bad_record must be fail or skip, got '", o.on_bad_record, "'");
  std::ifstream in(path);
  MDL_CHECK(in.good(), "[data] cannot read '", path, "'");
  Dataset d;
  d.labels = o.labels;
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = "[data] " + path + ":" + std::to_string(n) + ": ";
    try {
      json j;
      try {
        j = json::parse(line);
      } catch (const json::exception& e) {
        MDL_FAIL(where, "invalid JSON (", e.what(), ")");
      }
      Example e = parse(j, tokenizer, o, d, where);
      e.line = n;
      d.examples.push_back(std::move(e));
    } catch (const Error& e) {
      if (o.on_bad_record == "fail") throw;
      ++d.skipped;
      log_warn(std::string(e.what()) + " (skipped)");
    }
  }
  MDL_CHECK(!d.examples.empty(), "[data] '", path, "' has no usable records",
            d.skipped ? " (all were bad and skipped)" : "");
  return d;
}

std::string data_kinds_help() {
  return "JSONL records, one per line, by data.kind:\n"
         "  classification  {\"text\": str, \"label\": str | int}     a class per text (names in order of "
         "first\n"
         "                  appearance unless data.labels lists them; saved with the trained modules)\n"
         "  tagging         {\"tokens\": [str], \"tags\": [str | int]}  a tag per word\n"
         "  instruction     {\"prompt\": str, \"completion\": str}   the loss on the completion's tokens "
         "only\n"
         "  text            {\"text\": str}                           causal-LM loss on every token\n"
         "  any kind may add \"task\": str and \"language\": str, the routing context of the example\n"
         "  (options.routing.by_task / by_language, task-routed modules, multi-task sampling)\n";
}

Dataset image_dataset(const at::Tensor& images, const at::Tensor& labels,
                      std::vector<std::string> label_names, const std::string& task) {
  MDL_CHECK(images.dim() == 3 || images.dim() == 4, "[data] images must be (N, H, W) or (N, C, H, W), got ",
            images.sizes());
  MDL_CHECK(labels.dim() == 1 && labels.size(0) == images.size(0), "[data] ", images.size(0),
            " images need as many labels, got labels of shape ", labels.sizes());
  Dataset d;
  at::Tensor x = images.dim() == 3 ? images.unsqueeze(1) : images;
  d.images = x.scalar_type() == at::kByte ? x.to(at::kFloat).div_(255.0) : x.to(at::kFloat).contiguous();
  at::Tensor y = labels.to(at::kLong).contiguous();
  const int64_t n = y.numel(), classes = static_cast<int64_t>(label_names.size());
  const int64_t* yp = y.data_ptr<int64_t>();
  d.labels = std::move(label_names);
  if (!task.empty()) d.tasks = {task};
  d.examples.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    MDL_CHECK(yp[i] >= 0 && yp[i] < classes, "[data] image ", i, " has label ", yp[i], "; expected 0..",
              classes - 1);
    Example e;
    e.label = yp[i];
    e.image = i;
    e.task = task;
    e.line = i + 1;
    d.examples.push_back(std::move(e));
  }
  return d;
}

at::Tensor read_idx(const std::string& path) {
  gzFile f = gzopen(path.c_str(), "rb");  // reads plain files too
  MDL_CHECK(f != nullptr, "[idx] cannot open '", path, "'");
  struct Closer {
    gzFile f;
    ~Closer() { gzclose(f); }
  } closer{f};
  unsigned char magic[4];
  MDL_CHECK(gzread(f, magic, 4) == 4, "[idx] '", path, "' is shorter than the 4-byte magic number");
  MDL_CHECK(magic[0] == 0 && magic[1] == 0, "[idx] '", path,
            "' does not start with an IDX magic number (0x00 0x00 type dims)");
  at::ScalarType type;
  size_t size = 0;
  switch (magic[2]) {
    case 0x08:
      type = at::kByte, size = 1;
      break;
    case 0x09:
      type = at::kChar, size = 1;
      break;
    case 0x0B:
      type = at::kShort, size = 2;
      break;
    case 0x0C:
      type = at::kInt, size = 4;
      break;
    case 0x0D:
      type = at::kFloat, size = 4;
      break;
    case 0x0E:
      type = at::kDouble, size = 8;
      break;
    default:
      MDL_FAIL("[idx] '", path, "': unknown element type 0x", std::hex, static_cast<int>(magic[2]));
  }
  const int dims = magic[3];
  MDL_CHECK(dims >= 1 && dims <= 8, "[idx] '", path, "': ", dims, " dimensions; expected 1 to 8");
  std::vector<int64_t> shape;
  int64_t count = 1;
  for (int i = 0; i < dims; ++i) {
    unsigned char b[4];
    MDL_CHECK(gzread(f, b, 4) == 4, "[idx] '", path, "': the header ends inside dimension ", i);
    const int64_t n = (int64_t(b[0]) << 24) | (int64_t(b[1]) << 16) | (int64_t(b[2]) << 8) | int64_t(b[3]);
    shape.push_back(n);
    count *= n;
  }
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(type));
  const size_t bytes = static_cast<size_t>(count) * size;
  auto* p = static_cast<char*>(t.data_ptr());
  size_t done = 0;
  while (done < bytes) {
    const int n = gzread(f, p + done, static_cast<unsigned>(std::min<size_t>(bytes - done, 1u << 30)));
    MDL_CHECK(n > 0, "[idx] '", path, "': data ends after ", done, " of ", bytes, " bytes (shape ",
              shape_str(shape), ")");
    done += static_cast<size_t>(n);
  }
  if (size > 1) {  // IDX is big-endian
    for (size_t i = 0; i < bytes; i += size) std::reverse(p + i, p + i + size);
  }
  return t;
}

std::vector<double> task_sampling_probabilities(const std::vector<int64_t>& sizes, const std::string& kind,
                                                double temperature) {
  MDL_CHECK(!sizes.empty(), "[sampling] no tasks");
  MDL_CHECK(kind == "proportional" || kind == "temperature" || kind == "uniform", "[sampling] kind '", kind,
            "' is unknown; expected proportional, temperature or uniform");
  MDL_CHECK(temperature > 0, "[sampling] temperature must be > 0, got ", temperature);
  std::vector<double> p;
  double total = 0;
  for (int64_t n : sizes) {
    MDL_CHECK(n > 0, "[sampling] every task needs examples; one has ", n);
    const double w = kind == "uniform"
                         ? 1.0
                         : std::pow(static_cast<double>(n), kind == "temperature" ? 1.0 / temperature : 1.0);
    p.push_back(w);
    total += w;
  }
  for (double& v : p) v /= total;
  return p;
}

}  // namespace mdl
