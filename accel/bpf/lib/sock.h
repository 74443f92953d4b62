/* The socket fast path: which sockets are mesh sockets, which of their
 * connections are redirected (`fastpath: redirect`; the rest stay plain TCP and
 * never enter the sockhash), how they are keyed in the sockhash, and how a
 * sender proves which socket is its peer.
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
	__u32 flags;  /* CONN_F_*: what the end that published it asked for */
	__u64 sk;     /* its kernel socket's address: read (never written) for backpressure */
	/* Written by the peer end when it sent its FIN (lib/flows.h): what it handed this end
	 * socket to socket in all, and its namespace. */
	__u64 handed;
	__u64 handed_netns;
};

/* The client end of a connection decides its fast path (it knows the service it dialed)
 * and publishes the choice; the server end follows it. */
#define CONN_F_REDIRECT 1

/* A socket's fast path, as the service it dialed asks (connect.c). */
enum sock_fastpath {
	FASTPATH_DEFAULT = 0, /* not dialed through a VIP: accel_sock_config decides */
	FASTPATH_REDIRECT = 1,
	FASTPATH_ROUTE = 2,
};

enum sock_mode {
	MODE_UNDECIDED = 0, /* no payload sent yet */
	MODE_REDIRECT = 1,  /* every byte so far went to the peer socket */
	MODE_TCP = 2,       /* a byte went through TCP: stay there, or order breaks */
	MODE_PAUSED = 3,    /* on TCP while the receiver's queue is full: back to redirect
			     * once the receiver has read every byte TCP carried */
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

/* A client socket's connection record, while it is one (lib/flows.h fills it). */
struct flow_sock {
	__u64 start;    /* connect(), boot ns; 0: not recorded */
	__u64 cookie;   /* the socket's cookie: the record's id */
	__u64 netns;    /* the socket's netns cookie */
	__u64 reported; /* last open or report event, boot ns */
	__u32 svc;      /* the service's accel_svc_stats index */
	__u32 flags;    /* FLOW_S_* (lib/flows.h) */
};

/* What meshaccel keeps with a socket, in socket-local storage freed by the kernel
 * with the socket. One element per socket: connect() to a VIP creates it and
 * sock_ops finds it (creating a socket's storage costs about a microsecond,
 * a tenth of what tracking a connection costs in all). */
struct sock_state {
	struct conn_id id;
	__u64 netns;
	__u64 peer_netns;
	__u64 self_sk; /* this socket's kernel address (read, never written) */
	__u64 peer_sk; /* the peer's kernel socket (conn_owner.sk), for the queue bound */
	__u64 redirected; /* bytes this socket handed to its peer: minus what the peer still
			   * queues, what the peer has read (the queue bound grows with it) */
	__u32 mode;
	__u32 tracked;
	__u32 fastpath; /* enum sock_fastpath */
	__u32 pad;
	struct sock_vip vip;
	struct flow_sock flow;
};

/* Settings the agent writes (one entry). */
struct sock_config {
	__u32 default_redirect; /* 1: connections not dialed through a VIP are redirected too */
	__u32 pad;
	__u64 ingress_min; /* redirect queue bound for a receiver that set no SO_RCVBUF and
			    * has read nothing yet */
	__u64 ingress_max; /* the most it grows to as the receiver reads (tcp_rmem[2]) */
};

ACCEL_SOCKHASH(accel_sockhash, struct sock_key, ACCEL_SOCKHASH_MAX);
ACCEL_MAP("hash", struct conn_id, struct conn_owner, accel_conn_ns, ACCEL_SOCKHASH_MAX);
ACCEL_MAP_F("sk_storage", int, struct sock_state, accel_sock_state, 0, BPF_F_NO_PREALLOC);
ACCEL_MAP("array", u32, struct sock_config, accel_sock_config, 1);

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

/* Whether the redirect mode may be used at all: sk_msg must bound what it queues at the
 * peer (redirect.c), which needs kernel structure offsets from BTF (accel.kernel.kbtf.py). */
#if defined(ACCEL_OFF_SK_USER_DATA) && defined(ACCEL_OFF_SK_RCVBUF) && \
	defined(ACCEL_OFF_SK_USERLOCKS) && defined(ACCEL_OFF_PSOCK_MSG_TOT_LEN) && \
	defined(ACCEL_OFF_TP_WRITE_SEQ) && defined(ACCEL_OFF_TP_SND_UNA) && \
	defined(ACCEL_OFF_TP_COPIED_SEQ) && defined(ACCEL_OFF_TP_RCV_NXT)
#define ACCEL_REDIRECT_OK 1
#else
#define ACCEL_REDIRECT_OK 0
#endif

#endif /* ACCEL_SOCK_H */
