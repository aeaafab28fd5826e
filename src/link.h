/* link.h: the stream to one host (its launcher's stdin and stdout): the
 * channels of many workers and the control messages of a host, in one
 * byte stream. */
#ifndef PP_LINK_H
#define PP_LINK_H

#include <poll.h>
#include <stddef.h>
#include <stdint.h>

#include "channel.h"

/*
 * A link message is a channel frame (channel.h: an 8-byte header, u32 body
 * length, u8 type, u8 flags, u16 0, then the body), never with fds: a
 * stream to another host carries bytes only.
 *
 * DATA: u32 slot, u32 gen, then one frame of that worker's channel, whole
 * (header and body). A frame that passed a memfd (PP_FF_FD) keeps its flag:
 * the memfd's bytes came before it, in CHUNKs of the same slot, and the
 * receiving side hands the frame on with a new memfd holding them.
 * CHUNK: u32 slot, u32 gen, u64 total (the memfd's size), u64 offset, then
 * at most PP_LINK_CHUNK bytes. The chunks of one memfd come in order and
 * are interleaved with the other slots' messages, so that a large payload
 * does not hold up the rest of the host's traffic; there is always at
 * least one (an empty memfd has one empty chunk).
 * EOF: u32 slot, u32 gen: the channel was closed for writing at its
 * other end (a retiring worker's input, a dead worker's output), after
 * every DATA of it; the receiving side shuts its channel so, once what it
 * holds for it is written.
 * Every other type (from PP_L_CTRL) is a control message, read by the
 * link's owner (the host proxy, the agent).
 *
 * `gen` tells apart the workers that take the same slot one after another:
 * a message for a gen the slot no longer has is dropped (its worker is gone).
 */
enum { PP_L_DATA = 1, PP_L_CHUNK = 2, PP_L_EOF = 3, PP_L_CTRL = 16 };
#define PP_L_DATA_HDR 8   /* slot, gen */
#define PP_L_CHUNK_HDR 24 /* slot, gen, total, offset */
#define PP_LINK_CHUNK ((size_t)1 << 20)
/* Outgoing bytes queued past this stop reading more from the channels:
 * the stream sets the pace. */
#define PP_LINK_HIGH ((size_t)4 << 20)

/*
 * The host protocol: the control messages between the host proxy (this
 * machine) and the agent (the host's end, started by the launcher).
 * Integers are little-endian; slot and gen are the engine's.
 *
 * The agent first writes PP_LINK_MAGIC, so that what a login shell prints
 * before it (a banner, a .bashrc's echo) can be skipped, then HELLO.
 * HELLO (agent): text, "key=value" lines: proto, codec, lua (the release),
 *   dump (the bytecode header, hex), ncpu, host, pid.
 * CONFIG (proxy): u32 slots (the engine's worker count), u32 host_timeout
 *   in ms, a pp_limits, u32 n, the host's name as the pool has it (n
 *   bytes), u32 m, the encoded shipped modules (m bytes, may be none: a
 *   table { [name] = { source, path } }, installed in package.preload
 *   before anything else is decoded), then the encoded initializer list
 *   (may be empty).
 * READY (agent): the initializer is loaded, workers can be asked for.
 * FAIL (agent): text: why it cannot go on; it exits after it.
 * SPAWN (proxy): u32 slot, u32 gen.
 * SPAWNED (agent): u32 slot, u32 gen, i32 pid (on the host).
 * SPAWNFAIL (agent): u32 slot, u32 gen, i32 errno.
 * EXITED (agent): u32 slot, u32 gen, i32 wait status, u32 0, u64 the seq
 *   its page last read as started. It follows every DATA of the slot.
 * SIGNAL (proxy): u32 slot, u32 gen, i32 signal.
 * STDERR (agent): u32 slot, u32 gen, bytes the worker wrote to stderr.
 * PING (both): the agent's: nothing, sent after a second without other
 *   traffic; the proxy's: u64 its clock, once a second, answered by PONG.
 * PONG (agent): the body of the PING it answers (the proxy times the
 *   round trip).
 * STDOUT (agent): bytes the host's workers wrote to their stdout, for the
 *   parent's stdout.
 * STARTED (agent): u32 slot, u32 gen, u32 0, u64 the seq its page reads as
 *   started, u64 ns since that start (as the worker timed it): the proxy
 *   keeps the engine's page of the worker so, for deadlines and deaths.
 */
enum {
  PP_L_HELLO = PP_L_CTRL,
  PP_L_CONFIG,
  PP_L_READY,
  PP_L_FAIL,
  PP_L_SPAWN,
  PP_L_SPAWNED,
  PP_L_SPAWNFAIL,
  PP_L_EXITED,
  PP_L_SIGNAL,
  PP_L_STDERR,
  PP_L_PING,
  PP_L_STARTED,
  PP_L_STDOUT,
  PP_L_PONG,
};
#define PP_LINK_MAGIC "\0PPAGENT"
#define PP_LINK_MAGIC_LEN 8
#define PP_LINK_PROTO 2
#define PP_L_CONFIG_HDR (12 + sizeof(pp_limits)) /* up to the name */

/* One slot: a worker's channel at this end of the link. */
typedef struct pp_link_slot {
  int fd;       /* the local channel; -1: none */
  uint32_t gen; /* the incarnation messages must name */
  int eof;      /* the channel was closed at its other end */
  int eof_sent; /* and EOF is on the stream */
  int shut;     /* EOF came from the stream: shut the channel once out is written */
  pp_in in;     /* frames from the channel */
  pp_out out;   /* frames for the channel */
  /* a memfd arriving from the stream */
  int asm_fd;
  uint64_t asm_total, asm_have;
  /* a memfd going out: its chunks, then its frame (frames behind it wait) */
  int src_fd;
  uint64_t src_total, src_off;
  pp_wbuf src_frame;
} pp_link_slot;

typedef struct pp_link {
  int rfd, wfd; /* the stream: read and write ends (the same fd on a socket) */
  unsigned char *ib;
  size_t ilen, icap, ioff; /* received bytes at ib[ioff..ilen) */
  int ieof;
  pp_wbuf ob; /* bytes to write, ob.p[osent..ob.n) */
  size_t osent;
  pp_link_slot *slots;
  uint32_t nslots, rr;   /* rr: the slot whose memfd sends the next chunk */
  uint64_t rx_ns, tx_ns; /* CLOCK_MONOTONIC of the last read, the last write */
} pp_link;

/* Control messages as they arrive: the type, the body. A non-zero return
 * (an errno) ends the step with it. */
typedef int (*pp_link_ctrl_fn)(void *ud, int type, const unsigned char *body, size_t len);

/* Over the stream rfd/wfd (made non-blocking), with nslots slots, none
 * attached. 0 or an errno. The fds stay the caller's. */
int pp_link_init(pp_link *l, int rfd, int wfd, uint32_t nslots);
void pp_link_free(pp_link *l);
/* Have at least n slots (new ones unattached). 0 or an errno. */
int pp_link_slots(pp_link *l, uint32_t n);
/* Slot `slot` is now channel `fd` (taken over: closed on detach) of
 * incarnation `gen`. 0 or an errno. */
int pp_link_attach(pp_link *l, uint32_t slot, uint32_t gen, int fd);
/* Close the slot's channel and drop what is queued for or from it. */
void pp_link_detach(pp_link *l, uint32_t slot);
/* Queue a control message of `type` (>= PP_L_CTRL). 0 or an errno. */
int pp_link_send(pp_link *l, int type, const void *body, size_t len);
/* Queue a control message built in place: its header begun (returns the
 * offset to pass to pp_link_end), its body appended to l->ob by the caller. */
size_t pp_link_begin(pp_link *l, int type);
void pp_link_end(pp_link *l, size_t at);
/* Move what can move without blocking: the stream's messages to their
 * channels (control ones to `fn`), the channels' frames onto the stream,
 * the queued bytes out. 0, EPIPE once the stream is at its end (read or
 * write), another errno on a protocol or system error. */
int pp_link_step(pp_link *l, pp_link_ctrl_fn fn, void *ud);
/* Bytes still to write to the stream. */
size_t pp_link_pending(const pp_link *l);
/* Fill up to `max` pollfds for what the link waits on; their count. */
int pp_link_pollfds(const pp_link *l, struct pollfd *p, int max);

#endif
