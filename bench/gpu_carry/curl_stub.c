/* Stand-in for libcurl.so.4 (Debian's OpenSSL flavour, symbol version CURL_OPENSSL_4).
   Tesseract only uses libcurl to OCR an http(s):// URL given as input; with this stub
   curl_easy_init() returns NULL and tesseract prints "curl_easy_init failed" for such input.
   Local files are unaffected. */
#include <stddef.h>
typedef void CURL;
typedef int CURLcode;
CURL *curl_easy_init(void) { return NULL; }
CURLcode curl_easy_setopt(CURL *c, int opt, ...) { (void)c; (void)opt; return 2; /* CURLE_FAILED_INIT */ }
CURLcode curl_easy_perform(CURL *c) { (void)c; return 2; }
void curl_easy_cleanup(CURL *c) { (void)c; }
const char *curl_easy_strerror(CURLcode e) { (void)e; return "libcurl not available (stub)"; }
char *curl_version(void) { return (char *)"libcurl-stub (no URL input)"; }
