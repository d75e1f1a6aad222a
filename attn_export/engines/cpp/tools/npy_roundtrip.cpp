// npy_roundtrip IN OUT: load IN with attn_export::load_npy and write it to OUT
// with save_npy. Used by the Python tests to cross-check against numpy.
#include <exception>
#include <iostream>

#include "attn_export/npy.hpp"

int main(int argc, char** argv) {
    if (argc != 3) {
        std::cerr << "usage: npy_roundtrip IN.npy OUT.npy\n";
        return 2;
    }
    try {
        const attn_export::NpyArray array = attn_export::load_npy(argv[1]);
        attn_export::save_npy(argv[2], array);
        std::cout << array.dtype << " " << attn_export::shape_to_string(array.shape) << "\n";
    } catch (const std::exception& e) {
        std::cerr << "npy_roundtrip: error: " << e.what() << "\n";
        return 1;
    }
    return 0;
}
