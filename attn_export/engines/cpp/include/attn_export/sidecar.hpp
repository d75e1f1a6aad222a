// The few fields of an engine sidecar (<engine>.json) the C++ side needs.
// The sidecar is written by the Python side and parsed with nlohmann/json
// (found by CMake as the nlohmann_json package; only sidecar.cpp includes it).
#pragma once

#include <string>

namespace attn_export {

// The top-level "tensorrt_version" string of a sidecar JSON text; throws std::runtime_error
// naming `what` if the text is not a JSON object, or the field is missing or not a string.
std::string sidecar_tensorrt_version(const std::string& json_text, const std::string& what = "sidecar");

// Same, read from a file.
std::string read_sidecar_tensorrt_version(const std::string& sidecar_path);

// The top-level "runtime" of a sidecar: "tensorrt" (also when absent: sidecars written before runtimes
// were recorded) or "rtx" (a TensorRT-RTX engine); throws std::runtime_error on bad JSON or a non-string.
std::string sidecar_runtime(const std::string& json_text, const std::string& what = "sidecar");

// Both fields read from one sidecar file: {runtime, tensorrt_version}.
struct SidecarVersion {
    std::string runtime;
    std::string version;
};
SidecarVersion read_sidecar_version(const std::string& sidecar_path);

// True when two version strings agree on major.minor.patch ("10.14.1.48" == "10.14.1").
// Missing components count as 0.
bool same_tensorrt_release(const std::string& a, const std::string& b);

}  // namespace attn_export
