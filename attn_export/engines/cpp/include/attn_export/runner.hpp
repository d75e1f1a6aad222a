// Runs a TensorRT engine built by `attn-export trt` on host NpyArrays.
//
// Written for TensorRT 10.12+ and 11.x (only non-deprecated API). The
// TensorRT and CUDA headers stay out of this header (pimpl), so programs that
// use the runner only need them to link, not to compile.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "attn_export/npy.hpp"
#include "attn_export/sidecar.hpp"

namespace attn_export {

// One engine I/O tensor as TensorRT reports it.
struct TensorInfo {
    std::string name;
    bool is_input = false;
    std::string dtype;           // npy descr, e.g. "<f4"; "" for a dtype .npy cannot hold
    std::vector<int64_t> shape;  // engine shape, -1 for dynamic dimensions
    std::vector<int64_t> min_shape, max_shape;  // profile 0 range (inputs only)
};

class EngineRunner {
public:
    // Loads `plan_path` after checking its sidecar (default: plan_path + ".json")
    // was written by the TensorRT version this program is linked against.
    explicit EngineRunner(const std::string& plan_path, const std::string& sidecar_path = "");
    ~EngineRunner();
    EngineRunner(const EngineRunner&) = delete;
    EngineRunner& operator=(const EngineRunner&) = delete;

    const std::vector<TensorInfo>& tensors() const;

    // Runs one inference. Every engine input must be given, with the engine's
    // dtype and a shape inside optimization profile 0; returns every output by name.
    // Device buffers are kept and only grow, so repeated calls do not reallocate.
    std::map<std::string, NpyArray> run(const std::map<std::string, NpyArray>& inputs);

    // "major.minor.patch" of the TensorRT library this program runs with.
    static std::string linked_tensorrt_version();

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace attn_export
