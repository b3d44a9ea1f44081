// Package allocator hands out LoadBalancer IPs from kube-vip-cloud-provider's
// address pools, so an operator can move between the two without
// re-addressing anything: it reads the same ConfigMap (kubevip in
// kube-system), writes what kube-vip-cloud-provider writes on a Service
// (kube-vip.io/loadbalancerIPs, the label implementation=kube-vip that
// kube-vip-cloud-provider lists Services in use by, and
// kube-vip.io/serviceInterface when interface-<scope> is set), and treats
// every address it writes (and more) as in use.
//
// # Pools
//
// A Service's pool is its namespace's (cidr-<ns>, else range-<ns>), else the
// global one (cidr-global, else range-global). Addresses are searched in
// address order (search-order=desc: from the top), IPv4 addresses ending in
// .0 or .255 are never handed out, and skip-end-ips-in-cidr=true drops the
// first and last address of every IPv4 CIDR. ipFamilyPolicy and ipFamilies
// decide the families (see Families). With allow-share-<ns> (or
// allow-share-global) a Service may get an IPv4 address that Services of its
// own namespace already carry, when no port numbers overlap. A bad value is
// reported (log and a Warning Event on the ConfigMap, naming key and value)
// and only its pools stop working.
//
// An address is in use when any Service, of any class or type, carries it
// (annotation, spec.loadBalancerIP or status), or when it is claimed. A
// full pool is reported once per Service (Warning AllocationFailed) while it
// lasts; the Service gets an address when one is freed.
//
// # Where it differs from kube-vip-cloud-provider, and why
//
//   - range-<ns> wins over cidr-global (kube-vip-cloud-provider tries
//     cidr-<ns>, cidr-global, range-<ns>, range-global): its README says a
//     namespace takes its own pool.
//   - In use means carried by any Service of any namespace (it lists only
//     Services labelled implementation=kube-vip, and only the namespace's
//     own for a namespace pool) or claimed.
//   - Sharing stays within a namespace and picks the lowest fitting address
//     (it shares across namespaces from the global pool, in map order).
//   - spec.loadBalancerIP (deprecated) is not written, nor the
//     load-balancer-cleanup finalizer; the ConfigMap is never created;
//     0.0.0.0/32 (DHCP) is refused; skip-end-ips-in-cidr applies to each
//     CIDR as listed (it applies to the merged set's prefixes); spaces
//     around list items are allowed; bad values are reported, not
//     ignored.
//
// # No address twice, also across a failover
//
// Run runs on one elected node, but the node that lost the election may
// still be writing for a moment while the new one starts, each with a cache
// that lags. Caches are therefore never trusted to say an address is free.
// The API server decides, through one claim Lease per address handed out
// (egressvip.alloc.<address> in the daemon's namespace, which namespace
// admins cannot write), naming the namespace it belongs to:
//
//  1. An address goes to a Service only after its claim was created
//     (create fails if the claim exists: one creator wins, whatever the
//     caches say) or, to share it in the claim's namespace, updated with
//     the resourceVersion read (fails if the claim changed).
//  2. The Service is then written with its own resourceVersion as
//     precondition, within WriteTimeout of the claim: of two allocators
//     planning one Service, only one writes it.
//  3. A claim is deleted only (a) by its creator when that Service write
//     certainly failed (Conflict, NotFound), with uid and resourceVersion
//     preconditions, or (b) after it has been seen unchanged and orphaned
//     for ClaimGrace (longer than any write after its last update can take)
//     and a consistent list shows no Service of its namespace carrying the
//     address, again with a resourceVersion precondition.
//  4. Hence while any Service carries an address through an allocator's
//     write, that address's claim exists and names the Service's namespace:
//     no allocator can give it to another namespace, nor, without sharing,
//     to another Service.
//
// A user can still write any address on any Service; the nodes' admission
// rules (pkg/desired) decide such conflicts. The planner is deterministic
// (oldest Service first, lowest free address first) and works on the cache
// plus the writes of its own that the cache does not show yet; the writes
// of one pass run concurrently, so 50 new Services cost two round trips,
// not a hundred.
package allocator
