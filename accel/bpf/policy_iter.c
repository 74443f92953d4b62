/* A TCP socket iterator (iter/tcp) run by the agent after every policy update, once
 * per network namespace it knows (each local pod's, and its own): every TCP socket
 * whose connection the new decisions deny is reset (bpf_sock_destroy: the socket
 * gets ECONNABORTED, the peer a reset), on whichever end lives here, and counted
 * once against the policy ("closed by update").
 *
 * A socket only knows its two addresses and ports, not which end opened the
 * connection. The iterator walks the namespace's listening sockets first (the
 * kernel's order: listening hash, then established hash) and notes their ports
 * for this walk; an established socket whose local port has a listener is the
 * server end (decided as remote -> local:local port), any other the client end
 * (local -> remote:remote port, the source identity that of the namespace, as at
 * connect()). An accepted connection whose listener is gone counts as a client
 * end: documented limit.
 *
 * bcc cannot emit a kfunc call: the call goes to a stub helper number that the
 * loader rewrites into bpf_sock_destroy (accel/kernel/sockiter.py). Kernel struct
 * offsets come from the running kernel's BTF as -D switches (the loader's). */
#include "lib/common.h"
#include "lib/counters.h"
#include "lib/policy.h"

struct sock_common;
struct bpf_iter_meta;

/* The kernel's context for iter/tcp (net/ipv4/tcp_ipv4.c): what the verifier checks
 * against by offset. */
struct bpf_iter__tcp {
	struct bpf_iter_meta *meta;
	struct sock_common *sk_common;
	__u32 uid;
};

/* Rewritten into a call of the kfunc bpf_sock_destroy (see sockiter.KFUNC_STUBS). */
static int (*accel_sock_destroy)(struct sock_common *sk) = (void *)0x7ff0;

#define TCP_SYN_SENT 2
#define TCP_TIME_WAIT 6
#define TCP_CLOSE 7
#define TCP_LISTEN 10
#define TCP_NEW_SYN_RECV 12

struct policy_listen_key {
	__u32 pass;
	__u16 port; /* host order */
	__u16 pad;
};

/* Ports with a listener in the walk `pass` (stale walks age out: LRU). */
ACCEL_MAP("lru_hash", struct policy_listen_key, __u8, accel_policy_listen, 65536);

static __always_inline void count_add(u32 idx, u64 n)
{
	u64 *v = accel_counters.lookup(&idx);
	if (v)
		*v += n;
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

#define READ(dst, sk, off) bpf_probe_read_kernel(&(dst), sizeof(dst), (void *)(sk) + (off))

int accel_policy_iter(struct bpf_iter__tcp *ctx)
{
	struct sock_common *sk = ctx->sk_common;
	struct policy_listen_key lk = {};
	struct policy_query q = {};
	struct policy_decision d;
	struct policy_config *cfg;
	struct addr16 local = {}, remote = {};
	__u16 family = 0, lport = 0, rport = 0;
	__u8 state = 0, one = 1;
	int server;

	if (!sk)
		return 0;
	cfg = policy_config_get();
	if (!cfg)
		return 0;
	READ(family, sk, ACCEL_OFF_SKC_FAMILY);
	READ(state, sk, ACCEL_OFF_SKC_STATE);
	READ(lport, sk, ACCEL_OFF_SKC_NUM);
	lk.pass = cfg->pass;
	lk.port = lport;
	if (state == TCP_LISTEN) {
		accel_policy_listen.update(&lk, &one);
		return 0;
	}
	if (state == TCP_TIME_WAIT || state == TCP_CLOSE || state == TCP_NEW_SYN_RECV ||
	    state == TCP_SYN_SENT)
		return 0;
	READ(rport, sk, ACCEL_OFF_SKC_DPORT);
	rport = bpf_ntohs(rport);
	if (family == AF_INET) {
		__u32 a = 0;

		READ(a, sk, ACCEL_OFF_SKC_RCV_SADDR);
		addr_from4(&local, a);
		READ(a, sk, ACCEL_OFF_SKC_DADDR);
		addr_from4(&remote, a);
	} else if (family == AF_INET6) {
		READ(local, sk, ACCEL_OFF_SKC_V6_RCV_SADDR);
		READ(remote, sk, ACCEL_OFF_SKC_V6_DADDR);
	} else {
		return 0;
	}
	server = accel_policy_listen.lookup(&lk) != NULL;
	if (server) {
		if (!policy_dst(&q, &local, lport))
			return 0;
		policy_src_addr(&q, &remote);
	} else {
		if (!policy_dst(&q, &remote, rport))
			return 0;
		if (cfg->ident)
			q.src = cfg->ident;
		else
			policy_src_addr(&q, &local);
	}
	d = policy_decide(&q);
	if (d.verdict != POLICY_DENY)
		return 0;
	if (accel_sock_destroy(sk) != 0)
		return 0;
	/* Once per connection: by its server end, or by the client end when the server
	 * is not a local pod whose namespace is walked too. */
	if (server || !(q.dst_flags & POLICY_ADDR_LOCAL))
		policy_count_closed(d.policy);
	return 0;
}
