/* sk_msg on the sockhash: hand each send to the peer socket's ingress queue
 * when the peer is proven (lib/sock.h), else let TCP carry it.
 *
 * The choice is made on a connection's first message and kept: the receiver
 * reads redirected data before its TCP queue, so a byte sent over TCP followed
 * by a redirected one would be read out of order. Redirect-then-TCP is safe
 * (a peer that vanished), TCP-then-redirect never happens. */
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
		st->mode = MODE_REDIRECT;
	}
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
