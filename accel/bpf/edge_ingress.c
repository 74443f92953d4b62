/* tc (clsact ingress of the edge interface): finishes what edge_xdp.c marked on a frame
 * it passed to the kernel (struct edge_meta, XDP metadata in front of the frame).
 *
 * EDGE_META_PEER: a balanced packet for a pod behind a veth that takes no XDP frames, as
 * container runtimes leave pods (no XDP program, no GRO on the pod end). XDP rewrote the
 * address; here the MACs are set (the pod's, and its gateway's as source), the TTL / hop
 * limit goes one down as routing would, and bpf_redirect_peer moves the skb into the
 * pod's namespace within this softirq round: no kernel forwarding, no bridge, no second
 * backlog queue. The skb is the one GRO built on this interface, so the pod receives
 * large segments without GRO of its own, and nothing about the pod is changed. A packet
 * whose TTL expires here, or that is bigger than the pod's MTU, goes on to the kernel,
 * which forwards it (or answers with ICMP, which edge_tc.c translates).
 *
 * EDGE_META_REFUSE: a SYN to a VIP over the VIP's connection limit, left unchanged by
 * XDP. It is answered with a reset from the VIP (lib/tcp_reset.h), sent back out of this
 * interface: the client fails at once.
 *
 * A frame without our mark passes untouched. */
#include "lib/common.h"
#include "lib/edge.h"
#include "lib/tcp_reset.h"
#include <uapi/linux/pkt_cls.h>

static __always_inline void count(u32 idx)
{
	u64 *v = edge_counters.lookup(&idx);
	if (v)
		*v += 1;
}

static __always_inline int to_kernel(void)
{
	count(E_PEER_KERNEL);
	return TC_ACT_OK;
}

static __always_inline int into_pod(struct __sk_buff *skb, u32 bid)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct edge_backend *be = edge_backends.lookup(&bid);
	__u32 hl, seg;

	if (!be || !(be->flags & EDGE_BE_PEER) || !be->peer_ifindex)
		return to_kernel(); /* changed since XDP looked: the kernel routes it */
	if ((void *)(eth + 1) > data_end)
		return to_kernel();
	if (eth->h_proto == ETH_P_IP_BE) {
		struct iphdr *ip4 = (void *)(eth + 1);
		if ((void *)(ip4 + 1) > data_end || ip4->ttl <= 1)
			return to_kernel();
		hl = ip4->ihl * 4;
		if (ip4->protocol == IPPROTO_TCP) {
			struct tcphdr *th = (void *)ip4 + hl;
			if (hl < sizeof(*ip4) || (void *)(th + 1) > data_end)
				return to_kernel();
			hl += th->doff * 4;
		} else {
			hl += sizeof(struct udphdr);
		}
	} else if (eth->h_proto == ETH_P_IPV6_BE) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end || ip6->hop_limit <= 1)
			return to_kernel();
		hl = sizeof(*ip6);
		if (ip6->nexthdr == IPPROTO_TCP) {
			struct tcphdr *th = (void *)(ip6 + 1);
			if ((void *)(th + 1) > data_end)
				return to_kernel();
			hl += th->doff * 4;
		} else {
			hl += sizeof(struct udphdr);
		}
	} else {
		return to_kernel();
	}
	/* What the pod's interface must take: one packet, or each segment of a GRO packet.
	 * (The barriers keep clang from merging the three context loads into one with a
	 * computed offset, which the verifier refuses.) */
	__u32 segs = skb->gso_segs, gso = skb->gso_size, len = skb->len;
	asm volatile("" : "+r"(segs), "+r"(gso), "+r"(len));
	seg = segs > 1 ? hl + gso : len - sizeof(*eth);
	if (be->mtu && seg > be->mtu) {
		count(E_FWD_TOO_BIG);
		return TC_ACT_OK;
	}

	u32 m0 = be->macs[0], m1 = be->macs[1], m2 = be->macs[2], ifindex = be->peer_ifindex;
	if (eth->h_proto == ETH_P_IP_BE) {
		struct iphdr *ip4 = (void *)(eth + 1);
		if ((void *)(ip4 + 1) > data_end)
			return to_kernel();
		__u16 *w = (__u16 *)&ip4->ttl; /* ttl and protocol: one checksum word */
		__u16 before = *w;
		ip4->ttl--;
		edge_csum_apply(&ip4->check, (__u64)(__u16)~before + *w);
	} else {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end)
			return to_kernel();
		ip6->hop_limit--;
	}
	((u32 *)data)[0] = m0;
	((u32 *)data)[1] = m1;
	((u32 *)data)[2] = m2;
	count(E_FWD_PEER);
	return bpf_redirect_peer(ifindex, 0);
}

static __always_inline int refuse(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct ethhdr e;
	struct tcphdr syn, *tcp;
	__u8 flags;
	__u32 len;
	int rc;

	if ((void *)(eth + 1) > data_end)
		goto fail;
	e = *eth;
	if (eth->h_proto == ETH_P_IP_BE) {
		struct iphdr *ip4 = (void *)(eth + 1);
		if ((void *)(ip4 + 1) > data_end || ip4->protocol != IPPROTO_TCP || ip4->ihl < 5)
			goto fail;
		tcp = (void *)ip4 + ip4->ihl * 4;
		if ((void *)(tcp + 1) > data_end)
			goto fail;
		flags = ((__u8 *)tcp)[TCP_FLAGS_OFF];
		if ((flags & (F_SYN | F_ACK | F_RST)) != F_SYN)
			goto fail; /* XDP marks only SYNs: never reset anything else */
		len = bpf_ntohs(ip4->tot_len) - ip4->ihl * 4 - tcp->doff * 4 + !!(flags & F_FIN);
		syn = *tcp;
		rc = reset4(skb, &e, ip4->saddr, ip4->daddr, &syn, len);
	} else if (eth->h_proto == ETH_P_IPV6_BE) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		struct ipv6hdr i6;
		if ((void *)(ip6 + 1) > data_end || ip6->nexthdr != IPPROTO_TCP)
			goto fail;
		tcp = (void *)(ip6 + 1);
		if ((void *)(tcp + 1) > data_end)
			goto fail;
		flags = ((__u8 *)tcp)[TCP_FLAGS_OFF];
		if ((flags & (F_SYN | F_ACK | F_RST)) != F_SYN)
			goto fail;
		len = bpf_ntohs(ip6->payload_len) - tcp->doff * 4 + !!(flags & F_FIN);
		syn = *tcp;
		i6 = *ip6;
		rc = reset6(skb, &e, &i6, &syn, len);
	} else {
		goto fail;
	}
	if (rc < 0)
		goto fail;
	return bpf_redirect(skb->ifindex, 0);
fail:
	/* Refused all the same: the client's SYN is retried, and decided again. */
	count(E_RST_FAIL);
	return TC_ACT_SHOT;
}

int edge_ingress(struct __sk_buff *skb)
{
	struct edge_meta *m = (void *)(long)skb->data_meta;

	if ((void *)(m + 1) > (void *)(long)skb->data)
		return TC_ACT_OK;
	__u32 what = m->what, arg = m->arg;
	if (what == EDGE_META_PEER)
		return into_pod(skb, arg);
	if (what == EDGE_META_REFUSE)
		return refuse(skb);
	return TC_ACT_OK;
}
