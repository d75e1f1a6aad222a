// NumPy .npy reader/writer. Format reference: numpy.lib.format (NEP 1).
//
// File layout: "\x93NUMPY", major, minor, header length (uint16 LE for 1.0,
// uint32 LE for 2.0/3.0), then an ASCII (UTF-8 for 3.0) Python dict literal
// {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), } padded with
// spaces and ending in '\n', then the raw data.
#include "attn_export/npy.hpp"

#include <cctype>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <random>
#include <sstream>
#include <stdexcept>

namespace attn_export {
namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicLen = 6;
// numpy aligns the data to 64 bytes and reserves room for the first axis to
// grow to 21 digits; both are copied here so our files match numpy.save's.
constexpr size_t kArrayAlign = 64;
constexpr size_t kGrowthAxisMaxDigits = 21;

[[noreturn]] void fail(const std::string& what, const std::string& problem) {
    throw std::runtime_error(what + ": " + problem);
}

bool host_is_little_endian() {
    const uint16_t one = 1;
    uint8_t first = 0;
    std::memcpy(&first, &one, 1);
    return first == 1;
}

// Canonical descr for a supported dtype, or an exception explaining why not.
std::string canonical_dtype(const std::string& descr, const std::string& what) {
    if (descr.size() < 2) fail(what, "unsupported dtype '" + descr + "'");
    char order = descr[0];
    const std::string kind = descr.substr(1);
    if (kind == "u1" || kind == "b1") {
        if (order == '<' || order == '>' || order == '|' || order == '=') return "|" + kind;
    }
    if (order == '=') order = '<';  // native order; the host is checked to be little-endian
    if (order == '>') {
        fail(what, "big-endian dtype '" + descr +
                       "' is not supported; convert it with arr.astype(arr.dtype.newbyteorder('<'))");
    }
    if (order == '<' && (kind == "f4" || kind == "f2" || kind == "f8" || kind == "i8" || kind == "i4")) {
        return "<" + kind;
    }
    fail(what, "unsupported dtype '" + descr +
                   "' (supported: <f4, <f2, <f8, <i8, <i4, |u1, |b1)");
}

// A tiny parser for the restricted Python literal numpy writes as header.
class HeaderParser {
public:
    HeaderParser(const std::string& text, const std::string& what) : s_(text), what_(what) {}

    void parse(std::string& descr, bool& fortran_order, std::vector<int64_t>& shape) {
        bool have_descr = false, have_order = false, have_shape = false;
        skip_ws();
        if (!eat('{')) fail(what_, "header is not a dict: " + s_);
        skip_ws();
        while (!eat('}')) {
            const std::string key = parse_string();
            skip_ws();
            expect(':');
            skip_ws();
            if (key == "descr") {
                if (peek() != '\'' && peek() != '"') {
                    fail(what_, "structured dtypes are not supported (descr is not a string)");
                }
                descr = parse_string();
                have_descr = true;
            } else if (key == "fortran_order") {
                fortran_order = parse_bool();
                have_order = true;
            } else if (key == "shape") {
                shape = parse_shape();
                have_shape = true;
            } else {
                fail(what_, "header has an unexpected key '" + key + "'");
            }
            skip_ws();
            if (eat(',')) {
                skip_ws();
            } else if (peek() != '}') {
                fail(what_, "header is not a valid dict near offset " + std::to_string(pos_));
            }
        }
        skip_ws();
        if (pos_ != s_.size()) fail(what_, "trailing characters after the header dict");
        if (!have_descr || !have_order || !have_shape) {
            fail(what_, "header must hold the keys 'descr', 'fortran_order' and 'shape'");
        }
    }

private:
    char peek() const { return pos_ < s_.size() ? s_[pos_] : '\0'; }
    bool eat(char c) {
        if (peek() != c) return false;
        ++pos_;
        return true;
    }
    void expect(char c) {
        if (!eat(c)) fail(what_, std::string("malformed header: expected '") + c + "' at offset " + std::to_string(pos_));
    }
    void skip_ws() {
        while (pos_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[pos_]))) ++pos_;
    }
    std::string parse_string() {
        const char quote = peek();
        if (quote != '\'' && quote != '"') fail(what_, "malformed header: expected a string at offset " + std::to_string(pos_));
        ++pos_;
        const size_t end = s_.find(quote, pos_);
        if (end == std::string::npos) fail(what_, "malformed header: unterminated string");
        std::string out = s_.substr(pos_, end - pos_);
        pos_ = end + 1;
        return out;
    }
    bool parse_bool() {
        if (s_.compare(pos_, 4, "True") == 0) {
            pos_ += 4;
            return true;
        }
        if (s_.compare(pos_, 5, "False") == 0) {
            pos_ += 5;
            return false;
        }
        fail(what_, "malformed header: 'fortran_order' is not True or False");
    }
    std::vector<int64_t> parse_shape() {
        std::vector<int64_t> shape;
        expect('(');
        skip_ws();
        while (!eat(')')) {
            if (!std::isdigit(static_cast<unsigned char>(peek()))) {
                fail(what_, "malformed header: shape must be a tuple of non-negative integers");
            }
            int64_t v = 0;
            while (std::isdigit(static_cast<unsigned char>(peek()))) {
                const int digit = peek() - '0';
                if (v > (std::numeric_limits<int64_t>::max() - digit) / 10) fail(what_, "shape dimension overflows int64");
                v = v * 10 + digit;
                ++pos_;
            }
            shape.push_back(v);
            skip_ws();
            if (eat(',')) {
                skip_ws();
            } else if (peek() != ')') {
                fail(what_, "malformed header: shape must be a tuple of non-negative integers");
            }
        }
        return shape;
    }

    const std::string& s_;
    const std::string& what_;
    size_t pos_ = 0;
};

// Python's repr of a tuple of ints: "()", "(5,)", "(2, 3)".
std::string python_tuple(const std::vector<int64_t>& shape) {
    std::string out = "(";
    for (size_t i = 0; i < shape.size(); ++i) {
        if (i) out += ", ";
        out += std::to_string(shape[i]);
    }
    if (shape.size() == 1) out += ",";
    return out + ")";
}

uint64_t checked_numel(const std::vector<int64_t>& shape, const std::string& what) {
    uint64_t n = 1;
    for (int64_t d : shape) {
        if (d < 0) fail(what, "negative dimension in shape " + shape_to_string(shape));
        const uint64_t ud = static_cast<uint64_t>(d);
        if (ud != 0 && n > std::numeric_limits<uint64_t>::max() / ud) fail(what, "shape " + shape_to_string(shape) + " is too large");
        n *= ud;
    }
    return n;
}

}  // namespace

size_t npy_dtype_size(const std::string& dtype) {
    if (dtype == "<f8" || dtype == "<i8") return 8;
    if (dtype == "<f4" || dtype == "<i4") return 4;
    if (dtype == "<f2") return 2;
    if (dtype == "|u1" || dtype == "|b1") return 1;
    throw std::runtime_error("unsupported dtype '" + dtype + "' (supported: <f4, <f2, <f8, <i8, <i4, |u1, |b1)");
}

size_t NpyArray::element_size() const { return npy_dtype_size(dtype); }

int64_t NpyArray::numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
}

size_t NpyArray::nbytes() const { return static_cast<size_t>(numel()) * element_size(); }

std::string shape_to_string(const std::vector<int64_t>& shape) {
    std::string out = "[";
    for (size_t i = 0; i < shape.size(); ++i) {
        if (i) out += ", ";
        out += std::to_string(shape[i]);
    }
    return out + "]";
}

NpyArray parse_npy(const std::vector<uint8_t>& bytes, const std::string& what) {
    if (!host_is_little_endian()) fail(what, "only little-endian hosts are supported");
    if (bytes.size() < kMagicLen + 2 || std::memcmp(bytes.data(), kMagic, kMagicLen) != 0) {
        fail(what, "not a .npy file (bad magic string)");
    }
    const int major = bytes[6];
    const int minor = bytes[7];
    size_t prefix = 0, header_len = 0;
    if (major == 1) {
        prefix = 10;
        if (bytes.size() < prefix) fail(what, "truncated header");
        header_len = static_cast<size_t>(bytes[8]) | (static_cast<size_t>(bytes[9]) << 8);
    } else if (major == 2 || major == 3) {
        prefix = 12;
        if (bytes.size() < prefix) fail(what, "truncated header");
        header_len = 0;
        for (int i = 3; i >= 0; --i) header_len = (header_len << 8) | bytes[8 + i];
    } else {
        fail(what, "unsupported .npy format version " + std::to_string(major) + "." + std::to_string(minor));
    }
    if (bytes.size() - prefix < header_len) fail(what, "truncated header");
    const std::string header(reinterpret_cast<const char*>(bytes.data() + prefix), header_len);

    NpyArray array;
    bool fortran_order = false;
    std::string descr;
    HeaderParser(header, what).parse(descr, fortran_order, array.shape);
    if (fortran_order) {
        fail(what, "Fortran-order arrays are not supported; save a C-order copy with np.ascontiguousarray(arr)");
    }
    array.dtype = canonical_dtype(descr, what);

    const uint64_t numel = checked_numel(array.shape, what);
    const size_t elem = array.element_size();
    if (numel > std::numeric_limits<uint64_t>::max() / elem) fail(what, "shape " + shape_to_string(array.shape) + " is too large");
    const uint64_t expected = numel * elem;
    const size_t available = bytes.size() - prefix - header_len;
    if (available < expected) {
        fail(what, "truncated data: shape " + shape_to_string(array.shape) + " with dtype " + array.dtype + " needs " +
                       std::to_string(expected) + " bytes but the file holds " + std::to_string(available));
    }
    if (available > expected) {
        fail(what, "size mismatch: shape " + shape_to_string(array.shape) + " with dtype " + array.dtype + " needs " +
                       std::to_string(expected) + " bytes but the file holds " + std::to_string(available));
    }
    const auto begin = bytes.begin() + static_cast<std::ptrdiff_t>(prefix + header_len);
    array.data.assign(begin, bytes.end());
    return array;
}

NpyArray load_npy(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error(path + ": cannot open for reading");
    std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (in.bad()) throw std::runtime_error(path + ": read error");
    return parse_npy(bytes, path);
}

std::vector<uint8_t> serialize_npy(const NpyArray& array) {
    const std::string what = "save_npy";
    const std::string dtype = canonical_dtype(array.dtype, what);
    const uint64_t numel = checked_numel(array.shape, what);
    if (array.data.size() != numel * npy_dtype_size(dtype)) {
        fail(what, "data holds " + std::to_string(array.data.size()) + " bytes but shape " + shape_to_string(array.shape) +
                       " with dtype " + dtype + " needs " + std::to_string(numel * npy_dtype_size(dtype)));
    }
    // Same text and padding as numpy.save, so the files are byte-identical.
    std::string header = "{'descr': '" + dtype + "', 'fortran_order': False, 'shape': " + python_tuple(array.shape) + ", }";
    if (!array.shape.empty()) header.append(kGrowthAxisMaxDigits - std::to_string(array.shape[0]).size(), ' ');

    std::vector<uint8_t> out;
    for (int version = 1; version <= 2; ++version) {
        const size_t len_field = version == 1 ? 2 : 4;
        const size_t hlen = header.size() + 1;  // + '\n'
        const size_t padlen = kArrayAlign - ((kMagicLen + 2 + len_field + hlen) % kArrayAlign);
        const size_t total = hlen + padlen;
        if (version == 1 && total > 0xFFFF) continue;  // too long for 1.0: use 2.0
        if (total > 0xFFFFFFFFu) fail(what, "header too long");
        out.assign(kMagic, kMagic + kMagicLen);
        out.push_back(static_cast<uint8_t>(version));
        out.push_back(0);
        for (size_t i = 0; i < len_field; ++i) out.push_back(static_cast<uint8_t>((total >> (8 * i)) & 0xFF));
        out.insert(out.end(), header.begin(), header.end());
        out.insert(out.end(), padlen, ' ');
        out.push_back('\n');
        break;
    }
    out.insert(out.end(), array.data.begin(), array.data.end());
    return out;
}

void save_npy(const std::string& path, const NpyArray& array) {
    namespace fs = std::filesystem;
    const std::vector<uint8_t> bytes = serialize_npy(array);

    const fs::path target(path);
    std::random_device rd;
    std::ostringstream suffix;
    suffix << std::hex << rd() << rd();
    const fs::path tmp = target.parent_path() / ("." + target.filename().string() + ".tmp-" + suffix.str());
    {
        std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
        if (!out) throw std::runtime_error(path + ": cannot open " + tmp.string() + " for writing");
        out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
        out.close();
        if (!out) {
            std::error_code ignored;
            fs::remove(tmp, ignored);
            throw std::runtime_error(path + ": write failed");
        }
    }
    std::error_code ec;
    fs::rename(tmp, target, ec);  // atomic replacement on POSIX file systems
    if (ec) {
        std::error_code ignored;
        fs::remove(tmp, ignored);
        throw std::runtime_error(path + ": cannot rename the temporary file into place: " + ec.message());
    }
}

}  // namespace attn_export
