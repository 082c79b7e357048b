// stb_image's header reader, compiled privately (static functions) so libecso depends on no symbol libmtmd happens
// to export. Only the in-memory entry point is used; mtmd's own copy still does the decoding.
#include "image_header.hpp"

#include <climits>

#define STB_IMAGE_STATIC
#define STB_IMAGE_IMPLEMENTATION
#define STBI_NO_STDIO
#include "stb/stb_image.h"

namespace ecso {

bool image_header_size(const uint8_t *data, size_t size, int *width, int *height) {
    if (!data || size == 0 || size > (size_t)INT_MAX) return false;
    int comp = 0;
    return stbi_info_from_memory(data, (int)size, width, height, &comp) == 1;
}

}  // namespace ecso
