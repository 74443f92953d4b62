/* sk_msg on the sockhash: hand each send to the peer socket's ingress queue
 * when the peer is proven (lib/sock.h) and has room, else let TCP carry it.
 *
 * The choice is made on a connection's first message: the receiver reads
 * redirected data before its TCP queue, so a byte sent over TCP followed by a
 * redirected one could be read out of order. Redirect-then-TCP is safe (a peer
 * that vanished, a receiver whose queue is full); TCP-then-redirect happens only
 * after the receiver has read every byte TCP carried (tcp_drained). */
#include "lib/common.h"
#include "lib/counters.h"
#include "lib/flows.h"
#include "lib/qos.h"
#include "lib/sock.h"

static __always_inline void count_add(u32 idx, u64 n)
{
	u64 *v = accel_counters.lookup(&idx);
	if (v)
		*v += n;
}

#define count(idx) count_add((idx), 1)

/* lib/qos.h's accessors (only the limits are read here). */
static __always_inline struct qos_limit *qos_limit_get(__u32 *i) { return accel_qos_limits.lookup(i); }
static __always_inline struct qos_state *qos_state_get(__u32 *i) { return accel_qos_state.lookup(i); }
static __always_inline struct qos_stats *qos_stats_get(__u32 *i) { return accel_qos_stats.lookup(i); }
static __always_inline struct qos_sock *qos_sock_get(struct bpf_sock *sk, int create)
{
	return accel_qos_sock.sk_storage_get(sk, 0, create ? BPF_SK_STORAGE_GET_F_CREATE : 0);
}
static __always_inline struct qos_meter *qos_meter_get(struct bpf_sock *sk)
{
	return accel_qos_meter.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
}
static __always_inline struct qos_split *qos_split_get(__u32 *i) { return accel_qos_split.lookup(i); }

/* Connection records: lib/flows.h says why each program defines these itself. */
static __always_inline int flows_on(void)
{
	__u32 zero = 0;
	struct flow_config *c = accel_flow_config.lookup(&zero);

	return c && c->enabled;
}

static __always_inline struct flow_stats *flow_stats(void)
{
	__u32 zero = 0;

	return accel_flow_stats.lookup(&zero);
}

static __always_inline struct flow_event *flow_reserve(void)
{
	struct flow_event *ev = accel_flows.ringbuf_reserve(sizeof(struct flow_event));
	struct flow_stats *s = flow_stats();

	if (!ev && s)
		s->dropped++; /* the ring is full: never wait */
	return ev;
}

static __always_inline void flow_submit(struct flow_event *ev)
{
	struct flow_stats *s = flow_stats();

	accel_flows.ringbuf_submit(ev, BPF_RB_NO_WAKEUP); /* the reader polls */
	if (s)
		s->events++;
}

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
 * application set (SO_RCVBUF), else one TCP grows only as the receiver reads. So
 * does this bound: the application's buffer when one was set, else twice what the
 * receiver has read so far, at least sock_config.ingress_min and at most
 * ingress_max (TCP's own ceiling, tcp_rmem[2]). Past the bound the
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
		if (!cfg)
			return 0;
		/* What the receiver has read: all we handed over but what it still queues. */
		bound = st->redirected > queued ? 2 * (st->redirected - queued) : 0;
		if (bound < cfg->ingress_min)
			bound = cfg->ingress_min;
		if (bound > cfg->ingress_max)
			bound = cfg->ingress_max;
	}
	return (__u64)queued + size <= bound;
#else
	return 0; /* no way to bound the queue: sock_ops never tracks, this never runs */
#endif
}

/* Whether a byte redirected now would still be read after every byte this
 * connection sent over TCP: all of them acknowledged by the peer (our write_seq ==
 * snd_una) and read by its application (its copied_seq == rcv_nxt). The receiver
 * reads its redirect queue before its TCP queue, so only then may a connection
 * paused on TCP go back to the redirect. */
static __always_inline int tcp_drained(struct sock_state *st)
{
#if ACCEL_REDIRECT_OK
	char *me = (char *)st->self_sk, *peer = (char *)st->peer_sk;
	__u32 write_seq = 0, snd_una = 1, copied = 0, rcv_nxt = 1;

	if (!me || !peer)
		return 0;
	if (accel_read_kernel(&write_seq, sizeof(write_seq), me + ACCEL_OFF_TP_WRITE_SEQ) ||
	    accel_read_kernel(&snd_una, sizeof(snd_una), me + ACCEL_OFF_TP_SND_UNA) ||
	    accel_read_kernel(&copied, sizeof(copied), peer + ACCEL_OFF_TP_COPIED_SEQ) ||
	    accel_read_kernel(&rcv_nxt, sizeof(rcv_nxt), peer + ACCEL_OFF_TP_RCV_NXT))
		return 0;
	return write_seq == snd_una && copied == rcv_nxt && rcv_nxt == snd_una;
#else
	return 0;
#endif
}

static __always_inline int stay_on_tcp(struct sock_state *st, u32 why)
{
	st->mode = MODE_TCP;
	count(why);
	count(C_MSG_PASSTHROUGH);
	return SK_PASS;
}

/* The receiver's queue is full: this message goes over TCP, whose flow control
 * holds the sender; the connection returns to the redirect once TCP is drained. */
static __always_inline int pause_on_tcp(struct sock_state *st)
{
	if (st->mode != MODE_PAUSED)
		count(C_MSG_BACKPRESSURE);
	st->mode = MODE_PAUSED;
	count(C_MSG_PASSTHROUGH);
	return SK_PASS;
}

/* A long redirected connection sends no packets, so sock_ops never hears of it: its client
 * end reports from here. What is known here is what this end redirected so far. */
static __always_inline void flow_report(struct sock_state *st)
{
	struct flow_event *ev;

	if (!flows_on() || !flow_report_due(st, bpf_ktime_get_boot_ns()))
		return;
	ev = flow_reserve();
	if (!ev)
		return;
	flow_fill(ev, st, FLOW_REPORT, st->flow.reported);
	ev->client = st->id.local;
	ev->client_port = st->id.lport;
	ev->server_netns = st->peer_netns;
	ev->bytes_sent = st->redirected;
	ev->bytes_redirected = st->redirected;
	ev->path = FLOW_PATH_REDIRECTED;
	flow_submit(ev);
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
	/* Its service got a bandwidth limit after it opened: a redirected send skips TCP and so
	 * its pacing. TCP from here on (the peer reads what was handed over first), where
	 * sock_ops paces it at its next RTT sample; only recorded client connections get those
	 * samples (flows on), so only they move. */
	if ((st->flow.flags & FLOW_S_CLIENT) && st->flow.svc != FLOW_SVC_UNKNOWN &&
	    qos_bandwidth_limited(st->flow.svc))
		return stay_on_tcp(st, C_MSG_QOS_LATE);
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
	if (st->mode == MODE_PAUSED) {
		if (!tcp_drained(st) || !peer_has_room(st, size))
			return pause_on_tcp(st);
		st->mode = MODE_REDIRECT;
		count(C_MSG_RESUMED);
	} else if (!peer_has_room(st, size)) {
		return pause_on_tcp(st);
	}
	peer.netns = st->peer_netns;
	int verdict = accel_sockhash.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
	if (verdict == SK_PASS) {
		st->redirected += size;
		count(C_MSG_REDIRECTS);
		count_add(C_REDIRECTED_BYTES, size);
		if (st->flow.flags & FLOW_S_CLIENT)
			flow_report(st);
		return SK_PASS;
	}
	/* bpf_msg_redirect_hash says SK_DROP when the peer is gone: fall back, never drop. */
	return stay_on_tcp(st, C_MSG_REDIRECT_MISSES);
}
