// The demo's report: report.md and report.html with every table and figure of results.json, and the
// expected directions stated as holding or not (a figure is never hidden).
#include <cmath>
#include <filesystem>
#include <sstream>

#include "mdl/demo/demo_context.h"
#include "mdl/io/atomic_file.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace mdl::demo {
namespace {

std::string pct(const json& v) {
  if (!v.is_number()) return "–";
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f%%", 100.0 * v.get<double>());
  return buf;
}

std::string num(const json& v, const char* format = "%.2f") {
  if (!v.is_number()) return "–";
  char buf[48];
  std::snprintf(buf, sizeof(buf), format, v.get<double>());
  return buf;
}

/// A table as Markdown and as HTML at once.
struct Table {
  std::vector<std::string> header;
  std::vector<std::vector<std::string>> rows;
  std::string markdown() const {
    std::ostringstream o;
    o << "|";
    for (const auto& h : header) o << " " << h << " |";
    o << "\n|";
    for (size_t i = 0; i < header.size(); ++i) o << (i ? " ---: |" : " --- |");
    o << "\n";
    for (const auto& r : rows) {
      o << "|";
      for (const auto& c : r) o << " " << c << " |";
      o << "\n";
    }
    return o.str();
  }
  std::string html() const {
    std::ostringstream o;
    o << "<table><tr>";
    for (const auto& h : header) o << "<th>" << h << "</th>";
    o << "</tr>\n";
    for (const auto& r : rows) {
      o << "<tr>";
      for (const auto& c : r) o << "<td>" << c << "</td>";
      o << "</tr>\n";
    }
    o << "</table>\n";
    return o.str();
  }
};

/// One section: a title, paragraphs, tables and the figures recorded for it.
struct Section {
  std::string key, title;
  std::vector<std::string> text;
  std::vector<Table> tables;
};

std::vector<Section> sections(const json& r) {
  std::vector<Section> out;
  if (r.contains("vision_backbone")) {
    const json& v = r["vision_backbone"];
    Section s{"vision_backbone", "1. Vision backbone: a small ViT on Fashion-MNIST", {}, {}};
    s.text.push_back(
        "A `ViTForImageClassification` (Hugging Face layout: it loads, saves and takes modules like the "
        "other "
        "backbones), trained from scratch" +
        std::string(v["cached"].get<bool>() ? " (loaded from the cache)" : "") + ".");
    s.tables.push_back(
        {{"parameters", "pretraining steps", "training images", "test accuracy", "seconds"},
         {{std::to_string(v["parameters"].get<int64_t>()), std::to_string(v["pretrain_steps"].get<int64_t>()),
           std::to_string(v["pretrain_examples"].get<int64_t>()), pct(v["test_accuracy"]),
           num(v["pretrain_seconds"], "%.1f")}}});
    out.push_back(s);
  }
  if (r.contains("transfer")) {
    Section s{"transfer", "2. Transfer to handwritten digits", {}, {}};
    s.text.push_back("The Fashion-MNIST ViT adapted to MNIST digits (" +
                     std::to_string(r["transfer"]["train_examples"].get<int64_t>()) + " training, " +
                     std::to_string(r["transfer"]["test_examples"].get<int64_t>()) +
                     " test images). The linear probe is a full-rank LoRA on the classifier, so it is saved "
                     "as a module too.");
    Table t{{"method", "accuracy", "trainable parameters", "% of the model", "seconds"}, {}};
    for (const auto& m : r["transfer"]["methods"])
      t.rows.push_back({m["method"].get<std::string>(), pct(m["accuracy"]),
                        std::to_string(m["trainable_parameters"].get<int64_t>()), num(m["trainable_percent"]),
                        num(m["seconds"], "%.1f")});
    s.tables.push_back(t);
    out.push_back(s);
  }
  if (r.contains("continual")) {
    const json& c = r["continual"];
    Section s{"continual", "3. Continual learning: five two-class tasks in sequence", {}, {}};
    s.text.push_back(
        "Fashion-MNIST split into five tasks of two classes each, labelled 0/1 within the task, learned one "
        "after the other. Accuracy of each task's decision at the end; forgetting = mean drop from right "
        "after "
        "learning a task to the end.");
    Table t{{"", "task 1", "task 2", "task 3", "task 4", "task 5", "mean", "forgetting"}, {}};
    auto row = [&](const std::string& name, const json& v, const json& mean, const json& forgetting) {
      std::vector<std::string> cells = {name};
      for (const auto& x : v) cells.push_back(pct(x));
      cells.push_back(pct(mean));
      cells.push_back(pct(forgetting));
      t.rows.push_back(cells);
    };
    row("backbone alone (no training)", c["backbone_alone"], json(), json());
    row("a module per task", c["modules"]["final"], c["modules"]["final_mean"], c["modules"]["forgetting"]);
    row("sequential full fine-tuning", c["sequential_full_ft"]["final"],
        c["sequential_full_ft"]["final_mean"], c["sequential_full_ft"]["forgetting"]);
    s.tables.push_back(t);
    Table m{{"after learning", "task 1", "task 2", "task 3", "task 4", "task 5"}, {}};
    const json& acc = c["sequential_full_ft"]["accuracy_after_each_task"];
    for (size_t k = 0; k < acc.size(); ++k) {
      std::vector<std::string> cells = {"task " + std::to_string(k + 1) + " (full FT)"};
      for (const auto& x : acc[k]) cells.push_back(pct(x));
      m.rows.push_back(cells);
    }
    s.tables.push_back(m);
    out.push_back(s);
  }
  if (r.contains("polytropon")) {
    const json& p = r["polytropon"];
    Section s{"polytropon", "4. Multi-task routing: Polytropon", {}, {}};
    s.text.push_back(
        "The same five tasks learned jointly. Their labels conflict (0/1 means something else in each task), "
        "so one shared module cannot serve them all; Polytropon routes each task to a learned mix of " +
        std::to_string(p["skills"].get<int64_t>()) + " skill LoRAs.");
    Table t{{"", "task 1", "task 2", "task 3", "task 4", "task 5", "mean"}, {}};
    std::vector<std::string> a = {"Polytropon"}, b = {"one shared LoRA"};
    for (const auto& x : p["accuracy"]) a.push_back(pct(x));
    for (const auto& x : p["shared_lora_accuracy"]) b.push_back(pct(x));
    a.push_back(pct(p["mean_accuracy"])), b.push_back(pct(p["shared_lora_mean_accuracy"]));
    t.rows = {a, b};
    s.tables.push_back(t);
    out.push_back(s);
  }
  if (r.contains("moe")) {
    const json& m = r["moe"];
    Section s{"moe", "5. Mixture of experts: the ViT upcycled", {}, {}};
    s.text.push_back(
        "Every MLP copied into 4 experts behind a new top-2 router (sparse upcycling), then fine-tuned on "
        "the "
        "digits with a load-balancing loss (0.01); compared with the dense model's full fine-tuning.");
    Table t{{"model", "digits accuracy", "parameters"}, {}};
    t.rows.push_back({"upcycled, before fine-tuning", pct(m["accuracy_before_training"]),
                      std::to_string(m["parameters"].get<int64_t>())});
    t.rows.push_back({"upcycled top-2-of-4, fine-tuned", pct(m["accuracy"]),
                      std::to_string(m["parameters"].get<int64_t>())});
    t.rows.push_back({"dense, fully fine-tuned", pct(m["dense_accuracy"]), "–"});
    s.tables.push_back(t);
    Table l{{"layer", "expert 0", "expert 1", "expert 2", "expert 3"}, {}};
    for (size_t i = 0; i < m["expert_load"].size(); ++i) {
      std::vector<std::string> cells = {std::to_string(i)};
      for (const auto& x : m["expert_load"][i]) cells.push_back(pct(x));
      l.rows.push_back(cells);
    }
    s.tables.push_back(l);
    out.push_back(s);
  }
  if (r.contains("merging")) {
    Section s{"merging", "6. Merging task modules", {}, {}};
    s.text.push_back(
        "Five LoRAs on the attention (query, value), each trained on one pair of digits (0/1, 2/3, ...) "
        "under "
        "the shared digits head of experiment 2 (the linear probe), merged into one module; each pair's "
        "accuracy (the decision between its two digits) with the merged module, its own module and the head "
        "alone, and accuracy on all ten digits.");
    Table t{{"module", "0/1", "2/3", "4/5", "6/7", "8/9", "mean", "10-way"}, {}};
    for (const auto& m : r["merging"]["methods"]) {
      std::vector<std::string> cells = {m["method"].get<std::string>()};
      for (const auto& x : m["task_accuracy"]) cells.push_back(pct(x));
      cells.push_back(pct(m["mean_task_accuracy"]));
      cells.push_back(m.contains("ten_way_accuracy") ? pct(m["ten_way_accuracy"]) : "–");
      t.rows.push_back(cells);
    }
    s.tables.push_back(t);
    out.push_back(s);
  }
  if (r.contains("crosslingual")) {
    const json& c = r["crosslingual"];
    Section s{"crosslingual", "7. Cross-lingual transfer (MAD-X)", {}, {}};
    s.text.push_back(
        "A small Llama-style decoder pretrained here on fortune cookies in eight languages (perplexity " +
        num(c["pretrain"]["perplexity"], "%.1f") +
        " on held-out text), a language adapter per language "
        "(LM objective), and a task adapter trained on English pairs only, stacked on the English adapter. "
        "Task: " +
        c["task"]["name"].get<std::string>() +
        ". A pair counts as right when the model finds the original "
        "more likely. Zero-shot accuracy per language: the decoder alone, and the task adapter with no "
        "language adapter, on the English adapter, and on the language's own adapter (MAD-X).");
    Table p{{"language", "perplexity, backbone", "perplexity, with its adapter"}, {}};
    for (const auto& l : c["language_model_perplexity"])
      p.rows.push_back({l["language"].get<std::string>(), num(l["backbone"], "%.1f"),
                        num(l["with_language_adapter"], "%.1f")});
    s.tables.push_back(p);
    Table t{{"language", "test pairs", "decoder alone", "task adapter, no language adapter",
             "on the English adapter", "MAD-X (own adapter)"},
            {}};
    for (const auto& l : c["languages"])
      t.rows.push_back({l["language"].get<std::string>(), std::to_string(l["test_pairs"].get<int64_t>()),
                        pct(l["backbone_alone"]), pct(l["no_language_adapter"]), pct(l["english_adapter"]),
                        pct(l["madx"])});
    s.tables.push_back(t);
    out.push_back(s);
  }
  if (r.contains("moduleformer")) {
    const json& m = r["moduleformer"];
    Section s{"moduleformer", "8. ModuleFormer: routing, new experts, pruning", {}, {}};
    s.text.push_back(
        "A character-level ModuleFormer (mixtures of attention heads and MLP experts, top-2 of " +
        std::to_string(m["pruning"]["of"].get<int64_t>()) +
        " each, stick-breaking attention) trained by mdl on the bytes of English fortunes, then German "
        "ones. H(e|x) is the mean entropy of a token's routing (low: sure), H(e) the entropy of the experts' "
        "mean use (high: even; at most log E = " +
        num(m["log_experts"], "%.2f") + ").");
    Table aux{{"aux loss", "weight", "validation loss", "H(e|x)", "H(e)"}, {}};
    for (const auto& a : m["aux_losses"])
      aux.rows.push_back({a["aux"].get<std::string>(), num(a["weight"], "%.2f"), num(a["valid_loss"], "%.3f"),
                          num(a["h_e_given_x"], "%.3f"), num(a["h_e"], "%.3f")});
    const json& d = m["dense_baseline"];
    aux.rows.push_back({"dense (same active size)", "–", num(d["valid_loss"], "%.3f"), "–", "–"});
    s.tables.push_back(aux);
    Table size{{"model", "parameters", "active per token", "tokens/s (inference)"}, {}};
    size.rows.push_back({"ModuleFormer (MI)", std::to_string(d["moduleformer_parameters"].get<int64_t>()),
                         std::to_string(d["moduleformer_active_parameters"].get<int64_t>()),
                         num(d["moduleformer_tokens_per_second"], "%.0f")});
    size.rows.push_back({"dense", std::to_string(d["parameters"].get<int64_t>()),
                         std::to_string(d["parameters"].get<int64_t>()),
                         num(d["tokens_per_second"], "%.0f")});
    s.tables.push_back(size);
    const json &mf = m["continual"]["moduleformer"], &dn = m["continual"]["dense"];
    Table c{
        {"continual learning on German", "English before", "English after", "German before", "German after"},
        {}};
    c.rows.push_back({"+" + std::to_string(m["continual"]["added_experts_per_mixture"].get<int64_t>()) +
                          " experts per mixture, old frozen (" +
                          std::to_string(mf["trained_parameters"].get<int64_t>()) + " weights trained)",
                      num(mf["english_before"], "%.3f"), num(mf["english_after"], "%.3f"),
                      num(mf["german_before"], "%.3f"), num(mf["german_after"], "%.3f")});
    c.rows.push_back({"dense, fine-tuned whole", num(dn["english_before"], "%.3f"),
                      num(dn["english_after"], "%.3f"), num(dn["german_before"], "%.3f"),
                      num(dn["german_after"], "%.3f")});
    s.tables.push_back(c);
    const json& p = m["pruning"];
    Table pr{{"MLP experts per layer", "German validation loss", "parameters", "tokens/s"}, {}};
    pr.rows.push_back({"all " + std::to_string(p["of"].get<int64_t>()) + " (after concentration fine-tuning)",
                       num(p["german_before_pruning"], "%.3f"),
                       std::to_string(p["parameters_before"].get<int64_t>()),
                       num(p["tokens_per_second_before"], "%.0f")});
    pr.rows.push_back({std::to_string(p["kept_per_layer"].get<int64_t>()) + " most used",
                       num(p["german_most_used"], "%.3f"),
                       std::to_string(p["parameters_after"].get<int64_t>()),
                       num(p["tokens_per_second_after"], "%.0f")});
    pr.rows.push_back({std::to_string(p["kept_per_layer"].get<int64_t>()) + " random",
                       num(p["german_random"], "%.3f"), std::to_string(p["parameters_after"].get<int64_t>()),
                       "–"});
    s.tables.push_back(pr);
    out.push_back(s);
  }
  if (r.contains("modularity")) {
    const json& m = r["modularity"];
    Section s{"modularity", "9. Is a modular architecture enough? (rule data)", {}, {}};
    s.text.push_back(
        "Data with R known rules: y = alpha_c a + beta_c b, the rule c given as a one-hot; L1 loss, in "
        "distribution and with a, b doubled. Four families share the encoders and the decoder: monolithic, "
        "modular (each module scores itself), modular-op (routing from the rule's encoding only) and "
        "GT-modular (routing by the true rule); " +
        std::to_string(m["steps"].get<int64_t>()) + " Adam steps of " +
        std::to_string(m["batch"].get<int64_t>()) + " samples, the mean of " +
        std::to_string(m["seeds"].get<int64_t>()) +
        " seeds. Specialisation metrics of the routing (lower is better; GT-modular scores 0): collapse-avg, "
        "collapse-worst, inverse MI, alignment (Hungarian), adaptation; the random-routing row is what "
        "uniform "
        "routing scores.");
    Table t{{"R", "family", "ID loss", "OoD loss", "collapse-avg", "collapse-worst", "inverse MI",
             "alignment", "adaptation"},
            {}};
    for (const auto& row : m["mean_over_seeds"]) {
      std::vector<std::string> cells = {std::to_string(row["rules"].get<int64_t>()),
                                        row["family"].get<std::string>(), num(row["id_loss"], "%.3f"),
                                        num(row["ood_loss"], "%.3f")};
      for (const char* k : {"collapse_avg", "collapse_worst", "inverse_mi", "alignment", "adaptation"})
        cells.push_back(row.contains("metrics") ? num(row["metrics"][k], "%.2f") : "–");
      t.rows.push_back(cells);
    }
    for (const auto& [R, b] : m["random_routing"].items()) {
      std::vector<std::string> cells = {R, "random routing", "–", "–"};
      for (const char* k : {"collapse_avg", "collapse_worst", "inverse_mi", "alignment", "adaptation"})
        cells.push_back(num(b[k], "%.2f"));
      t.rows.push_back(cells);
    }
    s.tables.push_back(t);
    if (m.contains("sequence_tasks")) {
      Table q{{"task", "R", "family", "ID loss", "OoD loss", "collapse-avg", "inverse MI", "alignment"}, {}};
      for (const auto& row : m["sequence_tasks"]) {
        std::vector<std::string> cells = {
            row["task"].get<std::string>(), std::to_string(row["rules"].get<int64_t>()),
            row["family"].get<std::string>(), num(row["id_loss"], "%.3f"), num(row["ood_loss"], "%.3f")};
        for (const char* k : {"collapse_avg", "inverse_mi", "alignment"})
          cells.push_back(row.contains("metrics") ? num(row["metrics"][k], "%.2f") : "–");
        q.rows.push_back(cells);
      }
      s.tables.push_back(q);
    }
    // The same metrics on the demo's other routed models, against their labels.
    Table o{{"routing", "against", "collapse-avg", "collapse-worst", "inverse MI", "alignment", "adaptation"},
            {}};
    auto add = [&](const std::string& what, const std::string& against, const json& v) {
      std::vector<std::string> cells = {what, against};
      for (const char* k : {"collapse_avg", "collapse_worst", "inverse_mi", "alignment", "adaptation"})
        cells.push_back(num(v[k], "%.2f"));
      o.rows.push_back(cells);
    };
    if (r.contains("moe") && r["moe"].contains("specialisation_by_digit")) {
      for (const auto& l : r["moe"]["specialisation_by_digit"])
        add("upcycled ViT experts, " + l["site"].get<std::string>(), "10 digit classes", l);
      add("random routing over 4 experts", "10 digit classes", r["moe"]["specialisation_random"]);
    }
    if (r.contains("polytropon") && r["polytropon"].contains("specialisation_by_task")) {
      add("Polytropon skills (allocation)", "5 tasks", r["polytropon"]["specialisation_by_task"]);
      add("random routing over 4 skills", "5 tasks", r["polytropon"]["specialisation_random"]);
    }
    if (!o.rows.empty()) s.tables.push_back(o);
    out.push_back(s);
  }
  if (r.contains("module_transfer")) {
    const json& m = r["module_transfer"];
    Section s{"module_transfer", "10. Is modularity transferable? Modules moved to a smaller model", {}, {}};
    if (m.contains("vision")) {
      const json& v = m["vision"];
      const json& t = v["teacher"];
      s.text.push_back(
          "A ViT teacher pretrained on Fashion-MNIST's classes 0-4 (" + pct(t["teacher_task_a_accuracy"]) +
          " on them) gets a module and a head trained on all ten classes. Students: a matching one (every "
          "other "
          "block of the teacher, distilled to its hidden states) and an incompatible one (narrower, trained "
          "from "
          "scratch on classes 0-4: " +
          pct(t["incompatible_task_a_accuracy"]) +
          "). Each arm trains the student's module and head with the backbone frozen; test accuracy (mean "
          "of " +
          std::to_string(v["seeds"].get<int64_t>()) +
          " seeds, the range in brackets) at each step. skip copies teacher layer 2l into student layer l, "
          "avg "
          "their mean with layer 2l+1, prune-align slices the teacher's module along the features of the "
          "narrow student that correlate most with the teacher's (Hungarian assignment; mdl "
          "transfer-module).");
      for (const auto& [kind, k] : v["kinds"].items()) {
        std::vector<std::string> header = {kind + " (teacher: " + pct(k["teacher_accuracy"]) + ")"};
        for (const auto& st : v["eval_steps"]) header.push_back("step " + std::to_string(st.get<int64_t>()));
        Table tb{header, {}};
        for (const auto& a : k["arms"]) {
          std::vector<std::string> cells = {a["arm"].get<std::string>()};
          for (size_t i = 0; i < a["mean"].size(); ++i)
            cells.push_back(pct(a["mean"][i]) + " [" + pct(a["min"][i]) + "-" + pct(a["max"][i]) + "]");
          tb.rows.push_back(cells);
        }
        s.tables.push_back(tb);
        s.text.push_back(kind + ": prune-align's assigned features correlate " +
                         num(k["prune_align_mean_correlation"], "%.2f") +
                         " on average between the teacher and the incompatible student.");
      }
    }
    if (m.contains("text")) {
      const json& x = m["text"];
      s.text.push_back(
          "The polyglot decoder's language adapters (" + x["teacher_adapters"].get<std::string>() +
          ") moved to a " + std::to_string(x["student"]["layers"].get<int64_t>()) +
          "-layer student (every other block, distilled): held-out perplexity per language, fresh "
          "and moved adapters each trained " +
          std::to_string(x["adapter_steps"].get<int64_t>()) + " steps.");
      Table tb{{"language", "teacher + adapter", "student alone", "moved (skip), untrained",
                "moved (avg), untrained", "fresh, trained", "moved (skip), trained"},
               {}};
      for (const auto& l : x["languages"])
        tb.rows.push_back({l["language"].get<std::string>(), num(l["teacher_with_adapter"], "%.1f"),
                           num(l["student_no_adapter"], "%.1f"), num(l["student_skip_untrained"], "%.1f"),
                           num(l["student_avg_untrained"], "%.1f"), num(l["student_fresh_trained"], "%.1f"),
                           num(l["student_skip_trained"], "%.1f")});
      s.tables.push_back(tb);
    }
    out.push_back(s);
  }
  if (r.contains("s2rm")) {
    const json& m = r["s2rm"];
    Section s{"s2rm", "11. S2RMs: recurrent modules in a learned space, seen through local views", {}, {}};
    s.text.push_back(
        "Balls on a ring of " + std::to_string(m["cells"].get<int64_t>()) +
        " cells bounce off each other; a model sees V random 5-cell crops per step (located by their "
        "centre's "
        "angle) and predicts the next whole frame at every cell. S2RMs (" +
        std::to_string(m["modules"].get<int64_t>()) +
        " GRU modules placed in a learned 2-D space, a truncated kernel deciding which views and which other "
        "modules each one meets; a module with no view near it keeps its state), RIMs (top-k of the modules "
        "take input, all-to-all communication) and one monolithic GRU over the pooled views; " +
        std::to_string(m["steps"].get<int64_t>()) + " Adam steps of " +
        std::to_string(m["batch"].get<int64_t>()) + " episodes of " +
        std::to_string(m["episode_steps"].get<int64_t>()) +
        " steps with V = 4 and 2 balls, then tested with V = 1, 2, 4, 8 and with 4 balls (next-frame MSE "
        "after "
        "2 warm-up steps). The cell is a reconstruction: the paper's equations could not be read (see "
        "docs/ARCHITECTURE.md).");
    Table t{{"model", "parameters", "V=1", "V=2", "V=4", "V=8", "4 balls V=1", "4 balls V=4", "4 balls V=8"},
            {}};
    for (const auto& [kind, v] : m["models"].items()) {
      const json& e = v["test_mse"];
      t.rows.push_back({kind, std::to_string(v["parameters"].get<int64_t>()), num(e["balls_2"]["1"], "%.4f"),
                        num(e["balls_2"]["2"], "%.4f"), num(e["balls_2"]["4"], "%.4f"),
                        num(e["balls_2"]["8"], "%.4f"), num(e["balls_4"]["1"], "%.4f"),
                        num(e["balls_4"]["4"], "%.4f"), num(e["balls_4"]["8"], "%.4f")});
    }
    s.tables.push_back(t);
    const json& k = m["kernel"];
    s.text.push_back(
        "The learned kernel between modules: mean K " + num(k["near_mean"], "%.3f") +
        " over pairs within a quarter ring of each other, " + num(k["far_mean"], "%.3f") +
        " over farther pairs (each module placed at the cell whose encoded location is nearest).");
    if (m.contains("view_routing")) {
      const json& v = m["view_routing"];
      Table rt{
          {"which modules read which views", "collapse-avg", "collapse-worst", "inverse MI", "alignment"},
          {}};
      for (const auto& [name, key] : std::vector<std::pair<std::string, std::string>>{
               {"S2RMs", "s2rm"}, {"RIMs", "rims"}, {"random routing", "random"}})
        rt.rows.push_back({name + ", against the view's ring quarter", num(v[key]["collapse_avg"], "%.2f"),
                           num(v[key]["collapse_worst"], "%.2f"), num(v[key]["inverse_mi"], "%.2f"),
                           num(v[key]["alignment"], "%.2f")});
      s.tables.push_back(rt);
    }
    out.push_back(s);
  }
  return out;
}

std::string escape(const std::string& s) {
  std::string o;
  for (char c : s) o += c == '<' ? "&lt;" : c == '>' ? "&gt;" : c == '&' ? "&amp;" : std::string(1, c);
  return o;
}

}  // namespace

void write_report(const DemoOptions& options, const json& r) {
  std::ostringstream md, html;
  const std::string title = "mdl demo: what modularity buys";
  md << "# " << title << "\n\n";
  md << "Run: " << r["run"]["size"].get<std::string>() << ", seed " << r["run"]["seed"] << ", "
     << r["run"]["cores"] << " cores, " << r["run"]["processes"] << " process(es), "
     << num(r["run"]["seconds"], "%.0f") << " s. Every figure is also in `results.json`.\n\n";
  html << "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>" << title << "</title>\n"
       << "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 "
          "1em}table{border-collapse:collapse;"
          "margin:1em 0}td,th{border:1px solid #ccc;padding:.3em "
          ".6em;text-align:right}td:first-child,th:first-child{"
          "text-align:left}img{max-width:100%}.holds{color:#060}.fails{color:#a00}</style></head><body>\n";
  html << "<h1>" << title << "</h1>\n<p>Run: " << r["run"]["size"].get<std::string>() << ", seed "
       << r["run"]["seed"] << ", " << r["run"]["cores"] << " cores, " << r["run"]["processes"]
       << " process(es), " << num(r["run"]["seconds"], "%.0f")
       << " s. Every figure is also in <code>results.json</code>.</p>\n";
  md << "## Expected directions\n\n";
  html << "<h2>Expected directions</h2>\n<ul>\n";
  for (const auto& c : r["checks"]) {
    const bool holds = c["holds"].get<bool>();
    const std::string claim = c["claim"], detail = c["detail"];
    md << "- **" << (holds ? "holds" : "does not hold") << "**: " << claim << " (" << detail << ")\n";
    html << "<li class=\"" << (holds ? "holds" : "fails") << "\"><b>" << (holds ? "holds" : "does not hold")
         << "</b>: " << escape(claim) << " (" << escape(detail) << ")</li>\n";
  }
  md << "\n";
  html << "</ul>\n";
  for (const auto& s : sections(r)) {
    md << "## " << s.title << "\n\n";
    html << "<h2>" << escape(s.title) << "</h2>\n";
    for (const auto& p : s.text) md << p << "\n\n", html << "<p>" << escape(p) << "</p>\n";
    for (const auto& t : s.tables) md << t.markdown() << "\n", html << t.html();
    for (const auto& f : r["figures"]) {
      if (f["section"] != s.key) continue;
      md << "![" << f["caption"].get<std::string>() << "](" << f["file"].get<std::string>() << ")\n\n";
      html << "<figure><img src=\"" << f["file"].get<std::string>() << "\" alt=\""
           << escape(f["caption"].get<std::string>()) << "\"><figcaption>"
           << escape(f["caption"].get<std::string>()) << "</figcaption></figure>\n";
    }
  }
  if (r.contains("serve_command")) {
    md << "## Serving the trained modules\n\n```\n"
       << r["serve_command"].get<std::string>() << "\n"
       << r["serve_example"].get<std::string>() << "\n```\n";
    html << "<h2>Serving the trained modules</h2>\n<pre>" << escape(r["serve_command"].get<std::string>())
         << "\n"
         << escape(r["serve_example"].get<std::string>()) << "</pre>\n";
  }
  html << "</body></html>\n";
  io::write_text_atomic((fs::path(options.out_dir) / "report.md").string(), md.str());
  io::write_text_atomic((fs::path(options.out_dir) / "report.html").string(), html.str());
}

}  // namespace mdl::demo
