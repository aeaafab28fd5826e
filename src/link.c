/* link.c: the stream to one host, carrying many channels (link.h). */
#define _GNU_SOURCE
#include "link.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "engine.h" /* pp_now_ns */
#include "le.h"

/* Bytes read from the stream per read(2) at least. */
#define LINK_READ_MIN ((size_t)256 << 10)
/* The largest message accepted: a chunk, or a channel frame in DATA. */
#define LINK_MSG_MAX ((size_t)(64u << 20) + PP_L_DATA_HDR + PP_FRAME_HDR)

static int set_nonblock(int fd) {
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) return errno;
  return 0;
}

static void slot_init(pp_link_slot *s) {
  s->fd = -1;
  s->gen = 0;
  s->eof = s->eof_sent = s->shut = 0;
  pp_in_init(&s->in);
  pp_out_init(&s->out);
  s->asm_fd = -1;
  s->asm_total = s->asm_have = 0;
  s->src_fd = -1;
  s->src_total = s->src_off = 0;
  pp_wbuf_init(&s->src_frame, 0);
}

static void slot_clear(pp_link_slot *s) {
  if (s->fd >= 0) close(s->fd);
  if (s->asm_fd >= 0) close(s->asm_fd);
  if (s->src_fd >= 0) close(s->src_fd);
  pp_in_free(&s->in);
  pp_out_free(&s->out);
  pp_wbuf_free(&s->src_frame);
  slot_init(s);
}

int pp_link_init(pp_link *l, int rfd, int wfd, uint32_t nslots) {
  memset(l, 0, sizeof *l);
  l->rfd = rfd;
  l->wfd = wfd;
  pp_wbuf_init(&l->ob, 0);
  int e = set_nonblock(rfd);
  if (!e && wfd != rfd) e = set_nonblock(wfd);
  if (e) return e;
  l->slots = calloc(nslots ? nslots : 1, sizeof *l->slots);
  if (!l->slots) return ENOMEM;
  l->nslots = nslots;
  for (uint32_t i = 0; i < nslots; i++) slot_init(&l->slots[i]);
  l->rx_ns = l->tx_ns = pp_now_ns();
  return 0;
}

void pp_link_free(pp_link *l) {
  for (uint32_t i = 0; i < l->nslots; i++) slot_clear(&l->slots[i]);
  free(l->slots);
  free(l->ib);
  pp_wbuf_free(&l->ob);
  memset(l, 0, sizeof *l);
  l->rfd = l->wfd = -1;
}

int pp_link_slots(pp_link *l, uint32_t n) {
  if (n <= l->nslots) return 0;
  pp_link_slot *p = realloc(l->slots, (size_t)n * sizeof *p);
  if (!p) return ENOMEM;
  l->slots = p;
  for (uint32_t i = l->nslots; i < n; i++) slot_init(&p[i]);
  l->nslots = n;
  return 0;
}

int pp_link_attach(pp_link *l, uint32_t slot, uint32_t gen, int fd) {
  if (slot >= l->nslots) return EINVAL;
  pp_link_slot *s = &l->slots[slot];
  slot_clear(s);
  int e = set_nonblock(fd);
  if (e) return e;
  s->fd = fd;
  s->gen = gen;
  return 0;
}

void pp_link_detach(pp_link *l, uint32_t slot) {
  if (slot < l->nslots) slot_clear(&l->slots[slot]);
}

size_t pp_link_begin(pp_link *l, int type) { return pp_frame_begin(&l->ob, type, 0); }

void pp_link_end(pp_link *l, size_t at) { pp_frame_end(&l->ob, at); }

int pp_link_send(pp_link *l, int type, const void *body, size_t len) {
  if (type < PP_L_CTRL || type > 255) return EINVAL;
  if (pp_wbuf_reserve(&l->ob, PP_FRAME_HDR + len) != 0) return ENOMEM;
  size_t at = pp_link_begin(l, type);
  if (len) memcpy(l->ob.p + l->ob.n, body, len);
  l->ob.n += len;
  pp_link_end(l, at);
  return 0;
}

size_t pp_link_pending(const pp_link *l) { return l->ob.n - l->osent; }

/* ---- channels to the stream ---- */

/* Queue frame f of slot i as DATA; a memfd frame becomes its slot's
 * source (its chunks go first). */
static int take_frame(pp_link *l, uint32_t i, const pp_frame *f) {
  pp_link_slot *s = &l->slots[i];
  pp_wbuf *b = &l->ob;
  if (f->type == PP_FR_OUTBUF) {
    /* a capture's parts are live files and pipes of the worker's machine,
     * for reading a dead worker's last output there: no copy of them
     * would be. Each item's captured output comes back in its result;
     * the item a dead worker was running has its stderr's tail. */
    if (f->fd >= 0) close(f->fd);
    return 0;
  }
  if (f->fd >= 0) { /* the frame waits for its bytes */
    struct stat st;
    if (fstat(f->fd, &st) != 0) {
      int e = errno;
      close(f->fd);
      return e;
    }
    b = &s->src_frame;
    b->n = 0;
    s->src_fd = f->fd;
    s->src_total = (uint64_t)st.st_size;
    s->src_off = 0;
  }
  if (pp_wbuf_reserve(b, PP_FRAME_HDR + PP_L_DATA_HDR + PP_FRAME_HDR + f->len) != 0) return ENOMEM;
  size_t at = pp_frame_begin(b, PP_L_DATA, 0);
  unsigned char *q = (unsigned char *)b->p + b->n;
  pp_put32(q, i);
  pp_put32(q + 4, s->gen);
  pp_put32(q + 8, (uint32_t)f->len);
  q[12] = (unsigned char)f->type;
  q[13] = (unsigned char)f->flags;
  q[14] = q[15] = 0;
  memcpy(q + 16, f->body, f->len);
  b->n += PP_L_DATA_HDR + PP_FRAME_HDR + f->len;
  pp_frame_end(b, at);
  return 0;
}

/* Read slot i's channel and queue its frames, up to the one whose memfd
 * is still going out. */
static int drain_slot(pp_link *l, uint32_t i) {
  pp_link_slot *s = &l->slots[i];
  if (s->fd < 0) return 0;
  for (;;) {
    pp_frame f;
    int r;
    while (s->src_fd < 0 && (r = pp_in_next(&s->in, &f)) != 0) {
      if (r < 0) return EPROTO;
      int e = take_frame(l, i, &f);
      if (e) return e;
    }
    if (s->eof && s->src_fd < 0 && !s->eof_sent) { /* after every frame before it */
      unsigned char b[8];
      pp_put32(b, i);
      pp_put32(b + 4, s->gen);
      if (pp_wbuf_reserve(&l->ob, PP_FRAME_HDR + sizeof b) != 0) return ENOMEM;
      size_t at = pp_frame_begin(&l->ob, PP_L_EOF, 0);
      memcpy(l->ob.p + l->ob.n, b, sizeof b);
      l->ob.n += sizeof b;
      pp_frame_end(&l->ob, at);
      s->eof_sent = 1;
    }
    if (s->src_fd >= 0 || s->eof || pp_link_pending(l) >= PP_LINK_HIGH) return 0;
    long n = pp_in_read(&s->in, s->fd, 0);
    if (n < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
      if (errno == EINTR) continue;
      s->eof = 1; /* a reset channel: its worker is gone */
      return 0;
    }
    if (n == 0) s->eof = 1; /* its worker closed it (frames before it are still parsed) */
  }
}

/* Queue the next chunk of slot i's memfd; its frame after the last. */
static int send_chunk(pp_link *l, uint32_t i) {
  pp_link_slot *s = &l->slots[i];
  uint64_t left = s->src_total - s->src_off;
  size_t n = left < PP_LINK_CHUNK ? (size_t)left : PP_LINK_CHUNK;
  if (pp_wbuf_reserve(&l->ob, PP_FRAME_HDR + PP_L_CHUNK_HDR + n) != 0) return ENOMEM;
  size_t at = pp_frame_begin(&l->ob, PP_L_CHUNK, 0);
  unsigned char *q = (unsigned char *)l->ob.p + l->ob.n;
  pp_put32(q, i);
  pp_put32(q + 4, s->gen);
  pp_put64(q + 8, s->src_total);
  pp_put64(q + 16, s->src_off);
  size_t got = 0;
  while (got < n) {
    ssize_t r = pread(s->src_fd, q + PP_L_CHUNK_HDR + got, n - got, (off_t)(s->src_off + got));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      l->ob.n = at;
      return r < 0 ? errno : EIO;
    }
    got += (size_t)r;
  }
  l->ob.n += PP_L_CHUNK_HDR + n;
  pp_frame_end(&l->ob, at);
  s->src_off += n;
  if (s->src_off == s->src_total) {
    close(s->src_fd);
    s->src_fd = -1;
    if (pp_wbuf_reserve(&l->ob, s->src_frame.n) != 0) return ENOMEM;
    memcpy(l->ob.p + l->ob.n, s->src_frame.p, s->src_frame.n);
    l->ob.n += s->src_frame.n;
    s->src_frame.n = 0;
  }
  return 0;
}

/* Chunks of the slots' memfds, one slot after another, while the stream
 * takes them. */
static int send_chunks(pp_link *l) {
  for (;;) {
    if (pp_link_pending(l) >= PP_LINK_CHUNK) return 0;
    uint32_t k, i = 0;
    for (k = 0; k < l->nslots; k++) {
      i = (l->rr + k) % l->nslots;
      if (l->slots[i].src_fd >= 0) break;
    }
    if (k == l->nslots) return 0;
    l->rr = (i + 1) % l->nslots;
    int e = send_chunk(l, i);
    if (e) return e;
    if (l->slots[i].src_fd < 0) {
      e = drain_slot(l, i); /* the frames that waited behind it */
      if (e) return e;
    }
  }
}

static int write_out(pp_link *l) {
  while (l->osent < l->ob.n) {
    ssize_t w = write(l->wfd, l->ob.p + l->osent, l->ob.n - l->osent);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) break;
      return errno == EPIPE || errno == ECONNRESET ? EPIPE : errno;
    }
    l->osent += (size_t)w;
    l->tx_ns = pp_now_ns();
  }
  if (l->osent == l->ob.n) {
    l->osent = 0;
    l->ob.n = 0;
  } else if (l->osent > ((size_t)1 << 20)) {
    memmove(l->ob.p, l->ob.p + l->osent, l->ob.n - l->osent);
    l->ob.n -= l->osent;
    l->osent = 0;
  }
  return 0;
}

/* ---- the stream to channels ---- */

static pp_link_slot *slot_of(pp_link *l, const unsigned char *b, size_t len) {
  if (len < 8) return NULL;
  uint32_t i = pp_get32(b), gen = pp_get32(b + 4);
  if (i >= l->nslots) return NULL;
  pp_link_slot *s = &l->slots[i];
  return s->fd >= 0 && s->gen == gen ? s : NULL;
}

static int on_chunk(pp_link *l, const unsigned char *b, size_t len) {
  if (len < PP_L_CHUNK_HDR) return EPROTO;
  pp_link_slot *s = slot_of(l, b, len);
  uint64_t total = pp_get64(b + 8), off = pp_get64(b + 16);
  size_t n = len - PP_L_CHUNK_HDR;
  if (!s) return 0; /* a gone worker's */
  if (s->asm_fd < 0) {
    if (off != 0) return EPROTO;
    s->asm_fd = memfd_create("procpool", MFD_CLOEXEC);
    if (s->asm_fd < 0) return errno;
    if (ftruncate(s->asm_fd, (off_t)total) != 0) return errno;
    s->asm_total = total;
    s->asm_have = 0;
  }
  if (total != s->asm_total || off != s->asm_have || n > total - off) return EPROTO;
  size_t put = 0;
  while (put < n) {
    ssize_t w = pwrite(s->asm_fd, b + PP_L_CHUNK_HDR + put, n - put, (off_t)(off + put));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return w < 0 ? errno : EIO;
    put += (size_t)w;
  }
  s->asm_have += n;
  return 0;
}

static int on_data(pp_link *l, const unsigned char *b, size_t len) {
  if (len < PP_L_DATA_HDR + PP_FRAME_HDR) return EPROTO;
  const unsigned char *fr = b + PP_L_DATA_HDR;
  size_t flen = len - PP_L_DATA_HDR;
  if (pp_get32(fr) != flen - PP_FRAME_HDR || fr[6] || fr[7]) return EPROTO;
  pp_link_slot *s = slot_of(l, b, len);
  if (!s) return 0;
  if (pp_wbuf_reserve(&s->out.buf, flen) != 0) return ENOMEM;
  if (fr[5] & PP_FF_FD) {
    if (s->asm_fd < 0 || s->asm_have != s->asm_total) return EPROTO;
    int e = pp_out_addfd(&s->out, s->out.buf.n, s->asm_fd);
    if (e) return e;
    s->asm_fd = -1;
  }
  memcpy(s->out.buf.p + s->out.buf.n, fr, flen);
  s->out.buf.n += flen;
  return 0;
}

/* Read the stream and hand on its complete messages. */
static int read_in(pp_link *l, pp_link_ctrl_fn fn, void *ud) {
  for (;;) {
    while (l->ilen - l->ioff >= PP_FRAME_HDR) {
      const unsigned char *h = l->ib + l->ioff;
      size_t len = pp_get32(h);
      if (len > LINK_MSG_MAX || h[5] || h[6] || h[7]) return EPROTO;
      if (l->ilen - l->ioff < PP_FRAME_HDR + len) break;
      const unsigned char *body = h + PP_FRAME_HDR;
      int e = 0;
      if (h[4] == PP_L_DATA)
        e = on_data(l, body, len);
      else if (h[4] == PP_L_CHUNK)
        e = on_chunk(l, body, len);
      else if (h[4] == PP_L_EOF) {
        pp_link_slot *s = slot_of(l, body, len);
        if (s) s->shut = 1;
      } else if (h[4] >= PP_L_CTRL)
        e = fn ? fn(ud, h[4], body, len) : 0;
      else
        e = EPROTO;
      if (e) return e;
      l->ioff += PP_FRAME_HDR + len;
    }
    if (l->ieof) return EPIPE;
    /* compact, then room for the rest of the message being received */
    if (l->ioff) {
      memmove(l->ib, l->ib + l->ioff, l->ilen - l->ioff);
      l->ilen -= l->ioff;
      l->ioff = 0;
    }
    size_t want = LINK_READ_MIN;
    if (l->ilen >= PP_FRAME_HDR) {
      size_t need = PP_FRAME_HDR + (size_t)pp_get32(l->ib) - l->ilen;
      if (need > want) want = need;
    }
    if (l->icap - l->ilen < want) {
      unsigned char *p = realloc(l->ib, l->ilen + want);
      if (!p) return ENOMEM;
      l->ib = p;
      l->icap = l->ilen + want;
    }
    ssize_t r = read(l->rfd, l->ib + l->ilen, l->icap - l->ilen);
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
      if (errno == ECONNRESET) {
        l->ieof = 1;
        continue;
      }
      return errno;
    }
    l->rx_ns = pp_now_ns();
    if (r == 0)
      l->ieof = 1;
    else
      l->ilen += (size_t)r;
  }
}

int pp_link_step(pp_link *l, pp_link_ctrl_fn fn, void *ud) {
  int e = read_in(l, fn, ud);
  int eof = e == EPIPE;
  if (e && !eof) return e;
  for (uint32_t i = 0; i < l->nslots; i++) {
    pp_link_slot *s = &l->slots[i];
    if (s->fd < 0) continue;
    if (pp_out_pending(&s->out) && pp_out_flush(&s->out, s->fd) != 0) s->eof = 1;
    if (s->shut == 1 && !pp_out_pending(&s->out)) {
      shutdown(s->fd, SHUT_WR);
      s->shut = 2;
    }
    if ((e = drain_slot(l, i)) != 0) return e;
  }
  if ((e = send_chunks(l)) != 0) return e;
  if ((e = write_out(l)) != 0) return e;
  return eof ? EPIPE : 0;
}

int pp_link_pollfds(const pp_link *l, struct pollfd *p, int max) {
  int n = 0;
  if (n < max) {
    p[n].fd = l->rfd;
    p[n].events = POLLIN;
    p[n].revents = 0;
    if (l->rfd == l->wfd && pp_link_pending(l)) p[n].events |= POLLOUT;
    n++;
  }
  if (l->wfd != l->rfd && pp_link_pending(l) && n < max) {
    p[n].fd = l->wfd;
    p[n].events = POLLOUT;
    p[n].revents = 0;
    n++;
  }
  for (uint32_t i = 0; i < l->nslots && n < max; i++) {
    const pp_link_slot *s = &l->slots[i];
    if (s->fd < 0) continue;
    short ev = 0;
    if (!s->eof && s->src_fd < 0 && pp_link_pending(l) < PP_LINK_HIGH) ev |= POLLIN;
    if (pp_out_pending(&s->out)) ev |= POLLOUT;
    if (!ev) continue;
    p[n].fd = s->fd;
    p[n].events = ev;
    p[n].revents = 0;
    n++;
  }
  return n;
}
