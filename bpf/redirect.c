/* sk_msg on the sockhash: hand each send to the peer socket's ingress queue
 * when the peer is proven (lib/sock.h) and has room, else let TCP carry it.
 *
 * The choice is made on a connection's first message and kept: the receiver
 * reads redirected data before its TCP queue, so a byte sent over TCP followed
 * by a redirected one would be read out of order. Redirect-then-TCP is safe
 * (a peer that vanished, a receiver that stopped reading), TCP-then-redirect
 * never happens. */
#include "lib/common.h"
#include "lib/counters.h"
#include "lib/sock.h"

static __always_inline void count_add(u32 idx, u64 n)
{
	u64 *v = accel_counters.lookup(&idx);
	if (v)
		*v += n;
}

#define count(idx) count_add((idx), 1)

/* bpf_probe_read_kernel by its number: some bcc builds map the name to the old
 * bpf_probe_read, which sk_msg programs may not call. */
static long (*accel_read_kernel)(void *dst, __u32 size, const void *src) =
	(void *)BPF_FUNC_probe_read_kernel;

/* sk_user_data holds the psock with flag bits (include/net/sock.h SK_USER_DATA_*). */
#define SK_USER_DATA_PSOCK 4UL
#define SK_USER_DATA_PTRMASK (~7UL)
#define SOCK_RCVBUF_LOCK 2

/* Whether `size` more bytes fit in the peer's ingress queue. The kernel's redirect
 * charges only the host-wide TCP memory, so a receiver that never reads would let
 * its sender queue gigabytes and push every TCP socket of the host into memory
 * pressure. TCP stops the sender at the receiver's window: the buffer the
 * application set (SO_RCVBUF), else one TCP grows only as the receiver reads. The
 * redirect queue has no such feedback, so it takes the application's buffer when
 * one was set, else the agent's bound (sock_config.ingress_max). Past the bound the
 * connection moves to TCP for good, and TCP's own flow control then blocks the
 * sender or answers EAGAIN, as for any connection. The peer's fields are read,
 * never written; a read that fails says "no room". */
static __always_inline int peer_has_room(struct sock_state *st, __u64 size)
{
#if ACCEL_REDIRECT_OK
	char *sk = (char *)st->peer_sk;
	struct sock_config *cfg;
	__u64 ud = 0, bound;
	__u32 queued = 0, zero = 0;
	int rcvbuf = 0;
	__u8 locks = 0;

	if (!sk)
		return 0;
	if (accel_read_kernel(&ud, sizeof(ud), sk + ACCEL_OFF_SK_USER_DATA) ||
	    !(ud & SK_USER_DATA_PSOCK))
		return 0;
	if (accel_read_kernel(&queued, sizeof(queued),
				  (char *)(ud & SK_USER_DATA_PTRMASK) + ACCEL_OFF_PSOCK_MSG_TOT_LEN))
		return 0;
	if (accel_read_kernel(&rcvbuf, sizeof(rcvbuf), sk + ACCEL_OFF_SK_RCVBUF) ||
	    accel_read_kernel(&locks, sizeof(locks), sk + ACCEL_OFF_SK_USERLOCKS))
		return 0;
	if (locks & SOCK_RCVBUF_LOCK) {
		bound = rcvbuf > 0 ? (__u64)rcvbuf : 0;
	} else {
		cfg = accel_sock_config.lookup(&zero);
		bound = cfg ? cfg->ingress_max : 0;
	}
	return (__u64)queued + size <= bound;
#else
	return 0; /* no way to bound the queue: sock_ops never tracks, this never runs */
#endif
}

static __always_inline int stay_on_tcp(struct sock_state *st, u32 why)
{
	st->mode = MODE_TCP;
	count(why);
	count(C_MSG_PASSTHROUGH);
	return SK_PASS;
}

int accel_msg(struct sk_msg_md *msg)
{
	struct bpf_sock *sk = msg->sk;
	struct sock_state *st;
	struct sock_key peer = {};
	__u64 size = msg->size;

	if (!sk)
		return SK_PASS;
	st = accel_sock_state.sk_storage_get(sk, 0, 0);
	if (!st || !st->tracked || st->mode == MODE_TCP) {
		count(C_MSG_PASSTHROUGH);
		return SK_PASS;
	}
	conn_id_reverse(&peer.id, &st->id);
	if (st->mode == MODE_UNDECIDED) {
		__u64 me = bpf_get_netns_cookie(msg);
		struct conn_owner *own = accel_conn_ns.lookup(&st->id);
		struct conn_owner *other = accel_conn_ns.lookup(&peer.id);

		if (me != st->netns || !own || own->netns != me)
			return stay_on_tcp(st, C_MSG_PEER_UNKNOWN);
		if (!other || !other->netns)
			return stay_on_tcp(st, C_MSG_PEER_UNKNOWN);
		/* A loopback peer can only be in our own namespace. */
		if ((addr_is_loopback(&st->id.remote) || addr_eq(&st->id.remote, &st->id.local)) &&
		    other->netns != me)
			return stay_on_tcp(st, C_MSG_PEER_UNKNOWN);
		st->peer_netns = other->netns;
		st->peer_sk = other->sk;
		st->mode = MODE_REDIRECT;
	}
	if (!peer_has_room(st, size))
		return stay_on_tcp(st, C_MSG_BACKPRESSURE);
	peer.netns = st->peer_netns;
	int verdict = accel_sockhash.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
	if (verdict == SK_PASS) {
		count(C_MSG_REDIRECTS);
		count_add(C_REDIRECTED_BYTES, size);
		return SK_PASS;
	}
	/* bpf_msg_redirect_hash says SK_DROP when the peer is gone: fall back, never drop. */
	return stay_on_tcp(st, C_MSG_REDIRECT_MISSES);
}
