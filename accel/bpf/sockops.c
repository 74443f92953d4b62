/* sock_ops on a cgroup2 directory: put established mesh sockets into the
 * sockhash and publish which namespace owns each connection end.
 * See lib/sock.h for why pairing needs the namespace and the handshake. */
#include "lib/common.h"
#include "lib/counters.h"
#include "lib/sock.h"
#include "lib/qos.h"

static __always_inline void count_add(u32 idx, u64 n)
{
	u64 *v = accel_counters.lookup(&idx);
	if (v)
		*v += n;
}

#define count(idx) count_add((idx), 1)

/* lib/qos.h's accessors. */
static __always_inline struct qos_limit *qos_limit_get(__u32 *i) { return accel_qos_limits.lookup(i); }
static __always_inline struct qos_state *qos_state_get(__u32 *i) { return accel_qos_state.lookup(i); }
static __always_inline struct qos_stats *qos_stats_get(__u32 *i) { return accel_qos_stats.lookup(i); }
static __always_inline struct qos_sock *qos_sock_get(struct bpf_sock *sk, int create)
{
	return accel_qos_sock.sk_storage_get(sk, 0, create ? BPF_SK_STORAGE_GET_F_CREATE : 0);
}

static __always_inline int is_mesh_addr(const struct addr16 *a)
{
	struct mesh_net_key k = { .prefixlen = 128 };

	k.addr = *a;
	return accel_mesh_nets.lookup(&k) != NULL;
}

static __always_inline void read_conn_id(struct bpf_sock_ops *skops, struct conn_id *id)
{
	/* Volatile reads of every field up front: clang would otherwise merge the
	 * v4 and v6 branches into one computed ctx pointer, which the verifier rejects. */
	__u32 family = CTX_READ(skops->family);
	__u32 l4 = CTX_READ(skops->local_ip4), r4 = CTX_READ(skops->remote_ip4);
	__u32 l0 = CTX_READ(skops->local_ip6[0]), l1 = CTX_READ(skops->local_ip6[1]);
	__u32 l2 = CTX_READ(skops->local_ip6[2]), l3 = CTX_READ(skops->local_ip6[3]);
	__u32 r0 = CTX_READ(skops->remote_ip6[0]), r1 = CTX_READ(skops->remote_ip6[1]);
	__u32 r2 = CTX_READ(skops->remote_ip6[2]), r3 = CTX_READ(skops->remote_ip6[3]);

	if (family == AF_INET) {
		addr_from4(&id->local, l4);
		addr_from4(&id->remote, r4);
	} else {
		/* AF_INET6, v4-mapped included: already the 16-byte form we key on. */
		id->local.w[0] = l0;
		id->local.w[1] = l1;
		id->local.w[2] = l2;
		id->local.w[3] = l3;
		id->remote.w[0] = r0;
		id->remote.w[1] = r1;
		id->remote.w[2] = r2;
		id->remote.w[3] = r3;
	}
	id->lport = skops->local_port;
	/* remote_port holds the network-order port in its upper 16 bits. */
	id->rport = bpf_ntohl(skops->remote_port);
	/* Settled by the handshake on both ends: our snd_una is the peer's rcv_nxt. */
	id->snd_isn = skops->snd_una;
	id->rcv_isn = skops->rcv_nxt;
}

static __always_inline void publish_owner(struct conn_id *id, __u64 netns, __u64 sk)
{
	struct conn_owner fresh = { .netns = netns, .claims = 1, .flags = CONN_F_REDIRECT };
	struct conn_owner *cur;

	fresh.sk = sk;
	int rc = accel_conn_ns.insert(id, &fresh);
	if (rc == 0)
		return;
	cur = accel_conn_ns.lookup(id);
	if (!cur) {
		count(C_SOCKHASH_INSERT_FAILURES); /* full: the peer will not find us, both stay on TCP */
		return;
	}
	/* Another socket claims this exact identity: never trust it again. */
	__sync_fetch_and_add(&cur->claims, 1);
	if (cur->netns != netns)
		cur->netns = 0;
}

/* Whether this connection is handed socket to socket. The client end decides, from the
 * service it dialed (connect.c) or, dialed straight to a mesh address, the agent's default;
 * it publishes the choice with its owner entry, and the server end follows it. Everything
 * else stays plain TCP: the kernel's redirect changes what some socket calls see (splice,
 * MSG_OOB, a blocking read's wake-ups), so it is used only where it was asked for. */
static __always_inline int wants_redirect(struct bpf_sock_ops *skops, const struct conn_id *id,
					  struct bpf_sock *sk)
{
	struct conn_owner *client;
	struct sock_config *cfg;
	struct sock_state *st;
	struct conn_id peer;
	__u32 zero = 0;

	if (!ACCEL_REDIRECT_OK)
		return 0;
	if (skops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
		conn_id_reverse(&peer, id);
		client = accel_conn_ns.lookup(&peer);
		return client && (client->flags & CONN_F_REDIRECT);
	}
	st = accel_sock_state.sk_storage_get(sk, 0, 0);
	if (st && st->fastpath != FASTPATH_DEFAULT)
		return st->fastpath == FASTPATH_REDIRECT;
	cfg = accel_sock_config.lookup(&zero);
	return cfg && cfg->default_redirect;
}

static __always_inline void track(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct sock_state *st;
	struct sock_key key = {};

	if (!sk)
		return;
	read_conn_id(skops, &key.id);
	if (!is_mesh_addr(&key.id.local) && !is_mesh_addr(&key.id.remote)) {
		count(C_SOCKS_NON_MESH);
		return;
	}
	if (!wants_redirect(skops, &key.id, sk)) {
		count(C_SOCKS_ROUTED);
		return;
	}
	st = accel_sock_state.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		count(C_SOCKHASH_INSERT_FAILURES);
		return;
	}
	/* During an upgrade the old and the new program both run for a moment. */
	if (st->tracked)
		return;
	key.netns = bpf_get_netns_cookie(skops);
	st->id = key.id;
	st->netns = key.netns;
	st->self_sk = (__u64)sk;
	st->mode = MODE_TCP;
	/* Sockhash first, owner second: whoever finds our owner entry finds our socket. */
	/* bcc rewrites map methods as statements: keep each call on its own line. */
	int rc = accel_sockhash.sock_hash_update(skops, &key, BPF_NOEXIST);
	if (rc != 0) {
		count(C_SOCKHASH_INSERT_FAILURES);
		return;
	}
	publish_owner(&key.id, key.netns, (__u64)sk);
	st->tracked = 1;
	st->mode = MODE_UNDECIDED;
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	count(C_SOCKHASH_INSERTS);
}

static __always_inline void untrack(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct sock_state *st;
	struct conn_owner *cur;

	if (!sk)
		return;
	st = accel_sock_state.sk_storage_get(sk, 0, 0);
	if (!st || !st->tracked)
		return;
	st->tracked = 0;
	/* The sockhash drops closed sockets by itself; the owner entry is ours. */
	cur = accel_conn_ns.lookup(&st->id);
	if (cur) {
		/* claims > 1 only for a contested identity, which is never redirected. */
		if (cur->claims <= 1)
			accel_conn_ns.delete(&st->id);
		else
			__sync_fetch_and_add(&cur->claims, -1);
	}
	count(C_SOCKS_CLOSED);
}

int accel_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		if (qos_established(skops)) /* paced (lib/qos.h): TCP, never the redirect */
			break;
		track(skops);
		break;
	case BPF_SOCK_OPS_RTT_CB:
		qos_rtt(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE) {
			qos_closed(skops);
			untrack(skops);
		}
		break;
	}
	return 1;
}
