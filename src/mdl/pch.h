// Precompiled header for translation units that use torch (cuts a one-file rebuild from ~15 s to ~8 s).
#pragma once
#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <map>
#include <memory>
#include <string>
#include <vector>
