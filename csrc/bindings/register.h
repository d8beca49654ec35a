// One register_* per binding file (module.cpp calls them all).
#pragma once

#include <pybind11/pybind11.h>

namespace pybilayer {
namespace bindings {

void register_compositor(pybind11::module_& m);
void register_device(pybind11::module_& m);
void register_heads(pybind11::module_& m);
void register_lowres(pybind11::module_& m);

}  // namespace bindings
}  // namespace pybilayer
