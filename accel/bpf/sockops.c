/* sock_ops on a cgroup2 directory: put established mesh sockets into the
 * sockhash and publish which namespace owns each connection end.
 * See lib/sock.h for why pairing needs the namespace and the handshake. */
#include "lib/common.h"
#include "lib/counters.h"
#include "lib/flows.h"
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
	if (skops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		st->flow.flags |= FLOW_S_PASSIVE; /* publishes what it redirects (lib/flows.h) */
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

/* ---- connection records (lib/flows.h) ---------------------------------------------- */

/* connect() to a VIP (connect.c kept which in the socket's storage): start the record. */
static __always_inline void flow_start(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct sock_state *st;
	struct svc_key key = {};
	struct svc_val *svc;

	if (!sk)
		return;
	st = accel_sock_state.sk_storage_get(sk, 0, 0);
	if (!st || !st->vip.set || !flows_on())
		return;
	key.vip = st->vip.vip;
	key.port = st->vip.vip_port;
	key.proto = IPPROTO_TCP;
	svc = accel_services.lookup(&key);
	st->flow.svc = svc ? svc->index : FLOW_SVC_UNKNOWN;
	st->flow.start = bpf_ktime_get_boot_ns();
	st->flow.reported = st->flow.start; /* the handshake's RTT sample reports nothing */
	st->flow.cookie = bpf_get_socket_cookie(skops);
	st->flow.netns = bpf_get_netns_cookie(skops);
	st->flow.flags |= FLOW_S_CLIENT;
	/* STATE_CB for the close, RTT_CB (each ACK) for the reports of a long connection. */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
				  BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTT_CB_FLAG);
}

/* Whether each FIN is in TCP's byte counters: bytes_acked counts our SYN and, once
 * acknowledged, our FIN; bytes_received counts their FIN once received. `state` is the
 * state the socket is in (at STATE_CB: the one it leaves). All our sequence space is
 * acknowledged (snd_una == snd_nxt) only once the FIN we sent is. A socket closed in
 * FIN_WAIT2 by the orphan timeout, its peer never having sent a FIN, counts one byte
 * received too many: a peer that never closes. */
static __always_inline void flow_fins(__u32 state, __u32 snd_una, __u32 snd_nxt, __u64 *ours,
				      __u64 *theirs)
{
	*ours = state == BPF_TCP_FIN_WAIT2 ||
		((state == BPF_TCP_FIN_WAIT1 || state == BPF_TCP_CLOSING ||
		  state == BPF_TCP_LAST_ACK) && snd_una == snd_nxt);
	*theirs = state == BPF_TCP_CLOSE_WAIT || state == BPF_TCP_LAST_ACK ||
		  state == BPF_TCP_CLOSING || state == BPF_TCP_FIN_WAIT2 ||
		  state == BPF_TCP_TIME_WAIT;
}

/* An event of the client end: open, report, close. TCP's counters hold what went over TCP,
 * plus the SYN and FINs (flow_fins); what was redirected is counted apart (lib/flows.h). */
static __always_inline void flow_emit(struct bpf_sock_ops *skops, struct sock_state *st,
				      __u8 kind)
{
	struct flow_event *ev;
	struct conn_id id = {};
	struct conn_owner *own;
	__u64 acked, received, theirs = 0, fin_ours, fin_theirs;
	__u32 state;

	if (!flows_on())
		return;
	read_conn_id(skops, &id);
	ev = flow_reserve();
	if (!ev)
		return;
	flow_fill(ev, st, kind, bpf_ktime_get_boot_ns());
	ev->client = id.local;
	ev->client_port = id.lport;
	ev->server_netns = st->peer_netns;
	ev->srtt_us = skops->srtt_us >> 3; /* the kernel keeps it times 8 */
	ev->retransmits = skops->total_retrans;
	acked = skops->bytes_acked;
	received = skops->bytes_received;
	if (kind == FLOW_CLOSE && st->netns) {
		/* What the server handed us socket to socket: final, it sent its FIN. */
		own = accel_conn_ns.lookup(&st->id);
		if (own && own->netns == st->netns) {
			theirs = own->handed;
			if (own->handed_netns)
				ev->server_netns = own->handed_netns;
		}
	}
	state = kind == FLOW_CLOSE ? (__u32)skops->args[0] : skops->state;
	flow_fins(state, skops->snd_una, skops->snd_nxt, &fin_ours, &fin_theirs);
	acked = acked > fin_ours ? acked - 1 - fin_ours : 0; /* and our SYN */
	received = received >= fin_theirs ? received - fin_theirs : 0;
	ev->bytes_sent = acked + st->redirected;
	ev->bytes_received = received + theirs;
	ev->bytes_redirected = st->redirected + theirs;
	ev->path = ev->bytes_redirected ? FLOW_PATH_REDIRECTED : FLOW_PATH_TCP;
	flow_submit(ev);
}

/* The server end of a redirected connection sends its FIN (or resets): from now on it hands
 * the client nothing more; leave the count in the client's owner entry, which lives until
 * the client's close has read it. */
static __always_inline void flow_publish(struct sock_state *st)
{
	struct conn_owner *client;
	struct conn_id id;

	if ((st->flow.flags & (FLOW_S_PASSIVE | FLOW_S_PUBLISHED)) != FLOW_S_PASSIVE ||
	    !st->redirected || !st->peer_netns || !flows_on())
		return;
	st->flow.flags |= FLOW_S_PUBLISHED;
	conn_id_reverse(&id, &st->id);
	client = accel_conn_ns.lookup(&id);
	if (!client || client->netns != st->peer_netns)
		return; /* contested or gone: the client's record counts TCP's bytes alone */
	client->handed = st->redirected;
	client->handed_netns = st->netns;
}

static __always_inline void flow_state(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct sock_state *st;
	__u32 to = skops->args[1];

	if (!sk)
		return;
	st = accel_sock_state.sk_storage_get(sk, 0, 0);
	if (!st || !st->flow.flags)
		return;
	if (to == BPF_TCP_FIN_WAIT1 || to == BPF_TCP_LAST_ACK || to == BPF_TCP_CLOSE)
		flow_publish(st);
	if (to == BPF_TCP_CLOSE && (st->flow.flags & FLOW_S_CLIENT)) {
		flow_emit(skops, st, FLOW_CLOSE);
		st->flow.flags &= ~FLOW_S_CLIENT; /* one close per connection */
	}
}

static __always_inline void flow_established(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct sock_state *st;

	if (!sk)
		return;
	st = accel_sock_state.sk_storage_get(sk, 0, 0);
	if (!st || !(st->flow.flags & FLOW_S_CLIENT))
		return;
	st->flow.reported = bpf_ktime_get_boot_ns();
	flow_emit(skops, st, FLOW_OPEN);
}

/* Each RTT sample of a recorded client connection: its periodic report, and the pacing of
 * a bandwidth limit its service got after it opened (lib/qos.h qos_late). */
static __always_inline void flow_rtt(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct sock_state *st;

	if (!sk)
		return;
	st = accel_sock_state.sk_storage_get(sk, 0, 0);
	if (!st)
		return;
	if ((st->flow.flags & FLOW_S_CLIENT) && st->flow.svc != FLOW_SVC_UNKNOWN)
		qos_late(skops, st->flow.svc);
	if (flow_report_due(st, bpf_ktime_get_boot_ns()))
		flow_emit(skops, st, FLOW_REPORT);
}

int accel_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		flow_start(skops);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		if (!qos_established(skops)) /* paced (lib/qos.h): TCP, never the redirect */
			track(skops);
		flow_established(skops);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		track(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		flow_state(skops);
		if (skops->args[1] == BPF_TCP_CLOSE) {
			qos_closed(skops);
			untrack(skops);
		}
		break;
	case BPF_SOCK_OPS_RTT_CB:
		qos_rtt(skops);
		flow_rtt(skops);
		break;
	}
	return 1;
}
