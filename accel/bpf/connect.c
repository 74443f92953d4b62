/* cgroup sock_addr programs: balance a service VIP:port to an endpoint when a
 * socket connects (TCP, connected UDP) or sends (unconnected UDP), and show the
 * VIP again in getpeername() and recvmsg(). No DNAT, no per-packet work: both
 * ends of the connection see the endpoint's real address, so the socket fast
 * path pairs them like any pod-to-pod connection. Misses and errors proceed
 * untouched (fail open); a service with no usable endpoint refuses at once,
 * as kube-proxy's REJECT does, instead of leaving the client waiting on a VIP
 * nobody answers. */
#include "lib/common.h"
#include "lib/counters.h"
#include "lib/lb.h"
#include "lib/flows.h"
#include "lib/policy.h"
#include "lib/qos.h"
#include "lib/sock.h"

#define SYS_PROCEED 1
#define SYS_REJECT 0

static __always_inline void count_add(u32 idx, u64 n)
{
	u64 *v = accel_counters.lookup(&idx);
	if (v)
		*v += n;
}

#define count(idx) count_add((idx), 1)

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

/* Refuse a connect() to `key` and record why (enum flow_reason): the one exit of every
 * refusal, so each reason shows in `accel flows`. */
static __always_inline int refuse(struct bpf_sock_addr *ctx, struct svc_key *key, __u8 reason)
{
	struct svc_val *svc = accel_services.lookup(key);
	struct flow_event *ev;

	if (!flows_on())
		return SYS_REJECT;
	ev = flow_reserve();
	if (!ev)
		return SYS_REJECT;
	flow_fill_refused(ev, &key->vip, key->port, svc ? svc->index : FLOW_SVC_UNKNOWN, reason,
			  bpf_get_socket_cookie(ctx), bpf_get_netns_cookie(ctx),
			  bpf_ktime_get_boot_ns());
	flow_submit(ev);
	return SYS_REJECT;
}

/* lib/policy.h's accessors, over its maps (bcc rewrites map calls only here). */
static __always_inline struct policy_config *policy_config_get(void)
{
	__u32 zero = 0;
	return accel_policy_config.lookup(&zero);
}
static __always_inline struct policy_addr *policy_addr_get(struct policy_addr_key *k)
{
	return accel_policy_addrs.lookup(k);
}
static __always_inline __u32 *policy_cidr_get(struct policy_cidr_key *k)
{
	return accel_policy_cidrs.lookup(k);
}
static __always_inline struct policy_decision *policy_dst_get(struct policy_dst_key *k)
{
	return accel_policy_dsts.lookup(k);
}
static __always_inline struct policy_decision *policy_rule_get(struct policy_rule_key *k)
{
	return accel_policy_rules.lookup(k);
}
static __always_inline struct policy_stats *policy_stats_get(__u32 *index)
{
	return accel_policy_stats.lookup(index);
}
static __always_inline __u32 *policy_netns_get(struct policy_netns_key *k)
{
	return accel_policy_netns.lookup(k);
}

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

static __always_inline void svc_count(__u32 index, int ok)
{
	struct svc_stats *s = accel_svc_stats.lookup(&index);
	if (!s)
		return;
	if (ok)
		s->connects++;
	else
		s->no_backend++;
}

/* The service of VIP:port, else the one on every port of the VIP (SVC_ANY_PORT). The
 * caller's key keeps the port dialed: getpeername() must show it, not the wildcard. */
static __always_inline struct svc_val *find_service(struct svc_key *key)
{
	struct svc_val *svc = accel_services.lookup(key);
	struct svc_key any;

	if (svc || key->port == SVC_ANY_PORT)
		return svc;
	any = *key;
	any.port = SVC_ANY_PORT;
	return accel_services.lookup(&any);
}

/* Pick an endpoint for key; NULL when the VIP is not a service. *reject is set
 * when it is a service without a usable endpoint (1) or over its connection limit (2). */
static __always_inline struct backend *pick(struct bpf_sock_addr *ctx, struct svc_key *key,
					     int *reject, __u32 *flags, int connected)
{
	struct svc_val *svc = find_service(key);
	struct slot_key sk = {};
	struct backend *be;

	if (!svc)
		return NULL;
	if (svc->nslots == 0) {
		svc_count(svc->index, 0);
		count(C_CONNECT_NO_BACKEND);
		*reject = 1;
		return NULL;
	}
	if (connected && qos_connect_refused(ctx, svc->index)) {
		*reject = 2; /* over the service's connection rate (lib/qos.h): EPERM at once */
		return NULL;
	}
	sk.slots_id = svc->slots_id;
	sk.slot = bpf_get_prandom_u32() % svc->nslots;
	be = accel_slots.lookup(&sk);
	if (!be) {
		count(C_CONNECT_NO_BACKEND); /* mid-flip: proceed untouched */
		return NULL;
	}
	svc_count(svc->index, 1);
	*flags = svc->flags;
	return be;
}

static __always_inline void remember_vip(void *ctx, struct svc_key *key, struct backend *be)
{
	struct revnat_key rk = {};
	struct revnat_val rv = {};

	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.backend = be->addr;
	rk.port = be->port;
	rv.vip = key->vip;
	rv.port = key->port;
	int rc = accel_revnat.update(&rk, &rv);
	if (rc != 0)
		count(C_REVNAT_FAILURES);
}

/* connect(): one peer for the socket's life, kept with the socket itself. */
static __always_inline void remember_vip_sk(struct bpf_sock_addr *ctx, struct svc_key *key,
					    struct backend *be, __u32 flags)
{
	struct bpf_sock *sk = ctx->sk;
	struct sock_state *st;
	struct sock_vip *sv;

	if (!sk) {
		remember_vip(ctx, key, be);
		return;
	}
	st = accel_sock_state.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		remember_vip(ctx, key, be); /* no storage: the LRU still serves */
		return;
	}
	/* sock_ops reads it when the connection is established: redirect or stay on TCP. */
	st->fastpath = (flags & SVC_F_REDIRECT) ? FASTPATH_REDIRECT : FASTPATH_ROUTE;
	sv = &st->vip;
	sv->set = 1;
	sv->backend = be->addr;
	sv->backend_port = be->port;
	sv->vip = key->vip;
	sv->vip_port = key->port;
}

/* The VIP a connected socket dialed, when `addr:port` is the endpoint it got. */
static __always_inline struct sock_vip *dialed_vip(struct bpf_sock_addr *ctx,
						   struct addr16 *addr, __u16 port)
{
	struct bpf_sock *sk = ctx->sk;
	struct sock_state *st;

	if (!sk)
		return NULL;
	st = accel_sock_state.sk_storage_get(sk, 0, 0);
	if (!st || !st->vip.set || st->vip.backend_port != port ||
	    !addr_eq(&st->vip.backend, addr))
		return NULL;
	return &st->vip;
}

static __always_inline int balance4(struct bpf_sock_addr *ctx, __u32 counter, int connected)
{
	struct svc_key key = {};
	struct backend *be;
	__u32 flags = 0;
	int reject = 0;

	addr_from4(&key.vip, CTX_READ(ctx->user_ip4));
	key.port = bpf_ntohs((__u16)CTX_READ(ctx->user_port));
	key.proto = CTX_READ(ctx->protocol);
	be = pick(ctx, &key, &reject, &flags, connected);
	if (!be)
		return reject ? refuse(ctx, &key, reject == 2 ? FLOW_R_LIMIT : FLOW_R_NO_BACKEND)
			      : SYS_PROCEED;
	if (!addr_is_v4(&be->addr)) {
		count(C_CONNECT_FAMILY_MISMATCH);
		return SYS_PROCEED;
	}
	ctx->user_ip4 = be->addr.w[3];
	ctx->user_port = bpf_htons(be->port);
	if (connected)
		remember_vip_sk(ctx, &key, be, flags);
	else
		remember_vip(ctx, &key, be);
	count(counter);
	return SYS_PROCEED;
}

static __always_inline int balance6(struct bpf_sock_addr *ctx, __u32 counter, int connected)
{
	struct svc_key key = {};
	struct backend *be;
	__u32 flags = 0;
	int reject = 0;

	key.vip.w[0] = CTX_READ(ctx->user_ip6[0]);
	key.vip.w[1] = CTX_READ(ctx->user_ip6[1]);
	key.vip.w[2] = CTX_READ(ctx->user_ip6[2]);
	key.vip.w[3] = CTX_READ(ctx->user_ip6[3]);
	key.port = bpf_ntohs((__u16)CTX_READ(ctx->user_port));
	key.proto = CTX_READ(ctx->protocol);
	be = pick(ctx, &key, &reject, &flags, connected);
	if (!be)
		return reject ? refuse(ctx, &key, reject == 2 ? FLOW_R_LIMIT : FLOW_R_NO_BACKEND)
			      : SYS_PROCEED;
	/* An IPv4 endpoint is dialed as ::ffff:a.b.c.d from an IPv6 socket. */
	ctx->user_ip6[0] = be->addr.w[0];
	ctx->user_ip6[1] = be->addr.w[1];
	ctx->user_ip6[2] = be->addr.w[2];
	ctx->user_ip6[3] = be->addr.w[3];
	ctx->user_port = bpf_htons(be->port);
	if (connected)
		remember_vip_sk(ctx, &key, be, flags);
	else
		remember_vip(ctx, &key, be);
	count(counter);
	return SYS_PROCEED;
}

/* The peer the socket reports (getpeername, recvmsg source) back to the VIP. */
static __always_inline int unbalance4(struct bpf_sock_addr *ctx)
{
	struct revnat_key rk = {};
	struct revnat_val *rv;
	struct sock_vip *sv;

	addr_from4(&rk.backend, CTX_READ(ctx->user_ip4));
	rk.port = bpf_ntohs((__u16)CTX_READ(ctx->user_port));
	sv = dialed_vip(ctx, &rk.backend, rk.port);
	if (sv) {
		if (!addr_is_v4(&sv->vip))
			return SYS_PROCEED;
		ctx->user_ip4 = sv->vip.w[3];
		ctx->user_port = bpf_htons(sv->vip_port);
		count(C_PEERNAME_VIP);
		return SYS_PROCEED;
	}
	rk.cookie = bpf_get_socket_cookie(ctx);
	rv = accel_revnat.lookup(&rk);
	if (!rv || !addr_is_v4(&rv->vip))
		return SYS_PROCEED;
	ctx->user_ip4 = rv->vip.w[3];
	ctx->user_port = bpf_htons(rv->port);
	count(C_PEERNAME_VIP);
	return SYS_PROCEED;
}

static __always_inline int unbalance6(struct bpf_sock_addr *ctx)
{
	struct revnat_key rk = {};
	struct revnat_val *rv;
	struct revnat_val found = {};
	struct sock_vip *sv;

	rk.backend.w[0] = CTX_READ(ctx->user_ip6[0]);
	rk.backend.w[1] = CTX_READ(ctx->user_ip6[1]);
	rk.backend.w[2] = CTX_READ(ctx->user_ip6[2]);
	rk.backend.w[3] = CTX_READ(ctx->user_ip6[3]);
	rk.port = bpf_ntohs((__u16)CTX_READ(ctx->user_port));
	sv = dialed_vip(ctx, &rk.backend, rk.port);
	if (sv) {
		found.vip = sv->vip;
		found.port = sv->vip_port;
		rv = &found;
	} else {
		rk.cookie = bpf_get_socket_cookie(ctx);
		rv = accel_revnat.lookup(&rk);
	}
	if (!rv)
		return SYS_PROCEED;
	ctx->user_ip6[0] = rv->vip.w[0];
	ctx->user_ip6[1] = rv->vip.w[1];
	ctx->user_ip6[2] = rv->vip.w[2];
	ctx->user_ip6[3] = rv->vip.w[3];
	ctx->user_port = bpf_htons(rv->port);
	count(C_PEERNAME_VIP);
	return SYS_PROCEED;
}

/* Balanced first, then authorized for the endpoint it got (lib/policy.h). */
/* A connect() the policy denied (lib/policy.h), recorded like any refused one: under the
 * VIP the client dialed (kept with the socket by balancing), else the address it dialed. */
static __always_inline int policy_refused(struct bpf_sock_addr *ctx, struct addr16 *dst)
{
	struct svc_key key = {};
	struct sock_state *st = ctx->sk ? accel_sock_state.sk_storage_get(ctx->sk, 0, 0) : NULL;

	key.proto = CTX_READ(ctx->protocol);
	if (st && st->vip.set) {
		key.vip = st->vip.vip;
		key.port = st->vip.vip_port;
	} else {
		key.vip = *dst;
		key.port = bpf_ntohs((__u16)CTX_READ(ctx->user_port));
	}
	return refuse(ctx, &key, FLOW_R_POLICY);
}

static __always_inline int authorize4(struct bpf_sock_addr *ctx, int rc)
{
	struct addr16 dst;

	if (!rc || police4(ctx, rc))
		return rc;
	addr_from4(&dst, CTX_READ(ctx->user_ip4));
	return policy_refused(ctx, &dst);
}

static __always_inline int authorize6(struct bpf_sock_addr *ctx, int rc)
{
	struct addr16 dst;

	if (!rc || police6(ctx, rc))
		return rc;
	dst.w[0] = CTX_READ(ctx->user_ip6[0]);
	dst.w[1] = CTX_READ(ctx->user_ip6[1]);
	dst.w[2] = CTX_READ(ctx->user_ip6[2]);
	dst.w[3] = CTX_READ(ctx->user_ip6[3]);
	return policy_refused(ctx, &dst);
}

int accel_connect4(struct bpf_sock_addr *ctx) { return authorize4(ctx, balance4(ctx, C_CONNECT_BALANCED, 1)); }
int accel_connect6(struct bpf_sock_addr *ctx) { return authorize6(ctx, balance6(ctx, C_CONNECT_BALANCED, 1)); }
int accel_sendmsg4(struct bpf_sock_addr *ctx) { return balance4(ctx, C_UDP_BALANCED, 0); }
int accel_sendmsg6(struct bpf_sock_addr *ctx) { return balance6(ctx, C_UDP_BALANCED, 0); }
int accel_recvmsg4(struct bpf_sock_addr *ctx) { return unbalance4(ctx); }
int accel_recvmsg6(struct bpf_sock_addr *ctx) { return unbalance6(ctx); }
int accel_peer4(struct bpf_sock_addr *ctx) { return unbalance4(ctx); }
int accel_peer6(struct bpf_sock_addr *ctx) { return unbalance6(ctx); }
