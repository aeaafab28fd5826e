/* buf.c: growable byte buffers (heap, or a memfd once large) and blobs. */
#define _GNU_SOURCE
#include "buf.h"

#include "warm.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define PP_WBUF_MIN 256
#define PP_WBUF_KEEP (1u << 20) /* reset keeps at most this much heap */

void pp_wbuf_init(pp_wbuf *b, size_t memfd_at) {
  b->p = NULL;
  b->n = b->cap = 0;
  b->memfd_at = memfd_at;
  b->fd = -1;
}

/* A heap buffer's memory is kept warm from PP_WARM_MIN bytes on: the rule
 * that every heap buffer here (a write buffer's, a blob's) follows. */
static void heap_free(void *p, size_t cap) {
  if (cap >= PP_WARM_MIN)
    pp_warm_free(p);
  else
    free(p);
}

static size_t page_round(size_t n) {
  size_t pg = 4096;
  return (n + pg - 1) & ~(pg - 1);
}

/* The spare: its fd and the pid of the process that kept it, in one word
 * (an atomic exchange takes or replaces it, so no lock is held across a
 * fork). */
static uint64_t spare_slot; /* atomic; 0: none */

static uint64_t spare_pack(int fd) { return (uint64_t)(uint32_t)getpid() << 32 | (uint32_t)fd; }

/* The fd of slot value v if this process kept it, else -1: a forked
 * child's copy names its parent's fd, whose number the child may have
 * closed and reused since (it is never closed through the copy). */
static int spare_fd(uint64_t v) {
  if (!v || (pid_t)(v >> 32) != getpid()) return -1;
  return (int)(uint32_t)v;
}

/* The spare's fd, now the caller's, or -1. */
static int spare_take(void) {
  return spare_fd(__atomic_exchange_n(&spare_slot, 0, __ATOMIC_ACQ_REL));
}

void pp_spare_forget(void) { __atomic_store_n(&spare_slot, 0, __ATOMIC_RELEASE); }

static int spare_users; /* atomic */

void pp_spare_users(int delta) {
  if (__atomic_add_fetch(&spare_users, delta, __ATOMIC_ACQ_REL) == 0) pp_spare_drop();
}

void pp_spare_give(int fd) {
  struct stat st;
  if (__atomic_load_n(&spare_users, __ATOMIC_ACQUIRE) <= 0 || fstat(fd, &st) != 0 ||
      st.st_size <= 0 || (uint64_t)st.st_size > PP_SPARE_MAX) {
    close(fd);
    return;
  }
  int old = spare_fd(__atomic_exchange_n(&spare_slot, spare_pack(fd), __ATOMIC_ACQ_REL));
  if (old >= 0) close(old);
  /* the last pool may have gone while this was kept: then nothing stays */
  if (__atomic_load_n(&spare_users, __ATOMIC_ACQUIRE) <= 0) pp_spare_drop();
}

void pp_spare_drop(void) {
  int fd = spare_take();
  if (fd >= 0) close(fd);
}

/* Blobs that hold a copy of their fd to give it as the spare when freed:
 * a few at most, so that a program holding many large results does not
 * hold as many fds (the spare is one memfd anyway). */
#define PP_SPARE_HOLD 4
static int spare_held; /* atomic */

static int hold_candidate(void) {
  if (__atomic_add_fetch(&spare_held, 1, __ATOMIC_RELAXED) <= PP_SPARE_HOLD) return 1;
  __atomic_sub_fetch(&spare_held, 1, __ATOMIC_RELAXED);
  return 0;
}

/* A memfd of at least `cap` bytes: the spare (grown if need be), or a new
 * one. Sets *cap to its size. */
static int memfd_get(size_t *cap) {
  int fd = spare_take();
  if (fd >= 0) {
    struct stat st;
    if (fstat(fd, &st) == 0 && (uint64_t)st.st_size >= *cap) {
      *cap = (size_t)st.st_size;
      return fd;
    }
    if (ftruncate(fd, (off_t)*cap) == 0) return fd;
    close(fd);
  }
  fd = memfd_create("procpool", MFD_CLOEXEC);
  if (fd >= 0 && ftruncate(fd, (off_t)*cap) != 0) {
    int e = errno;
    close(fd);
    errno = e;
    return -1;
  }
  return fd;
}

/* Move into (or grow) a memfd mapping of at least `need` bytes. */
static int grow_memfd(pp_wbuf *b, size_t need) {
  size_t cap = page_round(need + need / 2);
  if (b->fd < 0) {
    int fd = memfd_get(&cap);
    if (fd < 0) return errno;
    void *m = mmap(NULL, cap, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) {
      int e = errno;
      close(fd);
      return e;
    }
    if (b->n) memcpy(m, b->p, b->n);
    heap_free(b->p, b->cap);
    b->p = m;
    b->fd = fd;
    b->cap = cap;
    return 0;
  }
  if (ftruncate(b->fd, (off_t)cap) != 0) return errno;
  void *m = mremap(b->p, b->cap, cap, MREMAP_MAYMOVE);
  if (m == MAP_FAILED) return errno;
  b->p = m;
  b->cap = cap;
  return 0;
}

int pp_wbuf_grow(pp_wbuf *b, size_t extra) {
  if (extra > SIZE_MAX / 2 - b->n) return ENOMEM;
  size_t need = b->n + extra;
  if (need <= b->cap) return 0;
  if (b->fd >= 0 || (b->memfd_at && need > b->memfd_at)) return grow_memfd(b, need);
  size_t cap = b->cap ? b->cap : PP_WBUF_MIN;
  while (cap < need) cap = (cap > SIZE_MAX / 2) ? need : cap * 2;
  if (cap >= PP_WARM_MIN) { /* (a warm one may be larger than asked: all of it is used) */
    char *p = pp_warm_alloc(cap);
    if (!p) return ENOMEM;
    if (b->n) memcpy(p, b->p, b->n);
    heap_free(b->p, b->cap);
    b->p = p;
    b->cap = pp_warm_cap(p);
    return 0;
  }
  char *p = realloc(b->p, cap);
  if (!p) return ENOMEM;
  b->p = p;
  b->cap = cap;
  return 0;
}

#define PP_PWRITE_MIN (256u << 10)

int pp_wbuf_put_at(pp_wbuf *b, size_t off, const void *s, size_t len) {
  if (b->fd < 0 || len < PP_PWRITE_MIN) {
    memcpy(b->p + off, s, len);
    return 0;
  }
  const char *q = s;
  while (len > 0) {
    ssize_t r = pwrite(b->fd, q, len, (off_t)off);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return r < 0 ? errno : EIO;
    q += r;
    off += (size_t)r;
    len -= (size_t)r;
  }
  return 0;
}

void pp_wbuf_free(pp_wbuf *b) {
  if (b->fd >= 0) {
    munmap(b->p, b->cap);
    close(b->fd);
  } else {
    heap_free(b->p, b->cap);
  }
  b->p = NULL;
  b->n = b->cap = 0;
  b->fd = -1;
}

void pp_wbuf_reset(pp_wbuf *b) {
  if (b->fd >= 0 || b->cap > PP_WBUF_KEEP) pp_wbuf_free(b);
  b->n = 0;
}

pp_blob *pp_blob_from_wbuf(pp_wbuf *b, int keep_fd) {
  pp_blob *bl = malloc(sizeof *bl);
  if (!bl) return NULL;
  bl->refs = 1;
  bl->n = b->n;
  bl->fd = -1;
  bl->spare = 0;
  bl->warm = 0;
  if (b->fd >= 0) {
    bl->mapped = 1;
    bl->p = b->p;
    bl->maplen = b->cap;
    if (keep_fd)
      bl->fd = b->fd;
    else
      close(b->fd);
  } else {
    bl->mapped = 0;
    bl->maplen = 0;
    bl->warm = b->cap >= PP_WARM_MIN;
    bl->p = b->p; /* may be NULL when n == 0 */
  }
  b->p = NULL;
  b->n = b->cap = 0;
  b->fd = -1;
  return bl;
}

pp_blob *pp_blob_adopt(char *p, size_t n) {
  pp_blob *bl = malloc(sizeof *bl);
  if (!bl) return NULL;
  bl->refs = 1;
  bl->mapped = 0;
  bl->fd = -1;
  bl->spare = 0;
  bl->warm = 0;
  bl->maplen = 0;
  bl->p = p;
  bl->n = n;
  return bl;
}

pp_blob *pp_blob_new(const void *p, size_t n) {
  int warm = n >= PP_WARM_MIN;
  char *c = warm ? pp_warm_alloc(n) : malloc(n ? n : 1);
  if (!c) return NULL;
  if (n) memcpy(c, p, n);
  pp_blob *bl = pp_blob_adopt(c, n);
  if (!bl) {
    heap_free(c, warm ? n : 0);
    return NULL;
  }
  bl->warm = warm;
  return bl;
}

pp_blob *pp_blob_map(int fd, size_t n, int spare, int *err) {
  pp_blob *bl = malloc(sizeof *bl);
  if (!bl) {
    *err = ENOMEM;
    return NULL;
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || st.st_size < 0 || (uint64_t)st.st_size < n) {
    /* a short memfd would fault (SIGBUS) when read past its end */
    *err = EPROTO;
    free(bl);
    return NULL;
  }
  size_t len = page_round(n ? n : 1);
  void *m = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
  if (m == MAP_FAILED) {
    *err = errno;
    free(bl);
    return NULL;
  }
  bl->refs = 1;
  bl->mapped = 1;
  bl->fd = -1;
  bl->spare = 0;
  bl->warm = 0;
  if (spare && n <= PP_SPARE_MAX && hold_candidate()) {
    bl->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0); /* (without a copy it is merely not spared) */
    bl->spare = bl->fd >= 0;
    if (!bl->spare) __atomic_sub_fetch(&spare_held, 1, __ATOMIC_RELAXED);
  }
  bl->p = m;
  bl->n = n;
  bl->maplen = len;
  return bl;
}

void pp_blob_unref(pp_blob *b) {
  if (!b) return;
  if (__atomic_sub_fetch(&b->refs, 1, __ATOMIC_ACQ_REL) != 0) return;
  if (b->mapped)
    munmap(b->p, b->maplen);
  else if (b->warm)
    pp_warm_free(b->p);
  else
    free(b->p);
  if (b->spare) {
    __atomic_sub_fetch(&spare_held, 1, __ATOMIC_RELAXED);
    pp_spare_give(b->fd);
  } else if (b->fd >= 0)
    close(b->fd);
  free(b);
}

void pp_zero_touch(void *p, size_t n) { memset(p, 0, n); }
