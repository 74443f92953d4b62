/* tc ingress on the pod side of each policed local pod's veth (inside the pod's
 * namespace): a SYN into the pod that policy denies is answered with a TCP reset,
 * so a client on another host, or in a namespace outside the agent's cgroup, is
 * refused at once instead of waiting out SYN retries.
 *
 * Why there: a packet for the pod arrives either through the host's bridge or
 * routing (out of the host-side veth, into the pod side) or from pod routing's
 * bpf_redirect_peer (accel/bpf/pod_tc.c), which skips the host side's egress but
 * runs the pod side's ingress hook. One program sees both.
 *
 * Only a SYN without ACK is decided (the connection's setup); every other packet
 * passes after the header parse. A non-SYN packet of a connection never admitted
 * finds no socket in the pod, whose own TCP answers it with a reset: nothing to
 * add per packet. A source the agent already decided at connect() (a local pod
 * of known namespace, POLICY_ADDR_LOCAL) is decided again here, by address, but
 * counted only if it is denied (a race with an update, or a client outside the
 * agent's cgroup): its connect() counted it.
 *
 * The reset (lib/tcp_reset.h) goes back out of the pod's interface, as the pod's
 * own TCP would answer a closed port. */
#include "lib/common.h"
#include "lib/counters.h"
#include "lib/policy.h"
#include "lib/tcp_reset.h"
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>

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

/* Decide a SYN src -> dst:port; 1: denied. */
static __always_inline int denied(struct addr16 *src, struct addr16 *dst, __u16 port)
{
	struct policy_query q = {};
	struct policy_decision d;

	if (!policy_dst(&q, dst, port))
		return 0;
	policy_src_addr(&q, src);
	d = policy_decide(&q);
	if (!(q.src_flags & POLICY_ADDR_LOCAL) || d.verdict == POLICY_DENY)
		policy_count(d);
	return d.verdict == POLICY_DENY;
}

int accel_policy_tc(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct addr16 src, dst;
	struct tcphdr *tcp;
	__u8 flags;

	if ((void *)(eth + 1) > end)
		return TC_ACT_OK;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		__u32 saddr, daddr;

		if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_TCP ||
		    (ip->frag_off & bpf_htons(0x1fff)))
			return TC_ACT_OK; /* not TCP, or no TCP header (a later fragment) */
		tcp = (void *)ip + ip->ihl * 4;
		if (ip->ihl < 5 || (void *)(tcp + 1) > end)
			return TC_ACT_OK;
		flags = ((__u8 *)tcp)[TCP_FLAGS_OFF];
		if ((flags & (F_SYN | F_ACK | F_RST)) != F_SYN)
			return TC_ACT_OK;
		saddr = ip->saddr;
		daddr = ip->daddr;
		addr_from4(&src, saddr);
		addr_from4(&dst, daddr);
		if (!denied(&src, &dst, bpf_ntohs(tcp->dest)))
			return TC_ACT_OK;
		goto reset;
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > end)
			return TC_ACT_OK;
		__builtin_memcpy(&dst, &ip6->daddr, sizeof(dst));
		if (ip6->nexthdr != IPPROTO_TCP) {
			/* Extension headers before TCP: not parsed here. A policed
			 * destination takes none (a SYN could hide behind them). */
			struct policy_query q = {};

			switch (ip6->nexthdr) {
			case 0: case 43: case 44: case 50: case 51: case 60: case 135:
				if (!policy_dst(&q, &dst, 0))
					return TC_ACT_OK;
				count_add(C_POLICY_UNPARSED, 1);
				return TC_ACT_SHOT;
			}
			return TC_ACT_OK;
		}
		tcp = (void *)(ip6 + 1);
		if ((void *)(tcp + 1) > end)
			return TC_ACT_OK;
		flags = ((__u8 *)tcp)[TCP_FLAGS_OFF];
		if ((flags & (F_SYN | F_ACK | F_RST)) != F_SYN)
			return TC_ACT_OK;
		__builtin_memcpy(&src, &ip6->saddr, sizeof(src));
		if (!denied(&src, &dst, bpf_ntohs(tcp->dest)))
			return TC_ACT_OK;
		goto reset;
	}
	return TC_ACT_OK;
reset:
	if (tcp_reset_syn(skb) < 0) {
		count_add(C_POLICY_RST_FAILURES, 1);
		return TC_ACT_SHOT;
	}
	return bpf_redirect(skb->ifindex, 0);
}
