/* Global per-CPU counters, one slot per event. User space sums the CPUs and
 * reads the names from this enum (accel/datapath/counters.py parses it). */
#ifndef ACCEL_COUNTERS_H
#define ACCEL_COUNTERS_H

#include "common.h"

enum accel_counter {
	C_SOCKHASH_INSERTS = 0,       /* mesh socket added to the sockhash */
	C_SOCKHASH_INSERT_FAILURES,   /* could not add (map full, no storage): stays on TCP */
	C_SOCKS_NON_MESH,             /* established socket that is not mesh traffic: untouched */
	C_SOCKS_CLOSED,               /* tracked socket closed, its pairing entry removed */
	C_MSG_REDIRECTS,              /* message handed to the peer socket */
	C_MSG_PASSTHROUGH,            /* message sent through TCP */
	C_REDIRECTED_BYTES,           /* bytes handed over by redirect */
	C_MSG_PEER_UNKNOWN,           /* first message found no verified peer: connection on TCP */
	C_MSG_REDIRECT_MISSES,        /* redirect failed (peer gone): message sent through TCP */
	C_CONNECT_BALANCED,           /* connect() to a VIP rewritten to an endpoint */
	C_CONNECT_NO_BACKEND,         /* connect() to a VIP with no usable endpoint */
	C_CONNECT_FAMILY_MISMATCH,    /* IPv4 socket to a VIP whose endpoint is IPv6 */
	C_UDP_BALANCED,               /* UDP sendmsg to a VIP rewritten */
	C_PEERNAME_VIP,               /* getpeername answered with the VIP */
	C_REVNAT_FAILURES,            /* could not record the VIP for getpeername/recvmsg */
	C_POD_REDIRECTS,              /* packet handed from one local mesh pod to another, bridge skipped */
	C_POD_FOREIGN_SOURCE,         /* packet to a local pod whose source is not the sender's own address: left to the bridge */
	C_POD_UNTRACKED,              /* pod-to-pod packet of a connection not seen starting pod to pod (host NAT, older): left to the kernel */
	C_SOCKS_ROUTED,               /* mesh socket kept on TCP: its connection's fastpath is route */
	C_MSG_BACKPRESSURE,           /* receiver's queue at its bound: the connection paused on TCP, whose flow control holds the sender */
	C_MSG_RESUMED,                /* connection paused on TCP by backpressure handed to the peer socket again */
	C_POLICY_CONNECT_DEFERRED,    /* connect() to a policed destination from a namespace with no known identity: decided at its SYN, by address */
	C_POLICY_RST_FAILURES,        /* a denied SYN could not be turned into a reset: dropped (the client retries, and is denied again) */
	C_POLICY_UNPARSED,            /* IPv6 packet with extension headers to a policed pod: dropped (a SYN could hide behind them) */
	C_MSG_QOS_LATE,               /* redirected connection whose service got a bandwidth limit: moved to TCP, paced at its next RTT sample */
	C_MAX,
};

ACCEL_MAP("percpu_array", u32, u64, accel_counters, C_MAX);

/* bcc rewrites map calls only in a program's own file, never in a header: each
 * program defines count()/count_add() over accel_counters itself. */

#endif /* ACCEL_COUNTERS_H */
