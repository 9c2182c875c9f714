// The single translation unit that compiles stb_image / stb_image_write (header-only libraries
// whose implementation must be instantiated exactly once per binary). Only image.cpp uses them.
#define STB_IMAGE_IMPLEMENTATION
#define STB_IMAGE_WRITE_IMPLEMENTATION
// Human-readable failure reasons ("Corrupt JPEG", ...) end up in mdd::Error messages.
#define STBI_FAILURE_USERMSG
// Decoding only happens from memory (files are read with read_file_bytes, which names the file
// in its errors); the stdio entry points would be dead code.
#define STBI_NO_STDIO
// Only the two formats mdd reads: every other decoder is attack surface without a use.
#define STBI_ONLY_PNG
#define STBI_ONLY_JPEG
#define STBI_WRITE_NO_STDIO
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#pragma GCC diagnostic ignored "-Wsign-compare"
#endif
// third_party/stb/stb_image.h (v2.30, vendored: Debian's 2.27 overflows on hostile JPEGs) comes
// first on the include path; stb_image_write.h is Debian's.
#include "stb_image.h"
#include <stb_image_write.h>
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
