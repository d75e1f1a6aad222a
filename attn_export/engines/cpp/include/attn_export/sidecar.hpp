// The few fields of an engine sidecar (<engine>.json) the C++ side needs.
// The sidecar is written by the Python side; rather than pulling in a JSON
// library, the one string field used here is extracted by hand.
#pragma once

#include <string>

namespace attn_export {

// The "tensorrt_version" string of a sidecar JSON text; throws std::runtime_error
// naming `what` if the field is missing or not a string.
std::string sidecar_tensorrt_version(const std::string& json_text, const std::string& what = "sidecar");

// Same, read from a file.
std::string read_sidecar_tensorrt_version(const std::string& sidecar_path);

// True when two version strings agree on major.minor.patch ("10.14.1.48" == "10.14.1").
// Missing components count as 0.
bool same_tensorrt_release(const std::string& a, const std::string& b);

}  // namespace attn_export
