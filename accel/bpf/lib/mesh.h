/* Which addresses belong to the mesh: endpoints as /128 and configured CIDRs,
 * in one longest-prefix set. A connection is mesh traffic when its local or
 * remote address is in it; everything else is left to the kernel untouched. */
#ifndef ACCEL_MESH_H
#define ACCEL_MESH_H

#include "common.h"

#ifndef ACCEL_MESH_NETS_MAX
#define ACCEL_MESH_NETS_MAX 131072
#endif

struct mesh_net_key {
	__u32 prefixlen;
	struct addr16 addr;
};

ACCEL_MAP_F("lpm_trie", struct mesh_net_key, u32, accel_mesh_nets, ACCEL_MESH_NETS_MAX,
	    BPF_F_NO_PREALLOC);

#endif /* ACCEL_MESH_H */
