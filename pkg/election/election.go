// Package election decides which node holds each LoadBalancer IP, at an API
// cost that does not grow with the number of Services:
//
//   - Node liveness: every daemon renews one Lease of its own, its
//     heartbeat (egressvip.node.<node> in the daemon's namespace). It is
//     the only periodic write. It publishes what other nodes need to know
//     of it: its protocol version, whether it stands, where steered
//     traffic reaches it, its serviceInterface addresses.
//   - Address ownership: each LoadBalancer IP has a Lease in the daemon's
//     namespace (egressvip.addr.<address>) naming the node that holds it.
//     Addresses, not Services, are elected: Services that share an address
//     (a TCP and a UDP Service of one DNS server) are served by the one
//     node that holds it. These Leases live where a namespace admin cannot
//     write, so they also record which namespace claimed the address first.
//   - Service Leases (egressvip-<service> in the Service's namespace) name
//     the node serving each Service, for people (kubectl get lease) and for
//     daemons of earlier releases during a rolling upgrade, which elect per
//     Service: a node binds an address only while no such Lease of the
//     Services claiming it names another valid holder.
//
// Ownership Leases are written when ownership changes (acquisition,
// release), never renewed: a holding is valid while its holder's heartbeat
// is. Optimistic concurrency on resourceVersion decides races. Candidates
// learn about holders and heartbeats from informers, not by polling. What
// to acquire or release is decided by the pure planner (pkg/plan) from a
// model.ElectionView; this package only keeps the view and performs the
// writes. Nothing here touches the kernel.
package election

import (
	"cmp"
	"fmt"
	"hash/fnv"
	"net/netip"
	"slices"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/types"
)

// LeasePrefix starts the name of every Service Lease: egressvip-<service
// name>, in the Service's namespace.
const LeasePrefix = "egressvip-"

// HeartbeatPrefix starts the name of every node's heartbeat Lease. The dot
// keeps it apart from every Service Lease name: Service names are DNS
// labels and have no dots.
const HeartbeatPrefix = "egressvip.node."

// AddressPrefix starts the name of every address Lease.
const AddressPrefix = "egressvip.addr."

// ProtocolVersion is the election protocol of this release: address
// Leases decide. The heartbeat release published none (0).
const ProtocolVersion = 2

// LegacyHoldSeconds is the LeaseDurationSeconds written on Service Leases.
// Daemons of the release before heartbeats (one client-go elector per
// Service) take a Lease over once it has not changed for that long; current
// daemons ignore it (a holding is valid while its holder's heartbeat is).
// An hour keeps such a daemon, during a rolling upgrade or a rollback, off
// the Services current daemons hold, without renewals.
const LegacyHoldSeconds = 3600

// Labels and annotations on the Leases egressvip writes; the informers
// select on the labels.
const (
	LabelManagedBy = "app.kubernetes.io/managed-by"
	ManagedBy      = "egressvip"
	LabelRole      = "egressvip.io/role"
	RoleHeartbeat  = "heartbeat"
	RoleService    = "service"
	RoleGlobal     = "global"
	RoleAddress    = "address"
	// AnnotationValidWhile names the heartbeat Lease that keeps a holding
	// valid, for whoever reads it with kubectl.
	AnnotationValidWhile = "egressvip.io/valid-while"
	// AnnotationDraining on a heartbeat says the node is shutting down:
	// its holdings stay valid until it releases them, but it is no
	// candidate for anything new.
	AnnotationDraining = "egressvip.io/draining"
	// AnnotationAddresses on a heartbeat lists the node's own addresses on
	// its serviceInterface, which may be missing from its Node's status:
	// no node binds them as a LoadBalancer IP.
	AnnotationAddresses = "egressvip.io/interface-addresses"
	// AnnotationNode on a heartbeat is the node's published state (JSON,
	// see nodeRecord): protocol version, standing, steering next hops,
	// VXLAN endpoint.
	AnnotationNode = "egressvip.io/node"
	// AnnotationAddress on an address Lease is the address it elects.
	AnnotationAddress = "egressvip.io/address"
	// AnnotationClaimedBy on an address Lease is the namespace the holder
	// serves it for.
	AnnotationClaimedBy = "egressvip.io/claimed-by"
	// AnnotationAddressLeases on a Service Lease names the address Leases
	// that decide who serves the Service.
	AnnotationAddressLeases = "egressvip.io/address-leases"
)

// LeaseName is the Lease that records the node serving a Service.
func LeaseName(service string) string { return LeasePrefix + service }

// HeartbeatName is the heartbeat Lease of a node.
func HeartbeatName(node string) string { return HeartbeatPrefix + node }

// AddressLeaseName is the Lease that elects the node holding addr. IPv6
// addresses are written out in full with dashes, so every name is a valid
// DNS subdomain that starts and ends with a hex digit.
func AddressLeaseName(addr netip.Addr) string {
	addr = addr.Unmap()
	if addr.Is4() {
		return AddressPrefix + addr.String()
	}
	return AddressPrefix + strings.ReplaceAll(addr.StringExpanded(), ":", "-")
}

// AddressOfLease parses the address out of an address Lease name.
func AddressOfLease(name string) (netip.Addr, bool) {
	rest, ok := strings.CutPrefix(name, AddressPrefix)
	if !ok {
		return netip.Addr{}, false
	}
	if a, err := netip.ParseAddr(rest); err == nil && a.Is4() {
		return a, true
	}
	a, err := netip.ParseAddr(strings.ReplaceAll(rest, "-", ":"))
	if err != nil || !a.Is6() {
		return netip.Addr{}, false
	}
	return a, true
}

// Timing is the lease timing; Validate it before use.
type Timing struct {
	// LeaseDuration is how long a heartbeat stays valid after the last
	// renewal other nodes saw.
	LeaseDuration time.Duration
	// RenewDeadline is how long after its last successful renewal a node
	// keeps acting on what another node could take over.
	RenewDeadline time.Duration
	// RetryPeriod is the heartbeat interval, and the delay between two
	// candidates' turns for a free address.
	RetryPeriod time.Duration
}

// Validate applies client-go's rule LeaseDuration > RenewDeadline > 1.2*RetryPeriod.
func (t Timing) Validate() error {
	if t.RetryPeriod <= 0 {
		return fmt.Errorf("retry period must be positive, got %s", t.RetryPeriod)
	}
	if t.LeaseDuration <= t.RenewDeadline {
		return fmt.Errorf("lease duration (%s) must be greater than renew deadline (%s)", t.LeaseDuration, t.RenewDeadline)
	}
	if float64(t.RenewDeadline) <= 1.2*float64(t.RetryPeriod) {
		return fmt.Errorf("renew deadline (%s) must be greater than 1.2 x retry period (%s)", t.RenewDeadline, t.RetryPeriod)
	}
	return nil
}

// AddressLifetime is how long a bound address stays in the kernel without
// the daemon confirming it (its valid lifetime, refreshed by the sync
// loop): shorter than the time any other node needs to take it over. Others
// take over a lease duration after the last heartbeat renewal they saw; the
// last refresh may come a retry period after that renewal, and the kernel
// removes expired addresses up to a second late (it checks lifetimes in
// whole seconds). So: lease duration - retry period - 2 s, at least 1 s
// (2 s with the defaults 5/3/1).
func (t Timing) AddressLifetime() time.Duration {
	d := (t.LeaseDuration - t.RetryPeriod - 2*time.Second).Truncate(time.Second)
	return max(d, time.Second)
}

// Rank orders the candidates for a key the same way on every node
// (rendezvous hashing): the first acquires at once, the others stand back
// one retry period per place unless it does not.
func Rank(key string, candidates []string) []string {
	type scored struct {
		node  string
		score uint64
	}
	s := make([]scored, 0, len(candidates))
	for _, n := range candidates {
		h := fnv.New64a()
		_, _ = h.Write([]byte(key + "\x00" + n))
		s = append(s, scored{n, mix(h.Sum64())})
	}
	slices.SortFunc(s, func(a, b scored) int {
		if c := cmp.Compare(b.score, a.score); c != 0 {
			return c
		}
		return cmp.Compare(a.node, b.node)
	})
	out := make([]string, len(s))
	for i, x := range s {
		out[i] = x.node
	}
	return out
}

// mix is a 64-bit finaliser (splitmix64): FNV alone keeps the high bits of
// similar inputs close, which would favour one node for similar names.
func mix(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// ServiceLeaseKey is the Service Lease of a Service.
func ServiceLeaseKey(svc types.NamespacedName) types.NamespacedName {
	return types.NamespacedName{Namespace: svc.Namespace, Name: LeaseName(svc.Name)}
}
