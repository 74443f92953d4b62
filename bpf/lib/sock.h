/* The socket fast path: which sockets are mesh sockets, how they are keyed in
 * the sockhash, and how a sender proves which socket is its peer.
 *
 * Pairing is exact. A socket's key holds its own network namespace (netns
 * cookie), its addresses and ports, and the two sequence numbers its
 * handshake settled (snd/rcv ISN + 1). Two namespaces can hold sockets with
 * the same 4-tuple (every pod has 127.0.0.1), so a sender never guesses the
 * peer's namespace from addresses: the peer itself published "connection C
 * lives in netns N" in accel_conn_ns when it was established, and the sender
 * looks that up by the reversed identity of its own connection. The sender
 * also checks that the entry of its own identity names its own namespace; any
 * doubt (no entry, two namespaces claiming one identity) keeps the socket on
 * TCP.
 */
#ifndef ACCEL_SOCK_H
#define ACCEL_SOCK_H

#include "common.h"
#include "mesh.h"

#ifndef ACCEL_SOCKHASH_MAX
#define ACCEL_SOCKHASH_MAX 131072
#endif

/* One end of a TCP connection as seen by its own socket. Ports in host order. */
struct conn_id {
	struct addr16 local;
	struct addr16 remote;
	__u32 snd_isn; /* first sequence number after our SYN */
	__u32 rcv_isn; /* first sequence number after the peer's SYN */
	__u16 lport;
	__u16 rport;
	__u32 pad;
};

struct sock_key {
	struct conn_id id;
	__u64 netns;
};

/* Value of accel_conn_ns: the namespace that owns a connection end, or 0 when
 * two namespaces claimed the same identity (ambiguous: never redirect). */
struct conn_owner {
	__u64 netns;
	__u32 claims; /* sockets that published this identity */
	__u32 pad;
};

enum sock_mode {
	MODE_UNDECIDED = 0, /* no payload sent yet */
	MODE_REDIRECT = 1,  /* every byte so far went to the peer socket */
	MODE_TCP = 2,       /* a byte went through TCP: stay there, or order breaks */
};

/* The VIP a connected socket dialed (connect.c): right for the socket's whole
 * life, where an LRU entry could age out under connection churn while the
 * connection lives on. */
struct sock_vip {
	struct addr16 backend;
	struct addr16 vip;
	__u16 backend_port; /* host order */
	__u16 vip_port;
	__u32 set;
};

/* What meshaccel keeps with a socket, in socket-local storage freed by the kernel
 * with the socket. One element per socket: connect() to a VIP creates it and
 * sock_ops finds it (creating a socket's storage costs about a microsecond,
 * a tenth of what tracking a connection costs in all). */
struct sock_state {
	struct conn_id id;
	__u64 netns;
	__u64 peer_netns;
	__u32 mode;
	__u32 tracked;
	struct sock_vip vip;
};

ACCEL_SOCKHASH(accel_sockhash, struct sock_key, ACCEL_SOCKHASH_MAX);
ACCEL_MAP("hash", struct conn_id, struct conn_owner, accel_conn_ns, ACCEL_SOCKHASH_MAX);
ACCEL_MAP_F("sk_storage", int, struct sock_state, accel_sock_state, 0, BPF_F_NO_PREALLOC);

static __always_inline void conn_id_reverse(struct conn_id *out, const struct conn_id *in)
{
	out->local = in->remote;
	out->remote = in->local;
	out->snd_isn = in->rcv_isn;
	out->rcv_isn = in->snd_isn;
	out->lport = in->rport;
	out->rport = in->lport;
	out->pad = 0;
}

#endif /* ACCEL_SOCK_H */
