#pragma once
/// \file
/// `MDD_API` marks the library's public symbols. The shared library is compiled with hidden
/// visibility, so only what the public headers declare with `MDD_API` is exported: internal helpers
/// (the unpickler, zip reader, JSON previews, fused kernels) stay out of the dynamic symbol table,
/// can change without an ABI break, and cannot clash with a user's symbols of the same name.
/// Types are marked as a whole (their vtables and typeinfo must be visible so that, e.g.,
/// `catch (const mdd::Error&)` works across the library boundary).

#if defined(__GNUC__) || defined(__clang__)
#define MDD_API __attribute__((visibility("default")))
#else
#define MDD_API
#endif
