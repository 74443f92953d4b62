/* The XDP edge balancer: keys, values and maps shared by edge_xdp.c (client ->
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

struct edge_vip {
	__u32 id;   /* slot in edge_vip_stats, stable for the VIP's life */
	__u32 ring; /* slot in edge_rings; flips to a freshly written ring on change */
	__u32 flags;
	__u32 pad;
};

struct edge_ring_row {
	__u32 b[EDGE_RING_CELLS]; /* backend ids; 0 = no backend */
};

enum edge_backend_flags {
	EDGE_BE_VALID = 1,    /* live: established flows keep using it */
	EDGE_BE_REDIRECT = 2, /* neighbour known: rewrite MACs, redirect via edge_tx */
	/* valid without redirect: rewrite the address and XDP_PASS, the kernel routes it */
};

/* A backend of one VIP (endpoint address:port, the neighbour to reach it). */
struct edge_backend {
	struct addr16 addr;
	__u16 port;   /* network order */
	__u16 tx;     /* slot in edge_tx */
	__u8 dmac[6]; /* the backend's (or its gateway's) MAC */
	__u8 smac[6]; /* MAC of the interface behind edge_tx[tx] */
	__u32 gen;    /* bumped on every reuse of the id: stale flows re-pick */
	__u32 flags;
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
};

/* Global per-CPU counters; accel/datapath/edge.py reads names and comments here. */
enum edge_counter {
	E_FWD_REDIRECT = 0,  /* packet to a VIP redirected to its backend's interface */
	E_FWD_ROUTE,         /* packet to a VIP rewritten and passed to the kernel to route */
	E_NEW_FLOW,          /* flow picked a backend from the Maglev ring */
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
	E_MAX,
};

/* VIP -> stats slot and ring slot. */
ACCEL_MAP("hash", struct edge_vip_key, struct edge_vip, edge_vips, EDGE_MAX_VIPS);
/* Maglev lookup tables, EDGE_RING_ROWS rows per ring slot. */
ACCEL_MAP("array", u32, struct edge_ring_row, edge_rings, EDGE_RING_SLOTS * EDGE_RING_ROWS);
/* Backend id -> address, port and the next hop to reach it. */
ACCEL_MAP("array", u32, struct edge_backend, edge_backends, EDGE_MAX_BACKENDS);
/* Client flow -> backend: established flows keep their backend across ring changes. */
ACCEL_MAP("lru_hash", struct edge_flow, struct edge_conn, edge_conns, EDGE_CONN_MAX);
/* Reply flow (backend -> client) -> the VIP it must come from. */
ACCEL_MAP("lru_hash", struct edge_flow, struct edge_rev, edge_revs, EDGE_CONN_MAX);
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

static __always_inline __u32 edge_rol32(__u32 w, int s)
{
	return (w << s) | (w >> (32 - s));
}

/* Bob Jenkins' lookup3 over the source address and ports: the ring index. */
static __always_inline __u32 edge_flow_hash(const struct addr16 *src, __u32 ports)
{
	__u32 a, b, c;

	a = b = c = 0xdeadbeef + 24 + 0x9e3779b9;
	a += src->w[0];
	b += src->w[1];
	c += src->w[2];
	a -= c; a ^= edge_rol32(c, 4);  c += b;
	b -= a; b ^= edge_rol32(a, 6);  a += c;
	c -= b; c ^= edge_rol32(b, 8);  b += a;
	a -= c; a ^= edge_rol32(c, 16); c += b;
	b -= a; b ^= edge_rol32(a, 19); a += c;
	c -= b; c ^= edge_rol32(b, 4);  b += a;
	a += src->w[3];
	b += ports;
	c ^= b; c -= edge_rol32(b, 14);
	a ^= c; a -= edge_rol32(c, 11);
	b ^= a; b -= edge_rol32(a, 25);
	c ^= b; c -= edge_rol32(b, 16);
	a ^= c; a -= edge_rol32(c, 4);
	b ^= a; b -= edge_rol32(a, 14);
	c ^= b; c -= edge_rol32(b, 24);
	return c;
}

#endif /* ACCEL_EDGE_H */
