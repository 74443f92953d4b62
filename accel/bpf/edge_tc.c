/* Replies of balanced flows, given the VIP back as their source, so clients only ever
 * see the VIP. Two programs over one rewrite (reply_revnat):
 *
 * edge_tc, clsact egress of the edge interface: whatever leaves towards clients.
 *
 * edge_reply, clsact ingress of the host end of each backend's interface that the edge
 * enters directly (bpf_redirect_peer, or an XDP/tc redirect): a reply is rewritten there
 * and sent straight out of the edge interface (bpf_redirect_neigh, TTL one less), as the
 * request came in. Its connection never met the host's conntrack on the way in, so the
 * host's netfilter must not see the reply either: a masquerade rule for the backends'
 * subnet (Docker's, many CNIs') would take it for a new connection and rewrite its
 * source, and "ctstate INVALID -j DROP" rules would drop it. Anything else goes on to the
 * next filter (TC_ACT_UNSPEC: pod routing sits behind us on the same hook).
 *
 * edge_tc also translates ICMP errors So do ICMP
 * errors about a balanced flow (frag-needed / packet too big, unreachable, time
 * exceeded, from the backend or a router between): the packet they quote is
 * given the VIP back, and so is their source when the backend itself sent it;
 * the client's path-MTU discovery then works through the edge.
 *
 * The checksum helpers, not hand-made arithmetic: a reply from a local pod is
 * usually CHECKSUM_PARTIAL (the L4 field holds only the pseudo-header sum),
 * and bpf_l4_csum_replace(BPF_F_PSEUDO_HDR) updates either form correctly.
 * Every verdict is TC_ACT_OK: a packet we cannot read goes out as it is.
 */
#include "lib/common.h"
#include "lib/edge.h"
#include <uapi/linux/icmp.h>
#include <uapi/linux/icmpv6.h>
#include <uapi/linux/pkt_cls.h>

/* bcc's helpers.h declares bpf_redirect_neigh without its plen argument (the kernel's
 * has four since 5.11): declared here as the kernel defines it. */
static long (*redirect_neigh)(__u32 ifindex, void *params, int plen, __u64 flags) =
	(void *)BPF_FUNC_redirect_neigh;

static __always_inline void count(u32 idx)
{
	u64 *v = edge_counters.lookup(&idx);
	if (v)
		*v += 1;
}

/* The reply mapping of the flow an ICMP error quotes: the quoted packet went client ->
 * backend, so its reverse is the reply key. */
static __always_inline struct edge_rev *quoted_rev(struct edge_flow *rk, __u8 proto,
						   __u16 *ports)
{
	rk->sport = ports[1];
	rk->dport = ports[0];
	rk->proto = proto;
	return edge_revs.lookup(rk);
}

/* The quoted packet's own L4 checksum, where the error quotes it (UDP's is in the first 8
 * bytes, TCP's at byte 16: Linux quotes as much as fits): updated by `diff` (the address
 * and port given back), and the ICMP checksum at `sum` for that change. A UDP checksum of
 * 0 (none) stays 0. */
static __always_inline void quoted_l4sum(struct __sk_buff *skb, __u32 l4, __u8 proto, __u32 sum,
					 __u64 diff)
{
	__u32 at = l4 + (proto == IPPROTO_TCP ? offsetof(struct tcphdr, check)
					      : offsetof(struct udphdr, check));
	__u16 old, new;

	if (bpf_skb_load_bytes(skb, at, &old, 2))
		return; /* not quoted */
	if (proto == IPPROTO_UDP && old == 0)
		return;
	new = old;
	edge_csum_apply(&new, diff);
	if (proto == IPPROTO_UDP && new == 0)
		new = 0xffff;
	if (bpf_skb_store_bytes(skb, at, &new, 2, 0))
		return;
	bpf_l4_csum_replace(skb, sum, old, new, 2);
}

static __always_inline int icmp4_revnat(struct __sk_buff *skb, __u32 l3off, __u32 hl)
{
	__u32 off = l3off + hl; /* ICMP header; its checksum has no pseudo-header */
	__u8 type;

	if (bpf_skb_load_bytes(skb, off, &type, 1))
		return TC_ACT_OK;
	if (type != ICMP_DEST_UNREACH && type != ICMP_TIME_EXCEEDED && type != ICMP_PARAMETERPROB)
		return TC_ACT_OK;
	__u32 in3 = off + 8;
	struct iphdr in;
	if (bpf_skb_load_bytes(skb, in3, &in, sizeof(in)))
		return TC_ACT_OK;
	if (in.protocol != IPPROTO_TCP && in.protocol != IPPROTO_UDP)
		return TC_ACT_OK;
	__u32 ihl = in.ihl * 4;
	if (ihl < sizeof(in) || ihl > 60)
		return TC_ACT_OK;
	__u16 ports[2];
	if (bpf_skb_load_bytes(skb, in3 + ihl, ports, sizeof(ports)))
		return TC_ACT_OK;
	struct edge_flow rk = {};
	addr_from4(&rk.src, in.daddr);
	addr_from4(&rk.dst, in.saddr);
	struct edge_rev *rv = quoted_rev(&rk, in.protocol, ports);
	if (!rv)
		return TC_ACT_OK;

	__u32 vip = rv->vip.w[3], backend = in.daddr;
	__u16 vport = rv->vport, newc;
	__u32 sum = off + 2;
	if (bpf_skb_store_bytes(skb, in3 + offsetof(struct iphdr, daddr), &vip, 4, 0))
		return TC_ACT_OK;
	bpf_l3_csum_replace(skb, in3 + offsetof(struct iphdr, check), backend, vip, 4);
	if (bpf_skb_load_bytes(skb, in3 + offsetof(struct iphdr, check), &newc, 2))
		return TC_ACT_OK;
	bpf_l4_csum_replace(skb, sum, backend, vip, 4);
	bpf_l4_csum_replace(skb, sum, in.check, newc, 2);
	if (vport != ports[1]) {
		bpf_skb_store_bytes(skb, in3 + ihl + 2, &vport, 2, 0);
		bpf_l4_csum_replace(skb, sum, ports[1], vport, 2);
	}
	quoted_l4sum(skb, in3 + ihl, in.protocol, sum,
		     edge_csum_diff4(backend, vip) +
		     (vport != ports[1] ? edge_csum_diff4(ports[1], vport) : 0));
	/* A router on the way keeps its address; the backend's own answer is the VIP's. */
	__u32 osrc;
	if (!bpf_skb_load_bytes(skb, l3off + offsetof(struct iphdr, saddr), &osrc, 4) &&
	    osrc == backend) {
		bpf_skb_store_bytes(skb, l3off + offsetof(struct iphdr, saddr), &vip, 4, 0);
		bpf_l3_csum_replace(skb, l3off + offsetof(struct iphdr, check), backend, vip, 4);
	}
	count(E_ICMP_REVNAT);
	return TC_ACT_OK;
}

static __always_inline int icmp6_revnat(struct __sk_buff *skb, __u32 l3off)
{
	__u32 off = l3off + sizeof(struct ipv6hdr); /* checksum covers the pseudo-header */
	__u8 type;

	if (bpf_skb_load_bytes(skb, off, &type, 1))
		return TC_ACT_OK;
	if (type < ICMPV6_DEST_UNREACH || type > ICMPV6_PARAMPROB)
		return TC_ACT_OK;
	__u32 in3 = off + 8;
	struct ipv6hdr in;
	if (bpf_skb_load_bytes(skb, in3, &in, sizeof(in)))
		return TC_ACT_OK;
	if (in.nexthdr != IPPROTO_TCP && in.nexthdr != IPPROTO_UDP)
		return TC_ACT_OK;
	__u16 ports[2];
	if (bpf_skb_load_bytes(skb, in3 + sizeof(in), ports, sizeof(ports)))
		return TC_ACT_OK;
	struct edge_flow rk = {};
	__builtin_memcpy(&rk.src, &in.daddr, 16);
	__builtin_memcpy(&rk.dst, &in.saddr, 16);
	struct edge_rev *rv = quoted_rev(&rk, in.nexthdr, ports);
	if (!rv)
		return TC_ACT_OK;

	struct addr16 vip = rv->vip;
	__u16 vport = rv->vport;
	__u32 sum = off + 2;
	__s64 diff = bpf_csum_diff(rk.src.w, 16, vip.w, 16, 0);
	if (bpf_skb_store_bytes(skb, in3 + offsetof(struct ipv6hdr, daddr), vip.w, 16, 0))
		return TC_ACT_OK;
	bpf_l4_csum_replace(skb, sum, 0, diff, 0);
	if (vport != ports[1]) {
		bpf_skb_store_bytes(skb, in3 + sizeof(in) + 2, &vport, 2, 0);
		bpf_l4_csum_replace(skb, sum, ports[1], vport, 2);
	}
	__u64 qdiff = vport != ports[1] ? edge_csum_diff4(ports[1], vport) : 0;
#pragma unroll
	for (int i = 0; i < 4; i++)
		qdiff += edge_csum_diff4(rk.src.w[i], vip.w[i]);
	quoted_l4sum(skb, in3 + sizeof(in), in.nexthdr, sum, qdiff);
	struct addr16 osrc;
	if (!bpf_skb_load_bytes(skb, l3off + offsetof(struct ipv6hdr, saddr), &osrc, 16) &&
	    osrc.w[0] == rk.src.w[0] && osrc.w[1] == rk.src.w[1] &&
	    osrc.w[2] == rk.src.w[2] && osrc.w[3] == rk.src.w[3]) {
		bpf_skb_store_bytes(skb, l3off + offsetof(struct ipv6hdr, saddr), vip.w, 16, 0);
		bpf_l4_csum_replace(skb, sum, 0, diff, BPF_F_PSEUDO_HDR);
	}
	count(E_ICMP_REVNAT);
	return TC_ACT_OK;
}

/* 1: rewritten (*l3off, *v4 say where the IP header is), 0: not a reply of ours. An ICMP
 * error is translated here when `icmp` (edge_tc; edge_reply leaves errors to the kernel's
 * path, which ends at edge_tc): 0 either way. */
static __always_inline int reply_revnat(struct __sk_buff *skb, __u32 *l3out, int *v4out,
					int icmp)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u32 l3off = sizeof(*eth);
	__u16 h_proto;

	if ((void *)(eth + 1) > data_end)
		return 0;
	h_proto = eth->h_proto;
	if (h_proto == ETH_P_8021Q_BE || h_proto == ETH_P_8021AD_BE) {
		if (data + l3off + 4 > data_end)
			return 0;
		h_proto = *(__u16 *)(data + l3off + 2);
		l3off += 4;
	}

	struct edge_flow rk = {};
	__u32 l4off, addr_off, addr_len, l3sum_off = 0;

	if (h_proto == ETH_P_IP_BE) {
		struct iphdr *ip4 = data + l3off;
		if ((void *)(ip4 + 1) > data_end)
			return 0;
		if (ip4->protocol == IPPROTO_ICMP && ip4->ihl >= 5) {
			if (icmp)
				icmp4_revnat(skb, l3off, ip4->ihl * 4);
			return 0;
		}
		if (ip4->protocol != IPPROTO_TCP && ip4->protocol != IPPROTO_UDP)
			return 0;
		/* Later fragments carry no ports; a reply that big is split after us. */
		if (ip4->frag_off & IP_FRAG_BE)
			return 0;
		__u32 hl = ip4->ihl * 4;
		if (hl < sizeof(*ip4) || hl > 60)
			return 0;
		rk.proto = ip4->protocol;
		addr_from4(&rk.src, ip4->saddr);
		addr_from4(&rk.dst, ip4->daddr);
		addr_off = l3off + offsetof(struct iphdr, saddr);
		addr_len = 4;
		l3sum_off = l3off + offsetof(struct iphdr, check);
		l4off = l3off + hl;
	} else if (h_proto == ETH_P_IPV6_BE) {
		struct ipv6hdr *ip6 = data + l3off;
		if ((void *)(ip6 + 1) > data_end)
			return 0;
		if (ip6->nexthdr == IPPROTO_ICMPV6) {
			if (icmp)
				icmp6_revnat(skb, l3off);
			return 0;
		}
		if (ip6->nexthdr != IPPROTO_TCP && ip6->nexthdr != IPPROTO_UDP)
			return 0;
		rk.proto = ip6->nexthdr;
		__builtin_memcpy(&rk.src, &ip6->saddr, 16);
		__builtin_memcpy(&rk.dst, &ip6->daddr, 16);
		addr_off = l3off + offsetof(struct ipv6hdr, saddr);
		addr_len = 16;
		l4off = l3off + sizeof(*ip6);
	} else {
		return 0;
	}

	__u16 ports[2];
	if (bpf_skb_load_bytes(skb, l4off, ports, sizeof(ports)))
		return 0;
	rk.sport = ports[0];
	rk.dport = ports[1];

	struct edge_rev *rv = edge_revs.lookup(&rk);
	if (!rv)
		return 0;

	struct addr16 vip = rv->vip;
	__u16 vport = rv->vport;
	u32 vid = rv->vip_id;
	__u32 l4sum_off = l4off + (rk.proto == IPPROTO_TCP ? offsetof(struct tcphdr, check)
							   : offsetof(struct udphdr, check));
	__u64 l4flags = BPF_F_PSEUDO_HDR | (rk.proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0);

	/* Source address: IPv4 words are the last of the mapped form. */
	__s64 diff;
	if (addr_len == 4) {
		diff = bpf_csum_diff(&rk.src.w[3], 4, &vip.w[3], 4, 0);
		if (bpf_skb_store_bytes(skb, addr_off, &vip.w[3], 4, 0))
			return 0;
		bpf_l3_csum_replace(skb, l3sum_off, 0, diff, 0);
	} else {
		diff = bpf_csum_diff(rk.src.w, 16, vip.w, 16, 0);
		if (bpf_skb_store_bytes(skb, addr_off, vip.w, 16, 0))
			return 0;
	}
	bpf_l4_csum_replace(skb, l4sum_off, 0, diff, l4flags);
	if (vport != rk.sport) {
		bpf_l4_csum_replace(skb, l4sum_off, rk.sport, vport, l4flags | 2);
		bpf_skb_store_bytes(skb, l4off, &vport, 2, 0);
	}

	count(E_REPLY_REVNAT);
	struct edge_vip_stats *st = edge_vip_stats.lookup(&vid);
	if (st) {
		st->reply_packets++;
		st->reply_bytes += skb->len;
	}
	*l3out = l3off;
	*v4out = addr_len == 4;
	return 1;
}

int edge_tc(struct __sk_buff *skb)
{
	__u32 l3off = 0;
	int v4 = 0;

	reply_revnat(skb, &l3off, &v4, 1);
	return TC_ACT_OK;
}

int edge_reply(struct __sk_buff *skb)
{
	__u32 l3off = 0, zero = 0;
	int v4 = 0;

	if (skb->vlan_present || !reply_revnat(skb, &l3off, &v4, 0))
		return TC_ACT_UNSPEC;
	u32 *uplink = edge_uplink.lookup(&zero);
	if (!uplink || !*uplink)
		return TC_ACT_OK; /* rewritten: the kernel routes it (the VIP as its source) */
	/* Forwarded as a router would: TTL / hop limit one less; one expiring here is the
	 * kernel's to answer. */
	if (v4) {
		__u8 ttl;
		if (bpf_skb_load_bytes(skb, l3off + offsetof(struct iphdr, ttl), &ttl, 1) || ttl <= 1)
			return TC_ACT_OK;
		__u16 before, after;
		bpf_skb_load_bytes(skb, l3off + offsetof(struct iphdr, ttl), &before, 2);
		after = before;
		((__u8 *)&after)[0] = ttl - 1;
		bpf_skb_store_bytes(skb, l3off + offsetof(struct iphdr, ttl), &after, 2, 0);
		bpf_l3_csum_replace(skb, l3off + offsetof(struct iphdr, check), before, after, 2);
	} else {
		__u8 hops;
		if (bpf_skb_load_bytes(skb, l3off + offsetof(struct ipv6hdr, hop_limit), &hops, 1) ||
		    hops <= 1)
			return TC_ACT_OK;
		hops--;
		bpf_skb_store_bytes(skb, l3off + offsetof(struct ipv6hdr, hop_limit), &hops, 1, 0);
	}
	count(E_REPLY_DIRECT);
	return redirect_neigh(*uplink, NULL, 0, 0);
}
