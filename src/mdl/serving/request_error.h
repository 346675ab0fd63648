// A request the server refuses: an HTTP status, the request field at fault (OpenAI's `param`) and a
// message that says what was expected and what was found.
#pragma once

#include <string>

#include "mdl/core/error.h"

namespace mdl {

class RequestError : public Error {
 public:
  RequestError(int status, std::string param, const std::string& message)
      : Error(message), status_(status), param_(std::move(param)) {}
  int status() const { return status_; }
  const std::string& param() const { return param_; }

 private:
  int status_;
  std::string param_;
};

}  // namespace mdl
