// Reading and writing NumPy .npy files (C order, little-endian).
//
// Supported dtypes (numpy descr): "<f4" float32, "<f2" float16 (kept as raw
// uint16 storage), "<f8" float64, "<i8" int64, "<i4" int32, "|u1" uint8 and
// "|b1" bool. Reading accepts format versions 1.0, 2.0 and 3.0; writing uses
// 1.0 unless the header is too long for it, then 2.0.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace attn_export {

struct NpyArray {
    std::string dtype;            // numpy descr, e.g. "<f4"
    std::vector<int64_t> shape;   // empty for a 0-d array
    std::vector<uint8_t> data;    // numel() * element_size() bytes, C order

    // Bytes per element of `dtype`; throws std::runtime_error for an unsupported dtype.
    size_t element_size() const;
    // Product of `shape` (1 for a 0-d array, 0 if any dimension is 0).
    int64_t numel() const;
    // numel() * element_size().
    size_t nbytes() const;
};

// Bytes per element for a supported descr; throws std::runtime_error otherwise.
size_t npy_dtype_size(const std::string& dtype);

// "[2, 3, 64, 64]": for error messages.
std::string shape_to_string(const std::vector<int64_t>& shape);

// Parses a whole .npy image held in memory. `what` names the source in error messages.
NpyArray parse_npy(const std::vector<uint8_t>& bytes, const std::string& what = "<memory>");

// Loads `path`; throws std::runtime_error naming the file and the problem.
NpyArray load_npy(const std::string& path);

// Serializes `array` to the bytes of a .npy file (the same bytes numpy.save writes).
std::vector<uint8_t> serialize_npy(const NpyArray& array);

// Writes `array` to `path` through a temporary file in the same folder and a
// rename, so an interrupted write never leaves a half-written `path`.
void save_npy(const std::string& path, const NpyArray& array);

}  // namespace attn_export
