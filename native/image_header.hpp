// The size an encoded image declares, read from its header without decoding it.
#pragma once

#include <cstddef>
#include <cstdint>

namespace ecso {

// Width and height from the header of a PNG, JPEG, BMP, GIF, PSD, PIC, PNM, HDR or TGA image, parsed by the same
// stb_image code that mtmd decodes with (compiled here from the pinned llama.cpp source, private to libecso).
// False when stb_image cannot read the header; decoding would then fail too.
bool image_header_size(const uint8_t *data, size_t size, int *width, int *height);

}  // namespace ecso
