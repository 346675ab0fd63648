// Data-parallel training over c10d/Gloo on loopback, driven through the real `mdl train`: two processes
// reach the weights of one process with the same global batch; a run resumes with another number of
// workers; a killed worker is reported by the survivor within the timeout.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <thread>

#include "mdl/io/safetensors.h"
#include "test_util.h"

namespace mdl {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

int run(const std::string& args, std::string* err = nullptr) {
  static test::TempDir scratch;
  const std::string err_file = scratch / "stderr.txt";
  const int status =
      std::system((std::string(std::getenv("MDL_BIN")) + " " + args + " > /dev/null 2> " + err_file).c_str());
  if (err) *err = test::read_file(err_file);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

class Distributed : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(run("init-model --arch llama --head sequence_classification --seed 2 --out " + tmp_ / "m"), 0);
    std::string lines;
    // Examples of one length (single-token first words, truncated to 4 tokens): ranks pad their halves of a
    // batch exactly as one process pads the whole, so only the order of the gradient sums differs.
    for (const char* s : {"the", "a", "that"})
      for (const char* animal : {"cat", "dog"})
        lines += json({{"text", std::string(s) + " " + animal}, {"label", animal}}).dump() + "\n";
    test::write_file(tmp_ / "data.jsonl", lines);
  }
  std::string config(const std::string& out, int64_t steps, int64_t total = 0) {
    json c = {{"model", tmp_ / "m"},
              {"modules", {{"lora", {{"type", "lora"}, {"targets", {{"target_modules", "all-linear"}}}}}}},
              {"train_data", tmp_ / "data.jsonl"},
              {"data", {{"max_length", 4}}},
              {"options",
               {{"steps", steps},
                {"batch_size", 8},
                {"out_dir", out},
                {"checkpoint_every", 1},
                {"schedule", {{"lr", 0.01}, {"total_steps", total ? total : steps}}}}}};
    const std::string path = out + "-" + std::to_string(steps) + ".json";
    test::write_file(path, c.dump());
    return path;
  }
  static void expect_close(const std::string& a, const std::string& b, double tol) {
    const auto x = io::load_safetensors(a + "/modules/lora/module.safetensors");
    const auto y = io::load_safetensors(b + "/modules/lora/module.safetensors");
    ASSERT_EQ(x.size(), y.size());
    double worst = 0;
    for (const auto& [k, t] : x) worst = std::max(worst, (t - y.at(k)).abs().max().item<double>());
    std::printf("[distributed] max |difference| %.3g\n", worst);
    EXPECT_LE(worst, tol);
  }
  test::TempDir tmp_;
};

TEST_F(Distributed, TwoProcessesEqualOneWithTheSameGlobalBatch) {
  ASSERT_EQ(run("train --config " + config(tmp_ / "one", 6)), 0);
  std::string err;
  ASSERT_EQ(run("train --nproc 2 --config " + config(tmp_ / "two", 6), &err), 0) << err;
  expect_close(tmp_ / "one", tmp_ / "two", 1e-5);
  const std::string metrics = test::read_file(tmp_ / "two/metrics.jsonl");  // rank 0 alone writes it
  EXPECT_EQ(std::count(metrics.begin(), metrics.end(), '\n'), 6);
}

TEST_F(Distributed, ResumesWithAnotherNumberOfWorkers) {
  ASSERT_EQ(run("train --config " + config(tmp_ / "straight", 6)), 0);
  std::string err;
  ASSERT_EQ(run("train --nproc 2 --config " + config(tmp_ / "mixed", 3, 6), &err), 0)
      << err;                                                                     // 3 of 6 steps on 2 workers
  ASSERT_EQ(run("train --config " + config(tmp_ / "mixed", 6), &err), 0) << err;  // the rest on 1
  expect_close(tmp_ / "straight", tmp_ / "mixed", 1e-5);
}

// Branch-Train-Merge in one command: two processes each train a LoRA on their own data (no gradient
// exchange), and rank 0 merges them.
TEST_F(Distributed, BranchTrainMergeProducesTwoModulesAndTheirMerge) {
  std::string flipped;
  for (const char* s : {"the", "a", "my", "one"})
    for (const char* animal : {"cat", "dog"})
      flipped += json({{"text", std::string(s) + " " + animal},
                       {"label", std::string(animal) == "cat" ? "dog" : "cat"}})
                     .dump() +
                 "\n";
  test::write_file(tmp_ / "flipped.jsonl", flipped);
  json c = {{"model", tmp_ / "m"},
            {"modules", {{"lora", {{"type", "lora"}, {"targets", {{"target_modules", "all-linear"}}}}}}},
            {"branches",
             {{{"name", "plain"}, {"train_data", tmp_ / "data.jsonl"}},
              {{"name", "flipped"}, {"train_data", tmp_ / "flipped.jsonl"}}}},
            {"branch_merge", {{"method", "ties"}, {"density", 0.5}}},
            {"options",
             {{"steps", 4}, {"batch_size", 4}, {"out_dir", tmp_ / "btm"}, {"schedule", {{"lr", 0.01}}}}}};
  test::write_file(tmp_ / "btm.json", c.dump());
  std::string err;
  ASSERT_EQ(run("train --nproc 2 --config " + tmp_ / "btm.json", &err), 0) << err;
  for (const char* m : {"branches/plain/module", "branches/flipped/module", "modules/merged"})
    EXPECT_TRUE(fs::exists(tmp_ / (std::string("btm/") + m + "/module.json"))) << m;
  const auto a = io::load_safetensors(tmp_ / "btm/branches/plain/module/module.safetensors");
  const auto b = io::load_safetensors(tmp_ / "btm/branches/flipped/module/module.safetensors");
  bool differ = false;
  for (const auto& [k, t] : a) differ = differ || test::rel_diff(t, b.at(k)) > 1e-4;
  EXPECT_TRUE(differ) << "the branches trained on different data";
  ASSERT_EQ(run("eval --model " + tmp_ / "m" + " --modules " + tmp_ / "btm/modules/merged" + " --data " +
                    tmp_ / "data.jsonl",
                &err),
            0)
      << err;
}

// A worker that dies (SIGKILL) or hangs (SIGSTOP): the survivor stops with a clear error within the
// timeout (5 s here), never a silent hang.
class Faults : public Distributed, public ::testing::WithParamInterface<int> {};

TEST_P(Faults, ReportedBySurvivorWithinTheTimeout) {
  int port = 0;
  {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
    port = ntohs(addr.sin_port);
    close(fd);
  }
  const int signal = GetParam();
  const std::string cfg = config(tmp_ / "killed", 100000);
  const std::string err0 = tmp_ / "rank0.err";
  std::vector<pid_t> pids;
  std::fflush(nullptr);  // or the children's freopen writes this process's buffered output again
  for (int r = 0; r < 2; ++r) {
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      setenv("RANK", std::to_string(r).c_str(), 1);
      setenv("WORLD_SIZE", "2", 1);
      setenv("MASTER_ADDR", "127.0.0.1", 1);
      setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
      setenv("MDL_DIST_TIMEOUT", "5", 1);
      if (!freopen("/dev/null", "w", stdout) || !freopen(r == 0 ? err0.c_str() : "/dev/null", "w", stderr))
        _exit(126);
      execl(std::getenv("MDL_BIN"), "mdl", "--threads", "1", "train", "--config", cfg.c_str(),
            static_cast<char*>(nullptr));
      _exit(127);
    }
    pids.push_back(pid);
  }
  // Once training runs (a checkpoint exists), kill rank 1.
  ASSERT_TRUE(test::wait_until([&] { return fs::exists(tmp_ / "killed/checkpoint/trainer.json"); }, pids[0]))
      << "training did not start";
  kill(pids[1], signal);
  const auto t0 = std::chrono::steady_clock::now();
  int status = 0;
  waitpid(pids[0], &status, 0);
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("[distributed] survivor stopped %.1f s after its peer got %s\n", waited, strsignal(signal));
  kill(pids[1], SIGKILL);
  waitpid(pids[1], nullptr, 0);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) != 0);
  // Bounded by MDL_DIST_TIMEOUT (5 s) and not by Gloo's 30-minute default; the slack is for a loaded
  // machine, not a measure of speed.
  EXPECT_LT(waited, 120.0);
  const std::string err = test::read_file(err0);
  EXPECT_NE(err.find("[distributed] rank 0"), std::string::npos) << err;
}

INSTANTIATE_TEST_SUITE_P(DeadOrHung, Faults, ::testing::Values(SIGKILL, SIGSTOP));

}  // namespace
}  // namespace mdl
