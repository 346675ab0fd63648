#include "mdl/training/branch_train_merge.h"

#include <cstdio>
#include <filesystem>

#include "mdl/aggregation/merge.h"
#include "mdl/backbones/model.h"
#include "mdl/core/device.h"
#include "mdl/core/error.h"
#include "mdl/distributed/process_group.h"
#include "mdl/modules/module_set.h"
#include "mdl/tokenizers/tokenizer.h"
#include "mdl/training/dataset.h"
#include "mdl/training/train_config.h"
#include "mdl/training/trainer.h"

namespace fs = std::filesystem;

namespace mdl {

void train_branches(const TrainConfig& c, ProcessGroup* group) {
  const int world = group ? group->size() : 1, rank = group ? group->rank() : 0;
  const auto& [template_name, module] = *c.modules.begin();
  MDL_CHECK(!c.options.out_dir.empty(), "[train] Branch-Train-Merge needs options.out_dir");
  std::vector<std::string> dirs;
  for (size_t b = 0; b < c.branches.size(); ++b) {
    const TrainBranch& branch = c.branches[b];
    const std::string dir = (fs::path(c.options.out_dir) / "branches" / branch.name).string();
    dirs.push_back(dir + "/module");
    if (static_cast<int>(b % static_cast<size_t>(world)) != rank) continue;
    LoadOptions lo;
    lo.device = parse_device(c.device);
    Model m = load_model(c.model, lo);
    ModuleSet set(m);
    for (const auto& d : c.load) set.load(d);
    set.add(branch.name, with_new_heads(module, *m));
    Dataset data = load_jsonl(branch.train_data, Tokenizer::from_file(c.model), c.data);
    TrainOptions o = c.options;
    o.out_dir = dir;
    Trainer trainer(set, {branch.name}, o);  // no process group: branches exchange nothing
    const std::string ckpt = dir + "/checkpoint";
    if (c.resume && !find_checkpoint(ckpt).empty()) trainer.load_checkpoint(ckpt);
    auto history = trainer.train(data);
    set.save(branch.name, dir + "/module");
    std::printf("[rank %d] branch %s: %zu examples, loss %.4f\n", rank, branch.name.c_str(),
                data.examples.size(), history.empty() ? 0.0 : history.back().loss);
    std::fflush(stdout);
  }
  if (group) group->barrier();  // every branch is written
  if (rank != 0) return;
  const std::string merged = (fs::path(c.options.out_dir) / "modules" / "merged").string();
  merge_modules(c.model, dirs, c.branch_merge, merged);
  std::printf("merged %zu branches (%s) into %s\n", dirs.size(), c.branch_merge.method.c_str(),
              merged.c_str());
}

}  // namespace mdl
