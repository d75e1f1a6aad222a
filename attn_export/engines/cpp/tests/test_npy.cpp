// Unit tests for the .npy library and the sidecar helpers (no test framework).
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "attn_export/npy.hpp"
#include "attn_export/sidecar.hpp"

using attn_export::NpyArray;

namespace {

int failures = 0;

#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) {                                                                \
            std::cerr << __FILE__ << ":" << __LINE__ << ": CHECK failed: " #cond "\n"; \
            ++failures;                                                               \
        }                                                                             \
    } while (0)

// Checks that `fn` throws std::runtime_error whose message contains `needle`.
void check_throws(const std::function<void()>& fn, const std::string& needle, int line) {
    try {
        fn();
    } catch (const std::runtime_error& e) {
        if (std::string(e.what()).find(needle) == std::string::npos) {
            std::cerr << __FILE__ << ":" << line << ": message '" << e.what() << "' lacks '" << needle << "'\n";
            ++failures;
        }
        return;
    }
    std::cerr << __FILE__ << ":" << line << ": expected an exception mentioning '" << needle << "'\n";
    ++failures;
}
#define CHECK_THROWS(expr, needle) check_throws([&] { expr; }, needle, __LINE__)

std::vector<uint8_t> bytes_of(const std::string& s) { return std::vector<uint8_t>(s.begin(), s.end()); }

// A hand-made .npy image with the given header text (version 1.0).
std::vector<uint8_t> make_npy(const std::string& header, const std::vector<uint8_t>& data, int major = 1) {
    std::vector<uint8_t> out = bytes_of(std::string("\x93NUMPY", 6));
    out.push_back(static_cast<uint8_t>(major));
    out.push_back(0);
    const size_t len = header.size();
    const int len_bytes = major == 1 ? 2 : 4;
    for (int i = 0; i < len_bytes; ++i) out.push_back(static_cast<uint8_t>((len >> (8 * i)) & 0xFF));
    out.insert(out.end(), header.begin(), header.end());
    out.insert(out.end(), data.begin(), data.end());
    return out;
}

NpyArray make_array(const std::string& dtype, std::vector<int64_t> shape) {
    NpyArray a;
    a.dtype = dtype;
    a.shape = std::move(shape);
    a.data.resize(a.nbytes());
    for (size_t i = 0; i < a.data.size(); ++i) a.data[i] = static_cast<uint8_t>(i * 7 + 1);
    if (dtype == "|b1") {
        for (auto& b : a.data) b &= 1;
    }
    return a;
}

void test_roundtrip_in_memory() {
    const std::vector<std::string> dtypes = {"<f4", "<f2", "<f8", "<i8", "<i4", "|u1", "|b1"};
    const std::vector<std::vector<int64_t>> shapes = {{}, {5}, {2, 3, 4, 5}, {0}, {3, 0, 2}};
    for (const auto& dtype : dtypes) {
        for (const auto& shape : shapes) {
            const NpyArray a = make_array(dtype, shape);
            const std::vector<uint8_t> bytes = attn_export::serialize_npy(a);
            CHECK((bytes.size() - a.nbytes()) % 64 == 0);  // header is 64-byte aligned
            CHECK(bytes[6] == 1);                          // version 1.0
            const NpyArray b = attn_export::parse_npy(bytes);
            CHECK(b.dtype == a.dtype);
            CHECK(b.shape == a.shape);
            CHECK(b.data == a.data);
        }
    }
}

void test_header_text() {
    NpyArray a = make_array("<f4", {2, 3});
    const std::vector<uint8_t> bytes = attn_export::serialize_npy(a);
    const std::string header(bytes.begin() + 10, bytes.end() - static_cast<std::ptrdiff_t>(a.nbytes()));
    CHECK(header.rfind("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 0) == 0);
    CHECK(header.back() == '\n');
    a = make_array("<i8", {7});
    const std::vector<uint8_t> one = attn_export::serialize_npy(a);
    CHECK(std::string(one.begin(), one.end()).find("'shape': (7,), }") != std::string::npos);
    a = make_array("<f8", {});
    const std::vector<uint8_t> zero = attn_export::serialize_npy(a);
    CHECK(std::string(zero.begin(), zero.end()).find("'shape': (), }") != std::string::npos);
}

void test_versions_and_spellings() {
    const std::vector<uint8_t> data = {1, 0, 0, 0, 2, 0, 0, 0};
    for (int major : {1, 2, 3}) {
        const NpyArray a = attn_export::parse_npy(make_npy("{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }\n", data, major));
        CHECK(a.dtype == "<i4");
        CHECK(a.shape == std::vector<int64_t>{2});
        CHECK(a.data == data);
    }
    // Double quotes, no trailing comma, other key order, '=' byte order.
    const NpyArray b = attn_export::parse_npy(make_npy("{\"shape\": (1, 2), \"fortran_order\": False, \"descr\": \"=i4\"}", data));
    CHECK(b.dtype == "<i4");
    CHECK((b.shape == std::vector<int64_t>{1, 2}));
    const NpyArray c = attn_export::parse_npy(make_npy("{'descr': '<u1', 'fortran_order': False, 'shape': (8,), }", data));
    CHECK(c.dtype == "|u1");
}

void test_version_2_written_for_long_headers() {
    // A header over 65535 bytes (here: 30000 dimensions of 1) needs format 2.0.
    NpyArray a;
    a.dtype = "|u1";
    a.shape.assign(30000, 1);
    a.data.assign(1, 42);
    const std::vector<uint8_t> bytes = attn_export::serialize_npy(a);
    CHECK(bytes[6] == 2);
    const NpyArray b = attn_export::parse_npy(bytes);
    CHECK(b.shape == a.shape);
    CHECK(b.data == a.data);
}

void test_refusals() {
    const std::vector<uint8_t> four = {0, 0, 0, 0};
    CHECK_THROWS(attn_export::parse_npy(bytes_of("not a numpy file at all")), "bad magic");
    CHECK_THROWS(attn_export::parse_npy(make_npy("{'descr': '<f4', 'fortran_order': True, 'shape': (1,), }", four)), "Fortran");
    CHECK_THROWS(attn_export::parse_npy(make_npy("{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }", four)), "big-endian");
    CHECK_THROWS(attn_export::parse_npy(make_npy("{'descr': '<c8', 'fortran_order': False, 'shape': (1,), }", four)), "unsupported dtype");
    CHECK_THROWS(attn_export::parse_npy(make_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", four)), "truncated data");
    CHECK_THROWS(attn_export::parse_npy(make_npy("{'descr': '<u1', 'fortran_order': False, 'shape': (2,), }", four)), "size mismatch");
    CHECK_THROWS(attn_export::parse_npy(make_npy("['descr', '<f4']", four)), "not a dict");
    CHECK_THROWS(attn_export::parse_npy(make_npy("{'descr': '<f4', 'shape': (1,), }", four)), "fortran_order");
    CHECK_THROWS(attn_export::parse_npy(make_npy("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }", four)),
                 "structured");
    CHECK_THROWS(attn_export::parse_npy(make_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", four, 9)),
                 "format version");
    std::vector<uint8_t> cut = make_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }", four);
    cut.resize(20);
    CHECK_THROWS(attn_export::parse_npy(cut), "truncated header");

    NpyArray wrong = make_array("<f4", {2});
    wrong.data.pop_back();
    CHECK_THROWS(attn_export::serialize_npy(wrong), "needs 8");
    CHECK_THROWS(attn_export::load_npy("/nonexistent/folder/x.npy"), "cannot open");
}

void test_save_and_load_file() {
    namespace fs = std::filesystem;
    const fs::path dir = fs::temp_directory_path() / ("attn_export_test_npy_" + std::to_string(std::rand()));
    fs::create_directories(dir);
    const std::string path = (dir / "a.npy").string();
    const NpyArray a = make_array("<f2", {2, 3});
    attn_export::save_npy(path, a);
    attn_export::save_npy(path, a);  // replacing an existing file works too
    const NpyArray b = attn_export::load_npy(path);
    CHECK(b.dtype == a.dtype && b.shape == a.shape && b.data == a.data);
    size_t entries = 0;
    for (const auto& e : fs::directory_iterator(dir)) entries += e.is_regular_file();
    CHECK(entries == 1);  // no temporary file left behind
    CHECK_THROWS(attn_export::save_npy((dir / "missing" / "a.npy").string(), a), "cannot open");
    fs::remove_all(dir);
}

void test_sidecar() {
    namespace fs = std::filesystem;
    const std::string json =
        R"({"format": "attn-export-engine/1", "tensorrt_version" : "10.14.1.48", "gpu": {"name": "x"}})";
    CHECK(attn_export::sidecar_tensorrt_version(json) == "10.14.1.48");
    CHECK_THROWS(attn_export::sidecar_tensorrt_version(R"({"format": "x"})"), "tensorrt_version");
    CHECK_THROWS(attn_export::sidecar_tensorrt_version(R"({"tensorrt_version": 10})"), "not a string");
    // A real JSON parser: the key inside a string or a nested object is not the field, escapes are decoded.
    CHECK(attn_export::sidecar_tensorrt_version(
              R"({"note": "\"tensorrt_version\": \"1.0\"", "gpu": {"tensorrt_version": "2.0"}, "tensorrt_version": "10.1\u002e2"})") ==
          "10.1.2");
    CHECK_THROWS(attn_export::sidecar_tensorrt_version(R"({"gpu": {"tensorrt_version": "2.0"}})"), "no \"tensorrt_version\"");
    CHECK_THROWS(attn_export::sidecar_tensorrt_version(R"({"tensorrt_version": "10.1")"), "not valid JSON");
    CHECK_THROWS(attn_export::sidecar_tensorrt_version(R"(["tensorrt_version", "10.1"])"), "not a JSON object");
    CHECK(attn_export::same_tensorrt_release("10.14.1.48", "10.14.1"));
    CHECK(attn_export::same_tensorrt_release("11.1", "11.1.0"));
    CHECK(!attn_export::same_tensorrt_release("10.14.1.48", "10.14.2"));
    CHECK(!attn_export::same_tensorrt_release("10.14.1", "11.14.1"));
    CHECK_THROWS(attn_export::read_sidecar_tensorrt_version("/nonexistent/engine.plan.json"), "attn-export trt");
    // The runtime: TensorRT unless the sidecar says TensorRT-RTX.
    CHECK(attn_export::sidecar_runtime(json) == "tensorrt");
    CHECK(attn_export::sidecar_runtime(R"({"runtime": null, "tensorrt_version": "10.14"})") == "tensorrt");
    CHECK(attn_export::sidecar_runtime(R"({"runtime": "rtx", "tensorrt_version": "1.7.1.116"})") == "rtx");
    CHECK(attn_export::sidecar_runtime(R"({"gpu": {"runtime": "rtx"}})") == "tensorrt");
    CHECK_THROWS(attn_export::sidecar_runtime(R"({"runtime": 1})"), "not a string");
    CHECK_THROWS(attn_export::read_sidecar_version("/nonexistent/engine.plan.json"), "attn-export trt");
    const fs::path side = fs::temp_directory_path() / "attn_export_test_sidecar.json";
    {
        std::ofstream out(side);
        out << R"({"runtime": "rtx", "tensorrt_version": "1.7.1.116"})";
    }
    const attn_export::SidecarVersion v = attn_export::read_sidecar_version(side.string());
    CHECK(v.runtime == "rtx" && v.version == "1.7.1.116");
    fs::remove(side);
}

}  // namespace

int main() {
    test_roundtrip_in_memory();
    test_header_text();
    test_versions_and_spellings();
    test_version_2_written_for_long_headers();
    test_refusals();
    test_save_and_load_file();
    test_sidecar();
    if (failures) {
        std::cerr << failures << " check(s) failed\n";
        return 1;
    }
    std::cout << "all test_npy checks passed\n";
    return 0;
}
