// EngineRunner: TensorRT 10.12+ / 11.x, name-based I/O (enqueueV3).
#include "attn_export/runner.hpp"

#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <sstream>
#include <stdexcept>

namespace attn_export {
namespace {

void check_cuda(cudaError_t status, const char* what) {
    if (status != cudaSuccess) {
        throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(status));
    }
}

// Prints warnings and errors to stderr and keeps the last error, so a failed
// call can report TensorRT's own explanation.
class Logger : public nvinfer1::ILogger {
public:
    void log(Severity severity, const char* msg) noexcept override {
        if (severity > Severity::kWARNING) return;
        std::cerr << (severity == Severity::kWARNING ? "[TensorRT] warning: " : "[TensorRT] error: ") << msg << "\n";
        if (severity <= Severity::kERROR) last_error = msg;
    }
    // " (TensorRT: <last error>)" or "", and forget it.
    std::string take_error() {
        std::string out = last_error.empty() ? "" : " (TensorRT: " + last_error + ")";
        last_error.clear();
        return out;
    }

private:
    std::string last_error;
};

// Empty string for TensorRT dtypes that have no .npy counterpart here.
std::string npy_dtype_of(nvinfer1::DataType type) {
    switch (type) {
        case nvinfer1::DataType::kFLOAT: return "<f4";
        case nvinfer1::DataType::kHALF: return "<f2";
        case nvinfer1::DataType::kINT64: return "<i8";
        case nvinfer1::DataType::kINT32: return "<i4";
        case nvinfer1::DataType::kBOOL: return "|b1";
        case nvinfer1::DataType::kUINT8: return "|u1";
        default: return "";
    }
}

std::vector<int64_t> to_vector(const nvinfer1::Dims& dims) {
    if (dims.nbDims < 0) return {};
    return std::vector<int64_t>(dims.d, dims.d + dims.nbDims);
}

nvinfer1::Dims to_dims(const std::vector<int64_t>& shape) {
    if (shape.size() > static_cast<size_t>(nvinfer1::Dims::MAX_DIMS)) {
        throw std::runtime_error("shape " + shape_to_string(shape) + " has more dimensions than TensorRT supports");
    }
    nvinfer1::Dims dims{};
    dims.nbDims = static_cast<int32_t>(shape.size());
    for (size_t i = 0; i < shape.size(); ++i) dims.d[i] = shape[i];
    return dims;
}

struct CudaFree {
    void operator()(void* p) const noexcept { cudaFree(p); }
};

// Device memory that only grows.
struct DeviceBuffer {
    std::unique_ptr<void, CudaFree> ptr;
    size_t capacity = 0;

    void* reserve(size_t bytes) {
        bytes = bytes == 0 ? 1 : bytes;  // a valid address even for empty tensors
        if (bytes > capacity) {
            ptr.reset();
            capacity = 0;
            void* p = nullptr;
            check_cuda(cudaMalloc(&p, bytes), "cudaMalloc");
            ptr.reset(p);
            capacity = bytes;
        }
        return ptr.get();
    }
};

std::vector<char> read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error(path + ": cannot open the engine file");
    return std::vector<char>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

}  // namespace

struct EngineRunner::Impl {
    // Declaration order is destruction order reversed: the context goes before
    // the engine, the engine before the runtime.
    Logger logger;
    std::unique_ptr<nvinfer1::IRuntime> runtime;
    std::unique_ptr<nvinfer1::ICudaEngine> engine;
    std::unique_ptr<nvinfer1::IExecutionContext> context;
    cudaStream_t stream = nullptr;
    std::vector<TensorInfo> tensors;
    std::map<std::string, DeviceBuffer> buffers;
    std::string plan_path;

    ~Impl() {
        if (stream) cudaStreamDestroy(stream);
    }
};

std::string EngineRunner::linked_tensorrt_version() {
    return std::to_string(getInferLibMajorVersion()) + "." + std::to_string(getInferLibMinorVersion()) + "." +
           std::to_string(getInferLibPatchVersion());
}

EngineRunner::EngineRunner(const std::string& plan_path, const std::string& sidecar_path) : impl_(new Impl) {
    Impl& m = *impl_;
    m.plan_path = plan_path;

    // A plan only loads on the TensorRT release that built it: refuse early
    // with an actionable message instead of a deserialization failure.
    const std::string sidecar = sidecar_path.empty() ? plan_path + ".json" : sidecar_path;
    const SidecarVersion recorded = read_sidecar_version(sidecar);
    if (recorded.runtime != "tensorrt") {
        // TensorRT-RTX engines need its own library (libtensorrt_rtx); this runner links TensorRT.
        throw std::runtime_error(plan_path + ": is a " + (recorded.runtime == "rtx" ? std::string("TensorRT-RTX") : recorded.runtime) +
                                 " engine and this program uses TensorRT; load it with the Python runner "
                                 "(attn_export.TrtRunner), or build a TensorRT engine with `attn-export trt`");
    }
    const std::string built_with = recorded.version;
    const std::string linked = linked_tensorrt_version();
    if (!same_tensorrt_release(built_with, linked)) {
        throw std::runtime_error(plan_path + ": engine was built with TensorRT " + built_with + " but this program uses TensorRT " +
                                 linked + "; rebuild the engine with `attn-export trt` on this machine");
    }

    const std::vector<char> plan = read_file(plan_path);
    m.runtime.reset(nvinfer1::createInferRuntime(m.logger));
    if (!m.runtime) throw std::runtime_error("cannot create the TensorRT runtime" + m.logger.take_error());
    m.engine.reset(m.runtime->deserializeCudaEngine(plan.data(), plan.size()));
    if (!m.engine) throw std::runtime_error(plan_path + ": cannot deserialize the engine" + m.logger.take_error());

    for (int32_t i = 0; i < m.engine->getNbIOTensors(); ++i) {
        const char* name = m.engine->getIOTensorName(i);
        TensorInfo info;
        info.name = name;
        info.is_input = m.engine->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT;
        info.dtype = npy_dtype_of(m.engine->getTensorDataType(name));
        info.shape = to_vector(m.engine->getTensorShape(name));
        if (info.is_input) {
            info.min_shape = to_vector(m.engine->getProfileShape(name, 0, nvinfer1::OptProfileSelector::kMIN));
            info.max_shape = to_vector(m.engine->getProfileShape(name, 0, nvinfer1::OptProfileSelector::kMAX));
        }
        m.tensors.push_back(std::move(info));
    }

    m.context.reset(m.engine->createExecutionContext());
    if (!m.context) throw std::runtime_error(plan_path + ": cannot create an execution context" + m.logger.take_error());
    check_cuda(cudaStreamCreate(&m.stream), "cudaStreamCreate");
}

EngineRunner::~EngineRunner() = default;

const std::vector<TensorInfo>& EngineRunner::tensors() const { return impl_->tensors; }

std::map<std::string, NpyArray> EngineRunner::run(const std::map<std::string, NpyArray>& inputs) {
    Impl& m = *impl_;

    for (const auto& entry : inputs) {
        bool known = false;
        for (const TensorInfo& t : m.tensors) known = known || (t.is_input && t.name == entry.first);
        if (!known) throw std::runtime_error("the engine has no input named '" + entry.first + "'");
    }

    // Inputs: validate, set shapes, upload.
    for (const TensorInfo& t : m.tensors) {
        if (!t.is_input) continue;
        const auto found = inputs.find(t.name);
        if (found == inputs.end()) throw std::runtime_error("missing input '" + t.name + "'");
        const NpyArray& a = found->second;
        if (t.dtype.empty()) throw std::runtime_error("input '" + t.name + "' has a TensorRT dtype .npy files cannot hold");
        if (a.dtype != t.dtype) {
            throw std::runtime_error("input '" + t.name + "' has dtype " + a.dtype + " but the engine expects " + t.dtype);
        }
        // A static tensor has no profile range; its own shape is the only one allowed.
        const bool ranged = t.min_shape.size() == t.shape.size() && t.max_shape.size() == t.shape.size();
        const std::vector<int64_t>& lo = ranged ? t.min_shape : t.shape;
        const std::vector<int64_t>& hi = ranged ? t.max_shape : t.shape;
        bool inside = a.shape.size() == lo.size();
        for (size_t d = 0; inside && d < lo.size(); ++d) inside = lo[d] <= a.shape[d] && a.shape[d] <= hi[d];
        if (!inside) {
            throw std::runtime_error("input '" + t.name + "' has shape " + shape_to_string(a.shape) +
                                     ", outside the engine's allowed range " + shape_to_string(lo) + " .. " +
                                     shape_to_string(hi));
        }
        if (!m.context->setInputShape(t.name.c_str(), to_dims(a.shape))) {
            throw std::runtime_error("setInputShape failed for '" + t.name + "'" + m.logger.take_error());
        }
        void* device = m.buffers[t.name].reserve(a.data.size());
        check_cuda(cudaMemcpyAsync(device, a.data.data(), a.data.size(), cudaMemcpyHostToDevice, m.stream),
                   "cudaMemcpyAsync (host to device)");
        if (!m.context->setTensorAddress(t.name.c_str(), device)) {
            throw std::runtime_error("setTensorAddress failed for '" + t.name + "'" + m.logger.take_error());
        }
    }

    // Outputs: shapes follow from the input shapes.
    std::map<std::string, NpyArray> outputs;
    for (const TensorInfo& t : m.tensors) {
        if (t.is_input) continue;
        if (t.dtype.empty()) throw std::runtime_error("output '" + t.name + "' has a TensorRT dtype .npy files cannot hold");
        NpyArray out;
        out.dtype = t.dtype;
        out.shape = to_vector(m.context->getTensorShape(t.name.c_str()));
        for (int64_t d : out.shape) {
            if (d < 0) throw std::runtime_error("cannot determine the shape of output '" + t.name + "'" + m.logger.take_error());
        }
        out.data.resize(out.nbytes());
        void* device = m.buffers[t.name].reserve(out.data.size());
        if (!m.context->setTensorAddress(t.name.c_str(), device)) {
            throw std::runtime_error("setTensorAddress failed for '" + t.name + "'" + m.logger.take_error());
        }
        outputs.emplace(t.name, std::move(out));
    }

    if (!m.context->enqueueV3(m.stream)) throw std::runtime_error("enqueueV3 failed" + m.logger.take_error());
    for (auto& entry : outputs) {
        NpyArray& out = entry.second;
        check_cuda(cudaMemcpyAsync(out.data.data(), m.buffers[entry.first].ptr.get(), out.data.size(), cudaMemcpyDeviceToHost,
                                   m.stream),
                   "cudaMemcpyAsync (device to host)");
    }
    check_cuda(cudaStreamSynchronize(m.stream), "cudaStreamSynchronize");
    return outputs;
}

}  // namespace attn_export
