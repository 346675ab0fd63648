// Recording what sites consume and produce: a SiteRecorder attaches itself at the sites it is given for as
// long as it lives, keeps each forward's input and base output there (detached, unless asked not to), and
// puts back what was attached before when it goes (RAII). The recorded pass is the backbone's own
// computation: functions that were attached do not run while it records. Used where activations decide a
// conversion (moefy's co-activations, the hidden dimensions transfer-module aligns).
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "mdl/core/site.h"

namespace mdl {

class SiteRecorder {
 public:
  /// What to keep per site and forward.
  struct Options {
    bool inputs = true;
    bool outputs = false;
    bool detach = true;  ///< false: the records keep their autograd graph (a loss on them trains the model)
  };
  /// Attaches at every site of `sites` (the previous functions are restored by the destructor).
  SiteRecorder(const std::vector<Site*>& sites, Options options);
  ~SiteRecorder();
  SiteRecorder(const SiteRecorder&) = delete;
  SiteRecorder& operator=(const SiteRecorder&) = delete;

  /// Each recorded forward's input (output) at `site`, in order; empty for a site it does not record.
  const std::vector<at::Tensor>& inputs(const std::string& site) const;
  const std::vector<at::Tensor>& outputs(const std::string& site) const;
  /// Forgets what was recorded (keeps recording).
  void clear();

 private:
  class Probe;
  std::vector<std::pair<Site*, std::shared_ptr<SiteFunction>>> saved_;  ///< site, what it held before
  std::map<std::string, std::shared_ptr<Probe>> probes_;
};

}  // namespace mdl
