// Package election decides which node serves each Service, at an API cost
// that does not grow with the number of Services:
//
//   - Node liveness: every daemon renews one Lease of its own, its
//     heartbeat (egressvip.node.<node> in the daemon's namespace). It is
//     the only periodic write.
//   - Service ownership: each Service has a Lease in its namespace
//     (egressvip-<service>) naming the node that holds it. It is written
//     when ownership changes (acquisition, release), never renewed, and a
//     holder is valid while its heartbeat is. Optimistic concurrency on
//     resourceVersion decides races; an ownerReference to the Service
//     removes the Lease with it.
//
// Candidates learn about holders and heartbeats from informers, not by
// polling. What to acquire or release is decided by the pure planner
// (pkg/plan) from a View; this package only keeps the view and performs
// the writes. Nothing here touches the kernel.
package election

import (
	"cmp"
	"fmt"
	"hash/fnv"
	"slices"
	"time"

	"k8s.io/apimachinery/pkg/types"
)

// LeasePrefix starts the name of every per-Service Lease:
// egressvip-<service name>, in the Service's namespace.
const LeasePrefix = "egressvip-"

// HeartbeatPrefix starts the name of every node's heartbeat Lease. The dot
// keeps it apart from every per-Service Lease name: Service names are DNS
// labels and have no dots.
const HeartbeatPrefix = "egressvip.node."

// Labels on the Leases egressvip writes; the informers select on them.
const (
	LabelManagedBy = "app.kubernetes.io/managed-by"
	ManagedBy      = "egressvip"
	LabelRole      = "egressvip.io/role"
	RoleHeartbeat  = "heartbeat"
	RoleService    = "service"
	RoleGlobal     = "global"
	// AnnotationValidWhile on a Service Lease names the heartbeat Lease
	// that keeps the holding valid, for whoever reads it with kubectl.
	AnnotationValidWhile = "egressvip.io/valid-while"
	// AnnotationDraining on a heartbeat says the node is shutting down:
	// its holdings stay valid until it releases them, but it is no
	// candidate for anything new.
	AnnotationDraining = "egressvip.io/draining"
	// AnnotationAddresses on a heartbeat lists the node's own addresses on
	// its serviceInterface, which may be missing from its Node's status:
	// no node binds them as a LoadBalancer IP.
	AnnotationAddresses = "egressvip.io/interface-addresses"
)

// LeaseName is the Lease that records the node serving a Service.
func LeaseName(service string) string { return LeasePrefix + service }

// HeartbeatName is the heartbeat Lease of a node.
func HeartbeatName(node string) string { return HeartbeatPrefix + node }

// Timing is the lease timing; Validate it before use.
type Timing struct {
	// LeaseDuration is how long a heartbeat stays valid after the last
	// renewal other nodes saw.
	LeaseDuration time.Duration
	// RenewDeadline is how long after its last successful renewal a node
	// keeps acting on what another node could take over.
	RenewDeadline time.Duration
	// RetryPeriod is the heartbeat interval, and the delay between two
	// candidates' turns for a free Service.
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

// View is one consistent picture of the election, the planner's input.
type View struct {
	Self string
	Now  time.Time
	// Established is true once this node's heartbeat has been written by
	// this process (or the previous process's heartbeat was taken over
	// without a gap): only then may it acquire.
	Established bool
	// Overdue is true while this node's last successful heartbeat renewal
	// is older than the renew deadline (or there was none): other nodes
	// may soon see it expired.
	Overdue bool
	// Draining is true once this node has started shutting down.
	Draining bool
	// Live are the nodes whose heartbeat is valid in this node's view,
	// this node included while it is established and not overdue.
	Live map[string]bool
	// Candidates are the live nodes that may acquire: Live without the
	// draining ones.
	Candidates map[string]bool
	// Leases are the Service Leases (and the global Lease) by name.
	Leases map[types.NamespacedName]Lease
}

// Lease is what the view knows of one ownership Lease.
type Lease struct {
	// Holder is the node named in the Lease ("" if released).
	Holder string
	// Current is true when Holder is this node and this process wrote (or
	// took over without a heartbeat gap) the holding: nobody else can
	// have acquired it since.
	Current bool
	// Pending is true while a write for this Lease is in flight or
	// backing off after a failure.
	Pending bool
	// OwnerUID is the UID of the Service the Lease belongs to.
	OwnerUID types.UID
	// Legacy is true for a Lease of an earlier egressvip version (no
	// labels, renewed by its holder): it is taken over like a free one.
	Legacy bool
}

// HolderValid says whether the view's Lease names a node whose heartbeat is
// valid.
func (v View) HolderValid(l Lease) bool {
	return l.Holder != "" && !l.Legacy && (l.Holder == v.Self || v.Live[l.Holder])
}

// Rank orders the candidates for a Lease the same way on every node
// (rendezvous hashing): the first acquires at once, the others stand back
// one retry period per place unless it does not.
func Rank(lease types.NamespacedName, candidates []string) []string {
	type scored struct {
		node  string
		score uint64
	}
	s := make([]scored, 0, len(candidates))
	for _, n := range candidates {
		h := fnv.New64a()
		_, _ = h.Write([]byte(lease.Namespace + "/" + lease.Name + "\x00" + n))
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
