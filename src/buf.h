/* buf.h: growable byte buffers, heap or memfd-backed, and refcounted blobs. */
#ifndef PP_BUF_H
#define PP_BUF_H

#include <stddef.h>
#include <stdint.h>

/* A write buffer. It starts on the heap; when `memfd_at` is non-zero and
 * the buffer would grow past it, the contents move into a memfd mapping so
 * the bytes can later be handed to another process as an fd, not copied. */
typedef struct pp_wbuf {
  char *p;
  size_t n;        /* bytes written */
  size_t cap;      /* bytes available at p */
  size_t memfd_at; /* 0: never use a memfd */
  int fd;          /* memfd, or -1 while on the heap */
} pp_wbuf;

#define PP_WBUF_INIT                                                                               \
  { NULL, 0, 0, 0, -1 }

void pp_wbuf_init(pp_wbuf *b, size_t memfd_at);
/* Make room for `extra` more bytes: 0 or an errno value. */
int pp_wbuf_grow(pp_wbuf *b, size_t extra);
void pp_wbuf_free(pp_wbuf *b);
/* Drop the contents; keep a small heap buffer for reuse. */
void pp_wbuf_reset(pp_wbuf *b);

static inline int pp_wbuf_reserve(pp_wbuf *b, size_t extra) {
  return (b->cap - b->n >= extra) ? 0 : pp_wbuf_grow(b, extra);
}

/* Copy len bytes to b->p + off (room already reserved). Large copies into
 * a memfd go through pwrite: the kernel fills the page cache directly,
 * which is about twice as fast as faulting in the mapping page by page.
 * Returns 0 or an errno value. */
int pp_wbuf_put_at(pp_wbuf *b, size_t off, const void *s, size_t len);

/* memset(p, 0, n), kept out of line so that malloc + pp_zero_touch is not
 * folded into calloc: the pages are written now, by the caller's thread. */
void pp_zero_touch(void *p, size_t n);

/* A refcounted, immutable byte blob: heap memory or a read-only mapping.
 * Results and task payloads live in blobs so that several owners (a job,
 * its future, a chunk) can share them without copies. */
typedef struct pp_blob {
  int refs; /* atomic */
  int mapped;
  int fd; /* the memfd behind a mapping, kept to pass it on; else -1 */
  char *p;
  size_t n;
  size_t maplen;
} pp_blob;

/* Take over the contents of `b` (heap or memfd) as a blob; `b` is left
 * empty. For a memfd buffer the mapping is kept, and the fd too when
 * `keep_fd` (else it is closed). Returns NULL on allocation failure (b
 * unchanged). */
pp_blob *pp_blob_from_wbuf(pp_wbuf *b, int keep_fd);
static inline pp_blob *pp_blob_ref(pp_blob *b) {
  __atomic_add_fetch(&b->refs, 1, __ATOMIC_RELAXED);
  return b;
}
pp_blob *pp_blob_new(const void *p, size_t n);
/* Adopt `p` (malloc'ed, n bytes) without copying. */
pp_blob *pp_blob_adopt(char *p, size_t n);
/* Map `n` bytes of memfd `fd` read-only. Does not close fd (the blob does
 * not keep it). */
pp_blob *pp_blob_map(int fd, size_t n, int *err);
void pp_blob_unref(pp_blob *b);

#endif
