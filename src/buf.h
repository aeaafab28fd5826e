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
  int fd;    /* the memfd behind a mapping, kept to pass it on (or to spare); else -1 */
  int spare; /* when freed, its memfd becomes the spare (pp_spare_give) */
  int warm;  /* heap memory from pp_warm_alloc (given back there when freed) */
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
/* Map `n` bytes of memfd `fd` read-only. Does not close fd. With `spare`,
 * the blob keeps a duplicate of it and, when freed, makes it the spare:
 * only for a memfd that no other process will touch again. */
pp_blob *pp_blob_map(int fd, size_t n, int spare, int *err);
void pp_blob_unref(pp_blob *b);

/* The spare memfd: the pages of one large buffer, already allocated, kept
 * for the next large buffer (pp_wbuf_grow takes it) so that its bytes are
 * written into warm memory, not into pages the kernel must first find and
 * zero (half of a large echo's time). One per process, at most
 * PP_SPARE_MAX bytes. A memfd is given only by the side that was the last
 * to receive it, once nobody else will read it: the parent gives the
 * memfds of results (the worker that wrote one has let go of it); a
 * worker gives a task's memfd once it has claimed every item in it. So no
 * memfd is ever written by two processes. A forked child never takes its
 * parent's spare. */
#define PP_SPARE_MAX ((size_t)128 << 20)
/* Keep `fd` as the spare (closing the one it replaces), or close it. */
void pp_spare_give(int fd);
/* Close the spare, if any. */
void pp_spare_drop(void);
/* Forget the spare without closing it: a forked child (a zygote, a
 * worker) whose fds are not its parent's. */
void pp_spare_forget(void);
/* A pool is made (+1) or freed (-1): with none left, the spare is closed
 * and none is kept, so no fd outlives the pools. */
void pp_spare_users(int delta);

#endif
