// attn_export_run: run an `attn-export trt` engine on .npy inputs.
//
//   attn_export_run --engine unet.plan [--sidecar unet.plan.json]
//                   --input x=x.npy --input t=t.npy [--input y=y.npy]
//                   --output out=out.npy [--iterations N]
//
// Exit codes: 0 success, 1 runtime failure, 2 bad usage.
#include <chrono>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <map>
#include <string>
#include <utility>

#include "attn_export/npy.hpp"
#include "attn_export/runner.hpp"

namespace {

constexpr const char* kUsage =
    "usage: attn_export_run --engine PLAN [--sidecar JSON] --input NAME=FILE.npy ... "
    "--output NAME=FILE.npy ... [--iterations N]";

struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct Options {
    std::string engine, sidecar;
    std::map<std::string, std::string> inputs, outputs;  // tensor name -> .npy path
    long iterations = 1;
};

std::pair<std::string, std::string> split_binding(const std::string& flag, const std::string& value) {
    const size_t eq = value.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == value.size()) {
        throw UsageError(flag + " expects NAME=FILE.npy, got '" + value + "'");
    }
    return {value.substr(0, eq), value.substr(eq + 1)};
}

Options parse_args(int argc, char** argv) {
    Options opt;
    for (int i = 1; i < argc; ++i) {
        const std::string flag = argv[i];
        if (flag == "-h" || flag == "--help") {
            std::cout << kUsage << "\n";
            std::exit(0);
        }
        if (i + 1 >= argc) throw UsageError("missing value after " + flag);
        const std::string value = argv[++i];
        if (flag == "--engine") {
            opt.engine = value;
        } else if (flag == "--sidecar") {
            opt.sidecar = value;
        } else if (flag == "--input" || flag == "--output") {
            auto binding = split_binding(flag, value);
            auto& target = flag == "--input" ? opt.inputs : opt.outputs;
            if (!target.emplace(binding).second) throw UsageError(flag + " " + binding.first + " given twice");
        } else if (flag == "--iterations") {
            char* end = nullptr;
            opt.iterations = std::strtol(value.c_str(), &end, 10);
            if (*end != '\0' || opt.iterations < 1) throw UsageError("--iterations expects a positive integer, got '" + value + "'");
        } else {
            throw UsageError("unknown argument '" + flag + "'");
        }
    }
    if (opt.engine.empty()) throw UsageError("--engine is required");
    if (opt.inputs.empty()) throw UsageError("at least one --input is required");
    return opt;
}

int run(const Options& opt) {
    attn_export::EngineRunner runner(opt.engine, opt.sidecar);

    for (const auto& wanted : opt.outputs) {
        bool known = false;
        for (const auto& t : runner.tensors()) known = known || (!t.is_input && t.name == wanted.first);
        if (!known) throw std::runtime_error("the engine has no output named '" + wanted.first + "'");
    }

    std::map<std::string, attn_export::NpyArray> inputs;
    for (const auto& in : opt.inputs) inputs.emplace(in.first, attn_export::load_npy(in.second));

    // The first run also warms up (lazy allocations, kernel loading); only
    // the following runs are timed.
    std::map<std::string, attn_export::NpyArray> outputs = runner.run(inputs);
    if (opt.iterations > 1) {
        const auto start = std::chrono::steady_clock::now();
        for (long i = 1; i < opt.iterations; ++i) outputs = runner.run(inputs);
        const std::chrono::duration<double, std::milli> elapsed = std::chrono::steady_clock::now() - start;
        std::cout << "mean latency: " << elapsed.count() / static_cast<double>(opt.iterations - 1) << " ms over "
                  << (opt.iterations - 1) << " runs (after 1 warm-up run, host<->device copies included)\n";
    }

    for (const auto& entry : outputs) {
        std::cout << entry.first << ": " << entry.second.dtype << " " << attn_export::shape_to_string(entry.second.shape);
        const auto path = opt.outputs.find(entry.first);
        if (path != opt.outputs.end()) {
            attn_export::save_npy(path->second, entry.second);
            std::cout << " -> " << path->second;
        }
        std::cout << "\n";
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    Options opt;
    try {
        opt = parse_args(argc, argv);
    } catch (const std::exception& e) {
        std::cerr << "attn_export_run: " << e.what() << " (" << kUsage << ")\n";
        return 2;
    }
    try {
        return run(opt);
    } catch (const std::exception& e) {
        std::cerr << "attn_export_run: error: " << e.what() << "\n";
        return 1;
    }
}
