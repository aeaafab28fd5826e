/* capture.h: a worker's captured output: fds 1 and 2 into pipes, drained
 * into files that the parent holds too (child side, no Lua). */
#ifndef PP_CAPTURE_H
#define PP_CAPTURE_H

#include <stdint.h>

#include "buf.h"
#include "wire.h"

typedef struct pp_capture pp_capture;

/* The fds the parent is given (each in an OUTBUF frame, wire.h's part
 * numbers): the capture area, the streams' files, the pipes' read ends. */
#define PP_CAPTURE_FDS PP_OUT_PARTS
/* Make the pipes, the capture area (max_output bytes kept per stream),
 * and the drain thread; fds gets the PP_CAPTURE_FDS fds for the parent,
 * in part order, the caller's to send and close. NULL when any of them
 * cannot be had. */
pp_capture *pp_capture_new(uint64_t max_output, int fds[PP_CAPTURE_FDS]);
/* Point fds 1 and 2 at the pipes (the real ones are kept aside), or back.
 * Both flush stdio first, so nothing buffered goes to the wrong place. */
void pp_capture_on(pp_capture *c);
void pp_capture_off(pp_capture *c);
/* Item `seq` starts: the bytes written from now on are its output (the
 * area says so, for the parent). */
void pp_capture_begin(pp_capture *c, uint64_t seq);
/* The item ended: flush stdio, take in what the pipes hold, and append
 * its stdout, stderr (each with a note of the bytes dropped past the
 * limit) and their lengths to `res` (wire.h's output trailer); the next
 * item starts empty. 0, or an errno when `res` cannot grow. */
int pp_capture_take(pp_capture *c, pp_wbuf *res);

#endif
