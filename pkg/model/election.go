package model

import (
	"net/netip"
	"time"

	"k8s.io/apimachinery/pkg/types"
)

// LeaseKind says what a Lease records.
type LeaseKind uint8

// The kinds of Lease egressvip reads and writes.
const (
	// ServiceLease (egressvip-<service> in the Service's namespace) names
	// the node serving a Service: for people (kubectl get lease) and for
	// daemons of earlier releases, which elect per Service.
	ServiceLease LeaseKind = iota + 1
	// AddressLease (egressvip.addr.<address> in the daemon's namespace)
	// names the node that holds one LoadBalancer IP: the authority among
	// current daemons. It lives where namespace admins cannot write.
	AddressLease
	// GlobalLease (egressvip.services) elects one node for everything when
	// svc_election=false, and the node that allocates addresses.
	GlobalLease
)

// Writer says which egressvip release wrote a holding, which decides how
// its validity is judged.
type Writer uint8

// The releases whose Leases a daemon meets.
const (
	// Current daemons: a holding is valid while its holder's heartbeat is;
	// the address Leases are the authority.
	Current Writer = iota
	// Heartbeat is the release that elected per Service Lease, valid while
	// the holder's heartbeat is (its heartbeat carries no protocol
	// version). It binds an address on its Service Lease alone.
	Heartbeat
	// Legacy is the release before heartbeats: one client-go elector per
	// Service, holdings valid while they are renewed (LeaseDurationSeconds
	// after this node last saw the record change), no labels.
	Legacy
)

// Lease is what the election view knows of one Lease.
type Lease struct {
	Kind LeaseKind
	// Holder is the node named in the Lease ("" when released). A Lease
	// deleted by hand keeps its last holder here while that holder is
	// live (Deleted is set): the holder writes it again.
	Holder string
	// Writer is the release the holder runs (see Writer).
	Writer Writer
	// Valid is true when Holder's holding counts: its heartbeat is valid
	// (Current, Heartbeat), or it was renewed recently enough (Legacy).
	Valid bool
	// Current is true when Holder is this node and this process wrote the
	// holding (or took it over without a heartbeat gap): nobody else can
	// have acquired it since.
	Current bool
	// Pending is true while a write of the Lease is in flight or backing
	// off after a failure.
	Pending bool
	// Deleted is true when the Lease does not exist (deleted by hand, or
	// not written yet) but this node remembers its last holder.
	Deleted bool
	// Owners are the UIDs of the Services in its ownerReferences.
	Owners []types.UID
	// ClaimedBy is, on an address Lease, the namespace whose Service the
	// holder served it for: the first claim, which a namespace admin can
	// neither write nor replay.
	ClaimedBy string
}

// Peer is what another node publishes in its heartbeat.
type Peer struct {
	// Version is the election protocol the node runs (0: the heartbeat
	// release, which knows no address Leases).
	Version int
	// Live is true while its heartbeat is valid in this node's view.
	Live bool
	// Candidate is true while it may acquire: live, not draining, standing.
	Candidate bool
	// Via are its addresses steered traffic may use as next hop (its
	// InternalIPs first, then its serviceInterface addresses).
	Via []netip.Addr
	// VTEP is its VXLAN device's MAC and underlay address ("" / invalid
	// without VXLAN mode).
	VTEPMAC      string
	VTEPUnderlay netip.Addr
	// Addresses are its own serviceInterface addresses (never bound as a
	// LoadBalancer IP anywhere).
	Addresses []netip.Addr
}

// ElectionView is one consistent picture of the election, the planner's
// input.
type ElectionView struct {
	Self string
	Now  time.Time
	// Established is true once this node's heartbeat has been written by
	// this process (or the previous process's was taken over without a
	// gap): only then may it acquire.
	Established bool
	// Overdue is true while this node's last successful heartbeat renewal
	// is older than the renew deadline (or there was none): other nodes
	// may soon see it expired.
	Overdue bool
	// Draining is true once this node has started shutting down.
	Draining bool
	// Peers are the other nodes, by name.
	Peers map[string]Peer
	// Leases are the Leases this node knows, by namespace/name.
	Leases map[types.NamespacedName]Lease
}

// Live reports whether node's holdings count: this node while established
// and not overdue, another node while its heartbeat is valid.
func (v ElectionView) Live(node string) bool {
	if node == v.Self {
		return v.Established && !v.Overdue
	}
	return v.Peers[node].Live
}

// Candidate reports whether node may acquire now.
func (v ElectionView) Candidate(node string) bool {
	if node == v.Self {
		return v.Established && !v.Overdue && !v.Draining
	}
	return v.Peers[node].Candidate
}

// Claim asks for a Lease to be written naming this node.
type Claim struct {
	Lease types.NamespacedName
	Kind  LeaseKind
	// Owners are the Services the Lease belongs to (ownerReferences, for
	// Service Leases): name and UID.
	Owners []Owner
	// ClaimedBy is written on address Leases (see Lease.ClaimedBy).
	ClaimedBy string
	// Address is the address an address Lease records.
	Address netip.Addr
	// AddressLeases are, on a Service Lease, the address Leases that
	// decide it (an annotation for people and for mixed versions).
	AddressLeases []string
}

// Owner is one ownerReference of a Service Lease.
type Owner struct {
	Name string
	UID  types.UID
}
