// Argument checks for the JS-facing methods. Wrong types throw TypeError (and
// out-of-range numbers RangeError) synchronously; a name librados cannot take
// (empty, or containing NUL) is a rejection with EINVAL instead, decided by
// the caller with ValidName().
#pragma once

#include <cstdint>
#include <string>

#include "common.h"

namespace arch_rados {

constexpr uint64_t kMaxSafeInteger = 9007199254740991ULL;  // 2^53 - 1

std::string ArgString(const Napi::CallbackInfo& info, size_t index, const char* name);

// A non-negative integer no larger than `max`.
uint64_t ArgUint(const Napi::CallbackInfo& info, size_t index, const char* name, uint64_t max = kMaxSafeInteger);

// A non-negative finite number (fractions allowed).
double ArgSeconds(const Napi::CallbackInfo& info, size_t index, const char* name);

// A Buffer (any Uint8Array/ArrayBufferView).
Napi::Buffer<uint8_t> ArgBuffer(const Napi::CallbackInfo& info, size_t index, const char* name);

// A bigint or a non-negative safe integer, as uint64.
uint64_t ArgU64(const Napi::CallbackInfo& info, size_t index, const char* name);

Napi::Function ArgFunction(const Napi::CallbackInfo& info, size_t index, const char* name);

// Object, pool, lock and cookie names go to librados as C strings: they must
// be non-empty (librados has no empty object name) and must not contain NUL.
bool ValidName(const std::string& name);
// Lock descriptions, tags and cookies may be empty but still not contain NUL.
bool ValidCString(const std::string& s);

}  // namespace arch_rados
