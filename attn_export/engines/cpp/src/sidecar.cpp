#include "attn_export/sidecar.hpp"

#include <array>
#include <cctype>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include <nlohmann/json.hpp>

namespace attn_export {
namespace {

// Up to three leading numeric components of "10.14.1.48".
std::array<long, 3> release_of(const std::string& version) {
    std::array<long, 3> out{0, 0, 0};
    size_t pos = 0;
    for (size_t i = 0; i < out.size() && pos < version.size(); ++i) {
        size_t end = pos;
        while (end < version.size() && std::isdigit(static_cast<unsigned char>(version[end]))) ++end;
        if (end == pos) break;
        out[i] = std::stol(version.substr(pos, end - pos));
        if (end >= version.size() || version[end] != '.') break;
        pos = end + 1;
    }
    return out;
}

nlohmann::json parse_object(const std::string& text, const std::string& what) {
    nlohmann::json doc;
    try {
        doc = nlohmann::json::parse(text);
    } catch (const nlohmann::json::parse_error& e) {
        throw std::runtime_error(what + ": not valid JSON (" + e.what() + ")");
    }
    if (!doc.is_object()) throw std::runtime_error(what + ": not a JSON object");
    return doc;
}

std::string read_text(const std::string& sidecar_path) {
    std::ifstream in(sidecar_path);
    if (!in) {
        throw std::runtime_error(sidecar_path + ": cannot read the engine sidecar; `attn-export trt` writes it next to the engine");
    }
    std::ostringstream text;
    text << in.rdbuf();
    return text.str();
}

}  // namespace

std::string sidecar_runtime(const std::string& text, const std::string& what) {
    const nlohmann::json doc = parse_object(text, what);
    const auto it = doc.find("runtime");
    if (it == doc.end() || it->is_null()) return "tensorrt";
    if (!it->is_string()) throw std::runtime_error(what + ": \"runtime\" is not a string");
    return it->get<std::string>();
}

SidecarVersion read_sidecar_version(const std::string& sidecar_path) {
    const std::string text = read_text(sidecar_path);
    return SidecarVersion{sidecar_runtime(text, sidecar_path), sidecar_tensorrt_version(text, sidecar_path)};
}

std::string sidecar_tensorrt_version(const std::string& text, const std::string& what) {
    const nlohmann::json doc = parse_object(text, what);
    // Only the top-level field counts: the same key inside a nested object or a string is not it.
    const auto it = doc.find("tensorrt_version");
    if (it == doc.end()) throw std::runtime_error(what + ": no \"tensorrt_version\" field");
    if (!it->is_string()) throw std::runtime_error(what + ": \"tensorrt_version\" is not a string");
    return it->get<std::string>();
}

std::string read_sidecar_tensorrt_version(const std::string& sidecar_path) {
    return sidecar_tensorrt_version(read_text(sidecar_path), sidecar_path);
}

bool same_tensorrt_release(const std::string& a, const std::string& b) { return release_of(a) == release_of(b); }

}  // namespace attn_export
