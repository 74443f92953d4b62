/* The edge balancer: keys, values and maps shared by edge_lb.c (client ->
 * VIP, DNAT to a backend) and edge_tc.c (backend -> client, source back to the
 * VIP). Types, map declarations and map-free helpers only: bcc rewrites map
 * calls in a program's own .c file, never here.
 *
 * Sizes are -D switches from accel/datapath/edge.py. Every map is pinned under
 * ACCEL_PIN_DIR with an edge_ prefix, so `accel stats` reads them without the
 * agent and a restarted agent keeps the connection table.
 */
#ifndef ACCEL_EDGE_H
#define ACCEL_EDGE_H

#include "common.h"
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#ifndef EDGE_RING_SIZE
#define EDGE_RING_SIZE 65537 /* Maglev lookup-table slots per VIP: a prime */
#endif
#ifndef EDGE_MAX_VIPS
#define EDGE_MAX_VIPS 64
#endif
/* VIPs live in an open-addressed array (a hash map lookup alone costs more
 * than the whole DNAT): EDGE_VIP_SLOTS a power of two, >= 8 x EDGE_MAX_VIPS,
 * a VIP within EDGE_VIP_PROBES slots of its hash (user space places it). */
#ifndef EDGE_VIP_SLOTS
#define EDGE_VIP_SLOTS 512
#endif
#define EDGE_VIP_PROBES 4
#ifndef EDGE_MAX_BACKENDS
#define EDGE_MAX_BACKENDS 4096
#endif
#ifndef EDGE_CONN_MAX
#define EDGE_CONN_MAX 262144
#endif
#ifndef EDGE_SYN_SOURCES_MAX
#define EDGE_SYN_SOURCES_MAX 65536
#endif
#ifndef EDGE_DENY_MAX
#define EDGE_DENY_MAX 16384
#endif
#ifndef EDGE_TX_MAX
#define EDGE_TX_MAX 256
#endif

/* A ring is stored as rows of 16 backend ids: an array map rounds each value
 * to 8 bytes, so one id per value would double the memory. */
#define EDGE_RING_CELLS 16
#define EDGE_RING_ROWS ((EDGE_RING_SIZE + EDGE_RING_CELLS - 1) / EDGE_RING_CELLS)
/* One spare ring: a changed VIP's new ring is written before its entry flips. */
#define EDGE_RING_SLOTS (EDGE_MAX_VIPS + 1)

#define EDGE_NANO 1000000000ULL /* token-bucket unit: one SYN = 1e9 */

#define ETH_P_8021Q_BE 0x0081  /* htons(0x8100) */
#define ETH_P_8021AD_BE 0xA888 /* htons(0x88A8) */
#define ETH_P_IP_BE 0x0008     /* htons(0x0800) */
#define ETH_P_IPV6_BE 0xDD86   /* htons(0x86DD) */
#define IP_FRAG_BE 0xFF3F      /* htons(IP_MF | IP_OFFSET) */

/* VIP of an edge service. Port in network order. */
struct edge_vip_key {
	struct addr16 addr;
	__u16 port;
	__u8 proto;
	__u8 pad;
};

enum edge_vip_state {
	EDGE_VIP_EMPTY = 0, /* never used: a lookup stops here */
	EDGE_VIP_LIVE = 1,
	EDGE_VIP_GONE = 2,  /* deleted: a lookup probes on */
};

/* A slot of edge_vips. User space writes the whole slot; only `ring` changes
 * while a VIP is live, and a 4-byte field is never seen half-written. */
struct edge_vip {
	struct edge_vip_key key;
	__u32 id;   /* slot in edge_vip_stats, stable for the VIP's life */
	__u32 ring; /* slot in edge_rings; flips to a freshly written ring on change */
	__u32 state;
};

/* A ring cell: backend id (0 = no backend) and the dirty bit. A cell is dirty once
 * its slot has pointed at another endpoint since the VIP was created (or since
 * the control plane last proved no flow needs the old one): only TCP on dirty
 * slots, SYNs and UDP consult edge_conns; on a clean slot every flow ever
 * hashed there went to the backend the ring names now. */
#define EDGE_CELL_DIRTY 0x80000000u
#define EDGE_CELL_ID 0x7fffffffu

struct edge_ring_row {
	__u32 b[EDGE_RING_CELLS];
};

enum edge_backend_flags {
	EDGE_BE_VALID = 1,    /* live: established flows keep using it */
	EDGE_BE_REDIRECT = 2, /* neighbour known: rewrite MACs, redirect via edge_tx (XDP)
			       * or to ifindex (tc) */
	/* valid without redirect: rewrite the address and XDP_PASS, the kernel routes it */
	EDGE_BE_FALLBACK = 4, /* routed because its interface would drop redirected frames */
	/* A pod behind a veth whose other end is in another namespace, reached from tc
	 * ingress with bpf_redirect_peer (no kernel forwarding, no bridge), whatever the pod's
	 * GRO/XDP state: at XDP, XDP rewrites the address and marks the frame (struct
	 * edge_meta) for edge_ingress, which sets the MACs and TTL and moves the skb in;
	 * edge_tc_balance does it all at once. Without the mark the kernel routes it, as for
	 * a FALLBACK backend. */
	EDGE_BE_PEER = 8,
};

/* A backend of one VIP (endpoint address:port, the neighbour to reach it). */
struct edge_backend {
	struct addr16 addr;
	__u16 port;    /* network order */
	__u16 tx;      /* slot in edge_tx */
	__u32 macs[3]; /* destination MAC (backend or its gateway), then source MAC (the
			* interface behind edge_tx[tx]): Ethernet header bytes 0-11 */
	__u32 gen;     /* bumped on every reuse of the id: stale flows re-pick */
	__u32 flags;
	__u32 mtu;     /* of the interface behind edge_tx[tx]; 0 unknown. A bigger packet
			* is routed: the kernel fragments it or answers frag-needed */
	__u32 ifindex; /* the backend's interface: the host end of a pod's veth (EDGE_BE_PEER,
			* bpf_redirect_peer), or the redirect target (edge_tx[tx]'s, for tc) */
};

/* What XDP tells edge_ingress (edge_lb.c) about a frame it passes (XDP metadata, in front of the
 * frame; the kernel keeps it on the skb, and GRO merges only frames with equal
 * metadata). */
struct edge_meta {
	__u32 what; /* EDGE_META_* */
	__u32 arg;  /* PEER: backend id; REFUSE: VIP id */
};

#define EDGE_META_PEER 0xED6E0001u   /* into the pod: backend `arg` (EDGE_BE_PEER) */
#define EDGE_META_REFUSE 0xED6E0002u /* a SYN over its VIP's connection limit: reset it */

/* An edge VIP's connection limit (the service's Limits.connections and burst) as a GCRA
 * bucket (lib/gcra.h) for SYNs from outside, by edge_vip.id. The agent writes the whole
 * entry (tat 0: a full bucket) when the limit changes; the program moves tat. Local
 * clients are limited at connect() by their own bucket (lib/qos.h): like Envoy's local
 * rate limit, each entry point enforces the rate by itself. */
struct edge_limit {
	__u64 interval_ns;  /* 1e9 / connections per second; 0: no limit */
	__u64 tolerance_ns; /* burst * interval_ns */
	__u64 tat;
};

/* A flow in the direction it travels. Ports in network order. */
struct edge_flow {
	struct addr16 src;
	struct addr16 dst;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct edge_conn {
	__u32 backend;
	__u32 gen;
};

/* What the reply of a balanced flow must say instead of the backend. */
struct edge_rev {
	struct addr16 vip;
	__u16 vport; /* network order */
	__u16 pad;
	__u32 vip_id;
};

struct edge_deny_key {
	__u32 prefixlen; /* IPv4 is v4-mapped: 96 + its prefix length */
	struct addr16 addr;
};

struct edge_syn_bucket {
	__u64 tokens; /* in 1e-9 SYN */
	__u64 last_ns;
};

struct edge_config {
	__u64 syn_rate;    /* SYNs per second per source; 0 = no limit */
	__u64 syn_cap;     /* burst * EDGE_NANO */
	__u64 syn_fill_ns; /* time to refill an empty bucket: caps elapsed*rate */
	__u32 deny_active; /* deny list not empty: skip the trie walk otherwise */
	__u32 pad;
	/* Prefilter before the trie walk: bit b set when some denied CIDR may hold
	 * an IPv4 source whose first octet is b (deny4) or an IPv6 source whose
	 * second byte is b (deny6; the first is 0x20 for most of the Internet). */
	__u64 deny4[4];
	__u64 deny6[4];
};

struct edge_vip_stats {
	__u64 packets; /* client -> VIP packets forwarded */
	__u64 bytes;
	__u64 new_flows;
	__u64 drop_deny;
	__u64 drop_syn;
	__u64 drop_no_backend;
	__u64 conn_full; /* new flow not recorded (table busy): balanced, but not pinned */
	__u64 reply_packets; /* backend -> client packets given the VIP back */
	__u64 reply_bytes;
	__u64 refused_limit; /* SYNs over the VIP's connection limit, answered with a reset */
};

/* Global per-CPU counters; accel/datapath/edge.py reads names and comments here. */
enum edge_counter {
	E_FWD_ROUTE = 0,         /* packet to a VIP rewritten and passed to the kernel to route */
	E_NEW_FLOW,          /* flow picked a backend from the Maglev ring and was recorded */
	E_REPICK,            /* tracked flow's backend is gone: picked again */
	E_DROP_DENY,         /* source in the deny list */
	E_DROP_SYN,          /* SYN over the source's token bucket */
	E_DROP_NO_BACKEND,   /* VIP without a usable backend */
	E_PASS_FRAGMENT,     /* IP fragment: passed to the kernel untouched */
	E_PASS_MALFORMED,    /* truncated or invalid header: passed to the kernel */
	E_PASS_IPV6_EXT,     /* IPv6 with extension headers: passed untouched */
	E_VLAN_POP_FAIL,     /* could not pop the VLAN tag: passed to the kernel */
	E_CONN_FULL,         /* connection table update failed */
	E_REPLY_REVNAT,      /* reply rewritten back to the VIP (tc) */
	E_FWD_FALLBACK,      /* routed, not redirected: the backend's interface drops XDP frames */
	E_FWD_TOO_BIG,       /* routed, not redirected: bigger than the backend interface's MTU */
	E_FWD_TTL_EXPIRING,  /* routed, not redirected: TTL/hop limit expires here (kernel answers) */
	E_ICMP_REVNAT,       /* ICMP error about a balanced flow given the VIP back (tc) */
	E_FWD_PEER,          /* moved into a pod by tc ingress (bpf_redirect_peer): veth takes no XDP frames */
	E_PEER_KERNEL,       /* marked for a pod but handed to the kernel to route (TTL expiring, too big, backend changed) */
	E_REFUSE_LIMIT,      /* SYN over its VIP's connection limit */
	E_RST_FAIL,          /* a refused SYN could not be marked or turned into a reset: dropped */
	E_REPLY_DIRECT,      /* reply taken from a backend's interface straight out of the interface its route names */
	E_REPLY_KERNEL,      /* reply given the VIP back but left to the kernel: no route, or too big for it */
	E_MAX,
};

/* VIP -> stats slot and ring slot, open addressing by edge_vip_hash(). */
ACCEL_MAP("array", u32, struct edge_vip, edge_vips, EDGE_VIP_SLOTS);
/* Maglev lookup tables, EDGE_RING_ROWS rows per ring slot. */
ACCEL_MAP("array", u32, struct edge_ring_row, edge_rings, EDGE_RING_SLOTS * EDGE_RING_ROWS);
/* Backend id -> address, port and the next hop to reach it. */
ACCEL_MAP("array", u32, struct edge_backend, edge_backends, EDGE_MAX_BACKENDS);
/* Client flow -> backend: established flows keep their backend across ring changes. */
ACCEL_MAP("lru_hash", struct edge_flow, struct edge_conn, edge_conns, EDGE_CONN_MAX);
/* Reply flow (backend -> client) -> the VIP it must come from. */
ACCEL_MAP("lru_hash", struct edge_flow, struct edge_rev, edge_revs, EDGE_CONN_MAX);
/* Ports backends serve on (bit n of word n / 64 for network-order port n; set when a
 * backend is written, never cleared while pinned): edge_tc and edge_reply, which see every
 * packet of their interfaces, look up the reply table only for a source port a backend
 * uses. The host's other traffic pays an array lookup instead of a hash lookup. */
ACCEL_MAP("array", u32, u64, edge_rports, 1024);
/* The edge interface's ifindex (one entry), 0 while the edge is not attached: edge_reply
 * forwards replies itself only while it is. */
ACCEL_MAP("array", u32, u32, edge_uplink, 1);
/* Connection limits by edge_vip.id. */
ACCEL_MAP("array", u32, struct edge_limit, edge_limits, EDGE_MAX_VIPS);
/* Denied source CIDRs (IPv4 v4-mapped). */
ACCEL_MAP_F("lpm_trie", struct edge_deny_key, u32, edge_deny, EDGE_DENY_MAX, BPF_F_NO_PREALLOC);
/* Per-source SYN token buckets. */
ACCEL_MAP("lru_hash", struct addr16, struct edge_syn_bucket, edge_syn, EDGE_SYN_SOURCES_MAX);
/* Guard settings, one entry. */
ACCEL_MAP("array", u32, struct edge_config, edge_config, 1);
/* Per-VIP counters by edge_vip.id. */
ACCEL_MAP("percpu_array", u32, struct edge_vip_stats, edge_vip_stats, EDGE_MAX_VIPS);
/* Global counters by enum edge_counter. */
ACCEL_MAP("percpu_array", u32, u64, edge_counters, E_MAX);

/* Interfaces backends sit behind, by edge_backend.tx (bcc's BPF_DEVMAP cannot pin). */
struct edge_tx_table_t {
	u32 key;
	int leaf;
	u64 (*redirect_map)(int, int);
	u32 max_entries;
};
__attribute__((section("maps/devmap:" ACCEL_PIN(edge_tx))))
struct edge_tx_table_t edge_tx = { .max_entries = EDGE_TX_MAX };

/* ---- map-free helpers ---- */

static __always_inline __u16 edge_csum_fold64(__u64 s)
{
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

/* A 64-bit one's-complement sum as the 32-bit partial sum the checksum helpers take. */
static __always_inline __u32 edge_csum_fold32(__u64 s)
{
	s = (s & 0xffffffff) + (s >> 32);
	return (__u32)((s & 0xffffffff) + (s >> 32));
}

/* A 32-bit one's-complement sum folded to 16 bits, as the kernel's csum_fold before
 * its final inversion. */
static __always_inline __u16 edge_fold16(__u32 x)
{
	x = (x & 0xffff) + (x >> 16);
	return (__u16)((x & 0xffff) + (x >> 16));
}

/* The kernel's csum_add: 32-bit one's-complement addition. */
static __always_inline __u32 edge_csum_add(__u32 a, __u32 b)
{
	__u32 r = a + b;

	return r + (r < b);
}

enum edge_csum_state {
	EDGE_CSUM_UNKNOWN = 0,
	EDGE_CSUM_FULL,    /* the field is a full checksum (CHECKSUM_NONE/UNNECESSARY/COMPLETE) */
	EDGE_CSUM_PARTIAL, /* CHECKSUM_PARTIAL: the field is the pseudo-header's sum */
};

/* Which form an L4 checksum field has, from what bpf_l4_csum_replace(BPF_F_PSEUDO_HDR)
 * made of it when it added `d` (a pseudo-header change): BPF cannot read an skb's
 * ip_summed, and the helper updates the two forms differently (inet_proto_csum_replace_by_diff):
 * a partial sum to fold(f + d), a full checksum to ~fold(~f + d). The two agree only when
 * d is 0 mod 0xffff (2d = 0 and 0xffff is odd): unknown then, and the caller asks the
 * helper again. */
static __always_inline int edge_csum_state(__u16 before, __u16 after, __u32 d)
{
	__u16 partial = edge_fold16(edge_csum_add(before, d));
	__u16 full = ~edge_fold16(edge_csum_add(d, ~(__u32)before));

	if (partial == full)
		return EDGE_CSUM_UNKNOWN;
	if (after == full)
		return EDGE_CSUM_FULL;
	if (after == partial)
		return EDGE_CSUM_PARTIAL;
	return EDGE_CSUM_UNKNOWN;
}

/* RFC 1624 incremental update: HC' = ~(~HC + diff), diff = sum(~old) + sum(new)
 * over 32-bit words. Byte order does not matter as long as all words are read
 * from the packet the same way. */
static __always_inline void edge_csum_apply(__u16 *sum, __u64 diff)
{
	*sum = ~edge_csum_fold64((__u64)(__u16)~*sum + diff);
}

static __always_inline __u64 edge_csum_diff4(__u32 from, __u32 to)
{
	return (__u64)(~from) + to;
}

/* murmur3's finalizer: full avalanche in five operations. */
static __always_inline __u32 edge_mix32(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

/* Ring index input: the client's address and both ports (raw network-order loads). */
static __always_inline __u32 edge_flow_hash(const struct addr16 *src, __u32 ports)
{
	__u32 x = src->w[0] ^ src->w[1] ^ src->w[2];

	return edge_mix32(edge_mix32(src->w[3] ^ ports) ^ x);
}

/* Home slot of a VIP in edge_vips; accel/datapath/edge.py computes the same. */
static __always_inline __u32 edge_vip_hash(const struct edge_vip_key *k)
{
	__u32 x = k->addr.w[0] ^ k->addr.w[1] ^ k->addr.w[2] ^ k->addr.w[3];

	return edge_mix32(x ^ ((__u32)k->port << 8) ^ k->proto) & (EDGE_VIP_SLOTS - 1);
}

#endif /* ACCEL_EDGE_H */
