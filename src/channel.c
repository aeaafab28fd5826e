/* channel.c: framed messages over a socket, with memfd payloads passed as fds. */
#define _GNU_SOURCE
#include "channel.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

/* No inline body is anywhere near this; larger is a broken peer. */
#define PP_FRAME_MAX (64u << 20)
#define PP_IN_MIN (64u << 10)
#define PP_IN_KEEP (1u << 20)

size_t pp_frame_begin(pp_wbuf *b, int type, int flags) {
  size_t at = b->n;
  /* callers reserve first; this only writes */
  unsigned char *h = (unsigned char *)b->p + at;
  pp_put32(h, 0);
  h[4] = (unsigned char)type;
  h[5] = (unsigned char)flags;
  h[6] = h[7] = 0;
  b->n += PP_FRAME_HDR;
  return at;
}

void pp_frame_end(pp_wbuf *b, size_t hdr) {
  pp_put32((unsigned char *)b->p + hdr, (uint32_t)(b->n - hdr - PP_FRAME_HDR));
}

void pp_out_init(pp_out *o) {
  pp_wbuf_init(&o->buf, 0);
  o->sent = 0;
  o->fds = NULL;
  o->nfds = o->capfds = 0;
}

void pp_out_free(pp_out *o) {
  for (int i = 0; i < o->nfds; i++) close(o->fds[i].fd);
  free(o->fds);
  pp_wbuf_free(&o->buf);
  o->fds = NULL;
  o->nfds = o->capfds = 0;
  o->sent = 0;
}

int pp_out_addfd(pp_out *o, size_t at, int fd) {
  if (o->nfds == o->capfds) {
    int cap = o->capfds ? o->capfds * 2 : 4;
    pp_fdmark *m = realloc(o->fds, (size_t)cap * sizeof *m);
    if (!m) return ENOMEM;
    o->fds = m;
    o->capfds = cap;
  }
  o->fds[o->nfds].at = at;
  o->fds[o->nfds].fd = fd;
  o->nfds++;
  return 0;
}

long pp_send_fds(int sock, const void *p, size_t n, const int *fds, int nfds, int flags) {
  struct iovec iov;
  struct msghdr mh;
  union {
    struct cmsghdr h;
    char buf[CMSG_SPACE(4 * sizeof(int))];
  } cm;
  if (nfds < 0 || nfds > 4) {
    errno = EINVAL;
    return -1;
  }
  memset(&mh, 0, sizeof mh);
  iov.iov_base = (void *)p;
  iov.iov_len = n;
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  if (nfds > 0) {
    memset(&cm, 0, sizeof cm);
    mh.msg_control = cm.buf;
    mh.msg_controllen = CMSG_SPACE((size_t)nfds * sizeof(int));
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN((size_t)nfds * sizeof(int));
    memcpy(CMSG_DATA(c), fds, (size_t)nfds * sizeof(int));
  }
  ssize_t r;
  do {
    r = sendmsg(sock, &mh, MSG_NOSIGNAL | flags);
  } while (r < 0 && errno == EINTR);
  return (long)r;
}

long pp_recv_fds(int sock, void *p, size_t n, int *fds, int maxfds, int *nfds, int flags) {
  struct iovec iov = {p, n};
  struct msghdr mh;
  union {
    struct cmsghdr h;
    char buf[CMSG_SPACE(8 * sizeof(int))];
  } cm;
  memset(&mh, 0, sizeof mh);
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  mh.msg_control = cm.buf;
  mh.msg_controllen = sizeof cm.buf;
  ssize_t r;
  do {
    r = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC | flags);
  } while (r < 0 && errno == EINTR);
  *nfds = 0;
  if (r < 0) return -1;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < k; i++) {
      int fd;
      memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
      if (*nfds < maxfds)
        fds[(*nfds)++] = fd;
      else
        close(fd);
    }
  }
  return (long)r;
}

int pp_out_flush(pp_out *o, int sock) {
  while (o->sent < o->buf.n) {
    /* an fd rides with the first byte of its frame; never send bytes of
     * the next fd-frame in the same call as earlier bytes */
    int fd = -1;
    size_t end = o->buf.n;
    if (o->nfds > 0) {
      if (o->fds[0].at == o->sent)
        fd = o->fds[0].fd;
      else if (o->fds[0].at < end)
        end = o->fds[0].at;
    }
    if (fd >= 0 && o->nfds > 1 && o->fds[1].at < end) end = o->fds[1].at;
    long r = pp_send_fds(sock, o->buf.p + o->sent, end - o->sent, &fd, fd >= 0, MSG_DONTWAIT);
    if (r < 0) return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : errno;
    if (fd >= 0) { /* the peer has its own reference now */
      close(fd);
      memmove(o->fds, o->fds + 1, (size_t)(o->nfds - 1) * sizeof *o->fds);
      o->nfds--;
    }
    o->sent += (size_t)r;
  }
  /* everything is out: reuse the buffer */
  o->sent = 0;
  pp_wbuf_reset(&o->buf);
  return 0;
}

void pp_in_init(pp_in *in) {
  in->p = NULL;
  in->n = in->cap = in->off = 0;
  in->fds = NULL;
  in->nfds = in->capfds = 0;
  in->eof = 0;
}

void pp_in_free(pp_in *in) {
  for (int i = 0; i < in->nfds; i++) close(in->fds[i]);
  free(in->fds);
  free(in->p);
  pp_in_init(in);
}

static int in_pushfd(pp_in *in, int fd) {
  if (in->nfds == in->capfds) {
    int cap = in->capfds ? in->capfds * 2 : 4;
    int *f = realloc(in->fds, (size_t)cap * sizeof *f);
    if (!f) return ENOMEM;
    in->fds = f;
    in->capfds = cap;
  }
  in->fds[in->nfds++] = fd;
  return 0;
}

size_t pp_in_missing(const pp_in *in) {
  size_t have = in->n - in->off;
  if (have < PP_FRAME_HDR) return 0;
  size_t len = pp_get32((const unsigned char *)in->p + in->off);
  if (len > PP_FRAME_MAX) return 0; /* pp_in_next reports it; never size by it */
  return have >= PP_FRAME_HDR + len ? 0 : PP_FRAME_HDR + len - have;
}

long pp_in_read(pp_in *in, int sock, int block) {
  /* compact, then make room for at least the rest of the current frame */
  if (in->off > 0) {
    memmove(in->p, in->p + in->off, in->n - in->off);
    in->n -= in->off;
    in->off = 0;
  }
  size_t want = pp_in_missing(in);
  if (want < PP_IN_MIN) want = PP_IN_MIN;
  if (in->cap - in->n < want) {
    size_t cap = in->n + want;
    char *p = realloc(in->p, cap);
    if (!p) {
      errno = ENOMEM;
      return -1;
    }
    in->p = p;
    in->cap = cap;
  } else if (in->n == 0 && in->cap > PP_IN_KEEP) {
    /* shrink after a large frame (socket frames up to PP_IN_KEEP, such as
     * a chunk of a map, reuse the buffer: fresh memory faults per page) */
    char *p = realloc(in->p, PP_IN_MIN);
    if (p) {
      in->p = p;
      in->cap = PP_IN_MIN;
    }
  }
  int fds[8], nfds;
  long r =
      pp_recv_fds(sock, in->p + in->n, in->cap - in->n, fds, 8, &nfds, block ? 0 : MSG_DONTWAIT);
  for (int i = 0; i < nfds; i++)
    if (in_pushfd(in, fds[i]) != 0) close(fds[i]);
  if (r < 0) return -1;
  if (r == 0) {
    in->eof = 1;
    return 0;
  }
  in->n += (size_t)r;
  return (long)r;
}

int pp_in_next(pp_in *in, pp_frame *f) {
  size_t have = in->n - in->off;
  if (have < PP_FRAME_HDR) return 0;
  const unsigned char *h = (const unsigned char *)in->p + in->off;
  size_t len = pp_get32(h);
  if (len > PP_FRAME_MAX || h[6] || h[7]) return -1;
  if (have < PP_FRAME_HDR + len) return 0;
  f->type = h[4];
  f->flags = h[5];
  f->body = h + PP_FRAME_HDR;
  f->len = len;
  f->fd = -1;
  if (f->flags & PP_FF_FD) {
    if (in->nfds == 0) return -1; /* the fd travels with the frame's first byte */
    f->fd = in->fds[0];
    memmove(in->fds, in->fds + 1, (size_t)(in->nfds - 1) * sizeof *in->fds);
    in->nfds--;
  }
  in->off += PP_FRAME_HDR + len;
  return 1;
}
