#include "attn_export/sidecar.hpp"

#include <array>
#include <cctype>
#include <fstream>
#include <sstream>
#include <stdexcept>

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

}  // namespace

std::string sidecar_tensorrt_version(const std::string& text, const std::string& what) {
    const std::string key = "\"tensorrt_version\"";
    const size_t at = text.find(key);
    if (at == std::string::npos) throw std::runtime_error(what + ": no \"tensorrt_version\" field");
    size_t pos = at + key.size();
    auto skip_ws = [&] {
        while (pos < text.size() && std::isspace(static_cast<unsigned char>(text[pos]))) ++pos;
    };
    skip_ws();
    if (pos >= text.size() || text[pos] != ':') throw std::runtime_error(what + ": malformed \"tensorrt_version\" field");
    ++pos;
    skip_ws();
    if (pos >= text.size() || text[pos] != '"') throw std::runtime_error(what + ": \"tensorrt_version\" is not a string");
    const size_t end = text.find('"', pos + 1);  // version strings hold no escapes
    if (end == std::string::npos) throw std::runtime_error(what + ": unterminated \"tensorrt_version\" string");
    return text.substr(pos + 1, end - pos - 1);
}

std::string read_sidecar_tensorrt_version(const std::string& sidecar_path) {
    std::ifstream in(sidecar_path);
    if (!in) {
        throw std::runtime_error(sidecar_path + ": cannot read the engine sidecar; `attn-export trt` writes it next to the engine");
    }
    std::ostringstream text;
    text << in.rdbuf();
    return sidecar_tensorrt_version(text.str(), sidecar_path);
}

bool same_tensorrt_release(const std::string& a, const std::string& b) { return release_of(a) == release_of(b); }

}  // namespace attn_export
