/* L4 authorization (Istio AuthorizationPolicy) as precomputed decisions: every program
 * that enforces (connect.c at connect(), policy_tc.c on a SYN into a local pod,
 * policy_iter.c on established sockets after an update) decides the same way from these
 * maps, written by accel/datapath/policy.py from an accel.policy.verdicts.Verdicts:
 *
 *   dst identity = addrs[dst]; not in dsts: no policy, allowed, not counted;
 *   src identity = netns[client's netns cookie] (connect() only: the socket has no source
 *                  address yet), else addrs[src], else the longest prefix of cidrs, else 0;
 *   decision     = rules[(src, dst, port)], else rules[(src, dst, 0)], else dsts[dst].
 *
 * Two versions ("slots") of every table live side by side, the slot in each key: the
 * writer fills the slot not in use, then flips accel_policy_config.live, so a connection
 * is always decided by one whole table, the old or the new one, never by a mix (a mix can
 * allow what both deny). Each map is sized for both slots.
 *
 * bcc rewrites map calls only in a program's own file: each program that includes this
 * defines the accessors declared below (one line each, over the maps declared here).
 */
#ifndef ACCEL_POLICY_H
#define ACCEL_POLICY_H

#include "common.h"
#include "counters.h"

#ifndef ACCEL_POLICY_ADDRS_MAX
#define ACCEL_POLICY_ADDRS_MAX 131072 /* workload addresses, per slot */
#endif
#ifndef ACCEL_POLICY_CIDRS_MAX
#define ACCEL_POLICY_CIDRS_MAX 16384 /* source prefixes some policy names, per slot */
#endif
#ifndef ACCEL_POLICY_DSTS_MAX
#define ACCEL_POLICY_DSTS_MAX 65536 /* policed destination identities, per slot */
#endif
#ifndef ACCEL_POLICY_RULES_MAX
#define ACCEL_POLICY_RULES_MAX 262144 /* (src, dst, port) decisions, per slot */
#endif
#ifndef ACCEL_POLICY_NETNS_MAX
#define ACCEL_POLICY_NETNS_MAX 16384 /* local pods' network namespaces, per slot */
#endif
#ifndef ACCEL_POLICIES_MAX
#define ACCEL_POLICIES_MAX 16384 /* policies counted (slot 0: decided by no policy) */
#endif

enum policy_verdict {
	POLICY_NONE = 0, /* the destination has no policy */
	POLICY_ALLOW = 1,
	POLICY_DENY = 2,
	POLICY_DRY_RUN_DENY = 3, /* a dry-run policy would deny: allowed, counted */
};

/* Value of accel_policy_dsts (the destination's default) and accel_policy_rules. */
struct policy_decision {
	__u32 verdict; /* enum policy_verdict */
	__u32 policy;  /* index in accel_policy_stats of the policy that decided; 0: none */
};

struct policy_addr_key {
	struct addr16 addr;
	__u32 slot;
};

struct policy_addr {
	__u32 ident;
	__u32 flags; /* POLICY_ADDR_* */
};

/* The address is a local pod's whose namespace the agent knows: its connect() is decided
 * (and counted) there, and its sockets are walked after an update. Packet-level checks
 * do not count such a source's connections again. */
#define POLICY_ADDR_LOCAL 1
/* The address is a pod's whose own interface answers denied SYNs (policy_tc.c): a
 * connect() to it from a namespace of unknown identity is left to that check, which knows
 * the source address. To any other policed address such a connect() is decided as from an
 * unknown source (identity 0): fail closed, never let through undecided. */
#define POLICY_ADDR_GUARDED 2

/* LPM key: the slot is the first 32 bits of the prefix (prefixlen = 32 + address bits). */
struct policy_cidr_key {
	__u32 prefixlen;
	__u32 slot;
	struct addr16 addr;
};

struct policy_dst_key {
	__u32 ident;
	__u32 slot;
};

struct policy_rule_key {
	__u32 src;
	__u32 dst;
	__u16 port; /* host order; 0: any other port */
	__u16 slot;
};

struct policy_netns_key {
	__u64 cookie; /* bpf_get_netns_cookie / SO_NETNS_COOKIE */
	__u32 slot;
	__u32 pad;
};

struct policy_stats {
	__u64 allowed;
	__u64 denied;
	__u64 dry_run_denied;
	__u64 closed; /* established connections reset after an update denied them */
};

struct policy_config {
	__u32 live;  /* the slot every lookup reads */
	__u32 pass;  /* the socket walk in progress (policy_iter.c) */
	__u32 ident; /* identity of the namespace that walk is in (0: none known) */
	__u32 pad;
};

ACCEL_MAP_F("hash", struct policy_addr_key, struct policy_addr, accel_policy_addrs,
	    2 * ACCEL_POLICY_ADDRS_MAX, BPF_F_NO_PREALLOC);
ACCEL_MAP_F("lpm_trie", struct policy_cidr_key, __u32, accel_policy_cidrs,
	    2 * ACCEL_POLICY_CIDRS_MAX, BPF_F_NO_PREALLOC);
ACCEL_MAP_F("hash", struct policy_dst_key, struct policy_decision, accel_policy_dsts,
	    2 * ACCEL_POLICY_DSTS_MAX, BPF_F_NO_PREALLOC);
ACCEL_MAP_F("hash", struct policy_rule_key, struct policy_decision, accel_policy_rules,
	    2 * ACCEL_POLICY_RULES_MAX, BPF_F_NO_PREALLOC);
ACCEL_MAP_F("hash", struct policy_netns_key, __u32, accel_policy_netns,
	    2 * ACCEL_POLICY_NETNS_MAX, BPF_F_NO_PREALLOC);
ACCEL_MAP("percpu_array", u32, struct policy_stats, accel_policy_stats,
	  ACCEL_POLICIES_MAX + 1);
ACCEL_MAP("array", u32, struct policy_config, accel_policy_config, 1);

/* Defined by each program over the maps above (see the top of this file). */
static __always_inline struct policy_config *policy_config_get(void);
static __always_inline struct policy_addr *policy_addr_get(struct policy_addr_key *k);
static __always_inline __u32 *policy_cidr_get(struct policy_cidr_key *k);
static __always_inline struct policy_decision *policy_dst_get(struct policy_dst_key *k);
static __always_inline struct policy_decision *policy_rule_get(struct policy_rule_key *k);
static __always_inline struct policy_stats *policy_stats_get(__u32 *index);
static __always_inline __u32 *policy_netns_get(struct policy_netns_key *k);
/* lib/counters.h's, which every program defines. */
static __always_inline void count_add(u32 idx, u64 n);

/* A connection being decided: fill dst/port/slot with policy_dst(), the source with
 * policy_src_addr() (or a netns lookup), then policy_decide(). */
struct policy_query {
	__u32 slot;
	__u32 dst;
	__u32 src;
	__u32 src_flags;
	__u32 dst_flags;
	__u16 port;
	struct policy_decision dflt;
};

/* 0: the destination has no policy (nothing to decide). */
static __always_inline int policy_dst(struct policy_query *q, const struct addr16 *dst,
				      __u16 port)
{
	struct policy_config *cfg = policy_config_get();
	struct policy_addr_key ak = {};
	struct policy_dst_key dk = {};
	struct policy_addr *a;
	struct policy_decision *d;

	if (!cfg)
		return 0;
	q->slot = cfg->live;
	ak.addr = *dst;
	ak.slot = q->slot;
	a = policy_addr_get(&ak);
	if (!a)
		return 0;
	dk.ident = a->ident;
	dk.slot = q->slot;
	d = policy_dst_get(&dk);
	if (!d)
		return 0;
	q->dst = a->ident;
	q->dst_flags = a->flags;
	q->dflt = *d;
	q->port = port;
	return 1;
}

/* The source's identity by its address: a workload's, else a named prefix's, else 0. */
static __always_inline void policy_src_addr(struct policy_query *q, const struct addr16 *src)
{
	struct policy_addr_key ak = {};
	struct policy_cidr_key ck = {};
	struct policy_addr *a;
	__u32 *c;

	ak.addr = *src;
	ak.slot = q->slot;
	a = policy_addr_get(&ak);
	if (a) {
		q->src = a->ident;
		q->src_flags = a->flags;
		return;
	}
	ck.prefixlen = 32 + 128;
	ck.slot = q->slot;
	ck.addr = *src;
	c = policy_cidr_get(&ck);
	q->src = c ? *c : 0;
	q->src_flags = 0;
}

static __always_inline struct policy_decision policy_decide(struct policy_query *q)
{
	struct policy_rule_key rk = {};
	struct policy_decision *r;

	rk.src = q->src;
	rk.dst = q->dst;
	rk.port = q->port;
	rk.slot = q->slot;
	r = policy_rule_get(&rk);
	if (r)
		return *r;
	rk.port = 0;
	r = policy_rule_get(&rk);
	if (r)
		return *r;
	return q->dflt;
}

/* Count a decision against its policy: allowed, denied, or dry-run denied. */
static __always_inline void policy_count(struct policy_decision d)
{
	__u32 i = d.policy;
	struct policy_stats *s;

	if (i > ACCEL_POLICIES_MAX)
		return;
	s = policy_stats_get(&i);
	if (!s)
		return;
	if (d.verdict == POLICY_DENY)
		s->denied++;
	else if (d.verdict == POLICY_DRY_RUN_DENY)
		s->dry_run_denied++;
	else
		s->allowed++;
}

static __always_inline void policy_count_closed(__u32 i)
{
	struct policy_stats *s;

	if (i > ACCEL_POLICIES_MAX)
		return;
	s = policy_stats_get(&i);
	if (s)
		s->closed++;
}

/* ---- connect() (connect.c) ---- */

/* Authorization of a TCP connect() to dst:port (the endpoint, after balancing): a denied
 * one fails at once (EPERM) instead of sending a SYN. The source is the client's network
 * namespace (the socket has no address yet); from a namespace the agent has no identity
 * for, a bound socket is decided by its address, an unbound one at its SYN when the
 * destination pod answers denied SYNs (policy_tc.c, by address), else as from an unknown
 * source. */
static __always_inline int police(struct bpf_sock_addr *ctx, struct addr16 *dst, __u16 port,
				  struct addr16 *bound)
{
	struct policy_netns_key nk = {};
	struct policy_query q = {};
	struct policy_decision d;
	__u32 *ident;

	if (CTX_READ(ctx->type) != 1 /* SOCK_STREAM */ || !policy_dst(&q, dst, port))
		return 1;
	nk.cookie = bpf_get_netns_cookie(ctx);
	nk.slot = q.slot;
	ident = policy_netns_get(&nk);
	if (ident) {
		q.src = *ident;
	} else if (bound) {
		policy_src_addr(&q, bound);
	} else if (q.dst_flags & POLICY_ADDR_GUARDED) {
		count_add(C_POLICY_CONNECT_DEFERRED, 1);
		return 1;
	} else {
		q.src = 0;
	}
	d = policy_decide(&q);
	policy_count(d);
	return d.verdict == POLICY_DENY ? 0 : 1;
}

/* rc: what balancing answered (0: refused already). */
static __always_inline int police4(struct bpf_sock_addr *ctx, int rc)
{
	struct addr16 dst, src;
	struct bpf_sock *sk = ctx->sk;
	__u32 src4;

	if (!rc)
		return 0;
	src4 = sk ? sk->src_ip4 : 0;
	addr_from4(&dst, CTX_READ(ctx->user_ip4));
	addr_from4(&src, src4);
	return police(ctx, &dst, bpf_ntohs((__u16)CTX_READ(ctx->user_port)), src4 ? &src : NULL);
}

static __always_inline int police6(struct bpf_sock_addr *ctx, int rc)
{
	struct addr16 dst, src = {};
	struct bpf_sock *sk = ctx->sk;

	if (!rc)
		return 0;
	dst.w[0] = CTX_READ(ctx->user_ip6[0]);
	dst.w[1] = CTX_READ(ctx->user_ip6[1]);
	dst.w[2] = CTX_READ(ctx->user_ip6[2]);
	dst.w[3] = CTX_READ(ctx->user_ip6[3]);
	if (sk) {
		src.w[0] = sk->src_ip6[0];
		src.w[1] = sk->src_ip6[1];
		src.w[2] = sk->src_ip6[2];
		src.w[3] = sk->src_ip6[3];
	}
	return police(ctx, &dst, bpf_ntohs((__u16)CTX_READ(ctx->user_port)),
		      (src.w[0] | src.w[1] | src.w[2] | src.w[3]) ? &src : NULL);
}

#endif /* ACCEL_POLICY_H */
