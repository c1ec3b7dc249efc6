#pragma once
// Only SHA-256 from OpenSSL's libcrypto: its x86-64 code uses the CPU's SHA extensions (SHA-NI)
// when present. The one-shot SHA256_* API is deprecated in OpenSSL 3 in favour of EVP, whose
// per-call provider lookup costs more than hashing a 200-byte audit record; it remains supported.
#define OPENSSL_SUPPRESS_DEPRECATED 1
#include <openssl/sha.h>
