/* Shared by every meshaccel program: address layout, pinning, counters.
 *
 * Every map is pinned under ACCEL_PIN_DIR (a -D switch from the loader), so the
 * programs of one agent share maps by path, bpftool finds them, and a restarted
 * agent adopts them. Sizes come from -D switches too; the defaults below are
 * for a cluster of 10k services / 100k endpoints.
 */
#ifndef ACCEL_COMMON_H
#define ACCEL_COMMON_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <linux/socket.h>

#ifndef ACCEL_PIN_DIR
#define ACCEL_PIN_DIR "/sys/fs/bpf/accel"
#endif
#define ACCEL_PIN(name) ACCEL_PIN_DIR "/" #name

/* A pinned map of any bcc-known type, created on first load and reused after. */
#define ACCEL_MAP(type, key, val, name, max) \
	BPF_TABLE_PINNED7(type, key, val, name, max, ACCEL_PIN(name), 0)
#define ACCEL_MAP_F(type, key, val, name, max, flags) \
	BPF_TABLE_PINNED7(type, key, val, name, max, ACCEL_PIN(name), flags)

/* bcc's BPF_SOCKHASH cannot be pinned; this is the same table with a pin path. */
#define ACCEL_SOCKHASH(_name, _key_type, _max_entries)                 \
	struct _name##_table_t {                                       \
		_key_type key;                                         \
		int leaf;                                              \
		int (*update)(_key_type *, int *);                     \
		int (*delete)(_key_type *);                            \
		int (*sock_hash_update)(void *, void *, u64);          \
		int (*msg_redirect_hash)(void *, void *, u64);         \
		int (*sk_redirect_hash)(void *, void *, u64);          \
		u32 max_entries;                                       \
	};                                                             \
	__attribute__((section("maps/sockhash:" ACCEL_PIN(_name))))   \
	struct _name##_table_t _name = { .max_entries = (_max_entries) }; \
	BPF_ANNOTATE_KV_PAIR(_name, _key_type, int)

/* A ctx field read the compiler may not move or merge (see read_conn_id). */
#define CTX_READ(field) (*(volatile __u32 *)&(field))

/* Every address is 16 bytes: IPv4 is stored v4-mapped (::ffff:a.b.c.d), so an
 * AF_INET6 socket dialing ::ffff:10.0.0.1 and an AF_INET socket on 10.0.0.1
 * produce the same key. Words are in network order. */
struct addr16 {
	__u32 w[4];
};

static __always_inline void addr_from4(struct addr16 *a, __u32 ip4_be)
{
	a->w[0] = 0;
	a->w[1] = 0;
	a->w[2] = bpf_htonl(0x0000ffff);
	a->w[3] = ip4_be;
}

static __always_inline int addr_is_v4(const struct addr16 *a)
{
	return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == bpf_htonl(0x0000ffff);
}

static __always_inline int addr_eq(const struct addr16 *a, const struct addr16 *b)
{
	return a->w[0] == b->w[0] && a->w[1] == b->w[1] && a->w[2] == b->w[2] &&
	       a->w[3] == b->w[3];
}

/* 127.0.0.0/8 or ::1: the peer of such a connection lives in the sender's netns. */
static __always_inline int addr_is_loopback(const struct addr16 *a)
{
	if (addr_is_v4(a))
		return (bpf_ntohl(a->w[3]) >> 24) == 127;
	return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == 0 && a->w[3] == bpf_htonl(1);
}

#endif /* ACCEL_COMMON_H */
