/* Stand-in for libarchive.so.13. Tesseract only uses libarchive to read a traineddata
   packed inside an archive; archive_read_new() returning NULL makes it fall back to
   reading the plain .traineddata file (TessdataManager::Init), which is what tessdata/ holds. */
#include <stddef.h>
#include <sys/types.h>
struct archive; struct archive_entry;
struct archive *archive_read_new(void) { return NULL; }
int archive_read_support_filter_all(struct archive *a) { (void)a; return -30; /* ARCHIVE_FATAL */ }
int archive_read_support_format_all(struct archive *a) { (void)a; return -30; }
int archive_read_open_filename(struct archive *a, const char *f, size_t n) { (void)a; (void)f; (void)n; return -30; }
int archive_read_next_header(struct archive *a, struct archive_entry **e) { (void)a; if (e) *e = NULL; return 1; /* ARCHIVE_EOF */ }
const char *archive_entry_pathname(struct archive_entry *e) { (void)e; return NULL; }
long long archive_entry_size(struct archive_entry *e) { (void)e; return 0; }
ssize_t archive_read_data(struct archive *a, void *b, size_t n) { (void)a; (void)b; (void)n; return -30; }
int archive_read_free(struct archive *a) { (void)a; return 0; }
const char *archive_version_details(void) { return "libarchive-stub (no archive-packed traineddata)"; }
