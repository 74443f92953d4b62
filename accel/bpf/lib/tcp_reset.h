/* A TCP reset answering a SYN, built from the SYN's own skb (tc programs): addresses,
 * ports and MACs swapped, RST|ACK, ack = seq + 1 + its payload (RFC 9293: a segment
 * without ACK is answered <SEQ=0><ACK=SEG.SEQ+SEG.LEN><RST,ACK>, the SYN counting as
 * one), no options or payload, checksums computed afresh. The caller sends it back
 * where the SYN came from (bpf_redirect to the ingress interface's egress), as the
 * destination's own TCP would answer a closed port. Used by policy_tc.c (a denied SYN
 * into a pod) and edge_lb.c (a SYN over an edge VIP's connection limit).
 * Map-free: bcc rewrites map calls only in a program's own file. */
#ifndef ACCEL_TCP_RESET_H
#define ACCEL_TCP_RESET_H

#include "common.h"
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>

#define TCP_FLAGS_OFF 13 /* byte of the TCP header holding FIN..CWR */
#define F_FIN 0x01
#define F_SYN 0x02
#define F_RST 0x04
#define F_ACK 0x10

/* The TCP checksum's pseudo-header followed by the (option-less) header. */
struct csum4 {
	__u32 saddr, daddr;
	__u8 zero, proto;
	__u16 len;
	struct tcphdr tcp;
};

struct csum6 {
	struct in6_addr saddr, daddr;
	__u32 len;
	__u8 zero[3];
	__u8 proto;
	struct tcphdr tcp;
};

/* The packet becomes exactly these headers (no options, no payload). */
static __always_inline int rst_store(struct __sk_buff *skb, struct ethhdr *eth, void *ip,
				 __u32 iplen, struct tcphdr *tcp)
{
	if (bpf_skb_change_tail(skb, sizeof(*eth) + iplen + sizeof(*tcp), 0) < 0 ||
	    bpf_skb_store_bytes(skb, 0, eth, sizeof(*eth), BPF_F_RECOMPUTE_CSUM) < 0 ||
	    bpf_skb_store_bytes(skb, sizeof(*eth), ip, iplen, BPF_F_RECOMPUTE_CSUM) < 0 ||
	    bpf_skb_store_bytes(skb, sizeof(*eth) + iplen, tcp, sizeof(*tcp),
				BPF_F_RECOMPUTE_CSUM) < 0)
		return -1;
	return 0;
}

static __always_inline __u16 rst_fold(__s64 sum)
{
	__u32 s = (__u32)sum;

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* The reset's TCP header for a SYN with sequence number `seq` and `len` payload bytes. */
static __always_inline void rst_tcp(struct tcphdr *t, __u16 sport, __u16 dport, __u32 seq,
				    __u32 len)
{
	t->source = dport;
	t->dest = sport;
	t->seq = 0;
	t->ack_seq = bpf_htonl(seq + 1 + len);
	t->doff = 5;
	t->rst = 1;
	t->ack = 1;
}

static __always_inline int reset4(struct __sk_buff *skb, struct ethhdr *eth, __u32 saddr,
				  __u32 daddr, struct tcphdr *syn, __u32 len)
{
	struct ethhdr re = {};
	struct iphdr rip = {};
	struct tcphdr rt = {};
	struct csum4 c = {};

	__builtin_memcpy(re.h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(re.h_source, eth->h_dest, ETH_ALEN);
	re.h_proto = bpf_htons(ETH_P_IP);
	rip.version = 4;
	rip.ihl = 5;
	rip.tot_len = bpf_htons(sizeof(rip) + sizeof(rt));
	rip.frag_off = bpf_htons(0x4000); /* DF */
	rip.ttl = 64;
	rip.protocol = IPPROTO_TCP;
	rip.saddr = daddr;
	rip.daddr = saddr;
	rip.check = rst_fold(bpf_csum_diff(NULL, 0, (void *)&rip, sizeof(rip), 0));
	rst_tcp(&rt, syn->source, syn->dest, bpf_ntohl(syn->seq), len);
	c.saddr = daddr;
	c.daddr = saddr;
	c.proto = IPPROTO_TCP;
	c.len = bpf_htons(sizeof(c.tcp));
	c.tcp = rt;
	rt.check = rst_fold(bpf_csum_diff(NULL, 0, (void *)&c, sizeof(c), 0));
	return rst_store(skb, &re, &rip, sizeof(rip), &rt);
}

static __always_inline int reset6(struct __sk_buff *skb, struct ethhdr *eth,
				  struct ipv6hdr *ip6, struct tcphdr *syn, __u32 len)
{
	struct ethhdr re = {};
	struct ipv6hdr rip = {};
	struct tcphdr rt = {};
	struct csum6 c = {};

	__builtin_memcpy(re.h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(re.h_source, eth->h_dest, ETH_ALEN);
	re.h_proto = bpf_htons(ETH_P_IPV6);
	rip.version = 6;
	rip.payload_len = bpf_htons(sizeof(rt));
	rip.nexthdr = IPPROTO_TCP;
	rip.hop_limit = 64;
	rip.saddr = ip6->daddr;
	rip.daddr = ip6->saddr;
	rst_tcp(&rt, syn->source, syn->dest, bpf_ntohl(syn->seq), len);
	c.saddr = ip6->daddr;
	c.daddr = ip6->saddr;
	c.len = bpf_htonl(sizeof(c.tcp));
	c.proto = IPPROTO_TCP;
	c.tcp = rt;
	rt.check = rst_fold(bpf_csum_diff(NULL, 0, (void *)&c, sizeof(c), 0));
	return rst_store(skb, &re, &rip, sizeof(rip), &rt);
}


/* The SYN in `skb` (a frame starting with its Ethernet header) turned into its reset, parsed
 * afresh from the frame: 0, or -1 when it is no plain TCP SYN (nothing else is ever reset)
 * or the skb could not be rewritten. */
static __always_inline int tcp_reset_syn(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct ethhdr e;
	struct tcphdr syn, *tcp;
	__u8 flags;
	__u32 len;

	if ((void *)(eth + 1) > data_end)
		return -1;
	e = *eth;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip4 = (void *)(eth + 1);
		if ((void *)(ip4 + 1) > data_end || ip4->protocol != IPPROTO_TCP || ip4->ihl < 5)
			return -1;
		tcp = (void *)ip4 + ip4->ihl * 4;
		if ((void *)(tcp + 1) > data_end)
			return -1;
		flags = ((__u8 *)tcp)[TCP_FLAGS_OFF];
		if ((flags & (F_SYN | F_ACK | F_RST)) != F_SYN)
			return -1;
		len = bpf_ntohs(ip4->tot_len) - ip4->ihl * 4 - tcp->doff * 4 + !!(flags & F_FIN);
		syn = *tcp;
		return reset4(skb, &e, ip4->saddr, ip4->daddr, &syn, len);
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		struct ipv6hdr i6;
		if ((void *)(ip6 + 1) > data_end || ip6->nexthdr != IPPROTO_TCP)
			return -1;
		tcp = (void *)(ip6 + 1);
		if ((void *)(tcp + 1) > data_end)
			return -1;
		flags = ((__u8 *)tcp)[TCP_FLAGS_OFF];
		if ((flags & (F_SYN | F_ACK | F_RST)) != F_SYN)
			return -1;
		len = bpf_ntohs(ip6->payload_len) - tcp->doff * 4 + !!(flags & F_FIN);
		syn = *tcp;
		i6 = *ip6;
		return reset6(skb, &e, &i6, &syn, len);
	}
	return -1;
}

#endif /* ACCEL_TCP_RESET_H */
