// Package model holds the value types that egressvip's pure core (the
// analysis in pkg/desired, the planner in pkg/plan) hands to the kernel
// writers (pkg/netif, pkg/snat, pkg/steer). It imports no kernel writer and
// nothing that talks to the API server, so the planner's tests link neither
// netlink nor knftables.
package model

import (
	"errors"
	"net/netip"

	"github.com/egressvip/egressvip/pkg/annotations"
)

// ErrUnverified is a firewall writer's check that cannot tell whether its
// rules are intact: another program committed to the ruleset while it
// wrote them (kube-proxy syncing on the same EndpointSlice change, say), so
// it holds no reference to compare with. Nothing is known to be wrong; the
// rules are rewritten to take one.
var ErrUnverified = errors.New("the egress rules could not be verified: another program committed to the ruleset while egressvip wrote them")

// Filter narrows the off-cluster traffic of one pod that egress applies to.
// A destination passes when it is not excluded (Datapath.Exclude), is inside
// one of Allow (when Allow has prefixes of the pod's family), is inside none
// of Deny, and its protocol and destination port are one of Ports (when
// Ports is not empty). Prefixes of the other family than the pod's are
// ignored; the planner never writes a rule for a family that Allow
// restricts to nothing (kube-vip.io/egress-allowed-networks naming only the
// other family's networks).
type Filter struct {
	Ports []annotations.DestinationPort
	Allow []netip.Prefix
	Deny  []netip.Prefix
}

// IsZero reports whether the filter lets every destination pass.
func (f Filter) IsZero() bool {
	return len(f.Ports) == 0 && len(f.Allow) == 0 && len(f.Deny) == 0
}

// SNATRule says: new connections from Pod whose destination passes Filter
// leave this node with Source as source address. Pod lives on this node, or
// on another node that steers its traffic here (Remote). Pod and Source are
// of one family.
type SNATRule struct {
	// Service is "namespace/name": the rule's comment, for people and for
	// finding what a Service owns.
	Service string
	Pod     netip.Addr
	Source  netip.Addr
	Filter  Filter
	// Remote is true for a pod on another node whose traffic arrives
	// steered (over the node network, or the VXLAN device).
	Remote bool
	// KeepConntrack leaves the pod's conntrack entries alone when its
	// translation changes (kube-vip.io/flush-conntrack: "false"): its
	// existing connections keep the translation they began with.
	KeepConntrack bool
}

// SteerRule says: new connections from Pod (on this node) whose destination
// passes Filter are routed, unchanged, to the node that holds the Service's
// address, which SNATs them. This node's own NAT (a CNI's MASQUERADE,
// kube-proxy) must not rewrite them: the holder must see the pod's address.
type SteerRule struct {
	Service string
	Pod     netip.Addr
	// Holder is the node that holds the address (its name).
	Holder string
	// Via are the holder's addresses of Pod's family that may serve as
	// next hop, in order of preference (its InternalIPs, then its
	// serviceInterface addresses). The routing writer uses the first one
	// that is on-link, or the tunnel when Tunnel is set.
	Via    []netip.Addr
	Filter Filter
	// Tunnel sends the traffic through egressvip's VXLAN device to the
	// holder's VTEP instead of plain routing.
	Tunnel bool
	// KeepConntrack: see SNATRule.
	KeepConntrack bool
}

// HoldRule says: new connections from Pod (on this node) whose destination
// passes Filter are dropped: the Service is strict (egressvip.io/egress-strict)
// and no path to its address exists right now (no holder, holder changing),
// so nothing may leave with the node's address instead.
type HoldRule struct {
	Service string
	Pod     netip.Addr
	Filter  Filter
}

// Gate holds back the off-cluster traffic of pods of this node that
// egressvip does not know yet: a pod that an egress Service selects is
// starting here and its address is not known, so any unknown source inside
// PodCIDRs may be that pod's first packets. Known are the addresses of every
// pod of this node egressvip knows (any namespace); their traffic passes.
type Gate struct {
	PodCIDRs []netip.Prefix
	Known    []netip.Addr
}

// Datapath is everything egressvip's firewall rules on this node should
// implement, both families.
type Datapath struct {
	SNAT  []SNATRule
	Steer []SteerRule
	Hold  []HoldRule
	// Gate, when set, drops off-cluster traffic of unknown local pods.
	Gate *Gate
	// Exclude are destinations that are never SNATed, steered or held: the
	// pod and Service CIDRs, the nodes' addresses and the API server's. A
	// connection is excluded when its original destination (before any
	// DNAT, such as kube-proxy's from a ClusterIP to an endpoint) or its
	// current destination is inside one of them.
	Exclude []netip.Prefix
	// NodeInterfaces are the interfaces other nodes' traffic arrives on
	// (those of the routes to their addresses): traffic steered here from
	// pods of other nodes comes in there, whatever interface the cluster
	// routes those pods' addresses through (an overlay CNI's tunnel), so
	// the anti-spoofing check does not apply to it there. A pod of this
	// node never sends through them.
	NodeInterfaces []string
	// PodCIDRs are the cluster's pod CIDRs: in VXLAN mode, their traffic
	// to the tunnel's port is dropped, so no pod can inject packets into a
	// node's tunnel.
	PodCIDRs []netip.Prefix
	// Transit, when set, are the cluster's pod CIDRs whose off-cluster
	// traffic this node does not forward when it arrives from another node
	// (on NodeInterfaces) and no SNAT rule of this node takes it: a pod
	// steered here before this node knows it, or after it gave the address
	// up, is dropped, never forwarded with this node's address or its own.
	// Set while any egress Service exists.
	Transit []netip.Prefix
	// Fenced are the source addresses that may leave this node only while
	// they are local addresses of this node: every address SNAT rules use
	// (and those of rules just removed, while steered traffic may still
	// arrive). A packet leaving with one of them as source while it is not
	// bound here (its lifetime ran out, or it was removed) is dropped, never
	// sent from the wrong node.
	Fenced []netip.Addr
}

// Routes is what egressvip's policy routing on this node should hold: the
// steered pods' traffic (marked by the firewall) goes to the holder.
type Routes struct {
	Steer []SteerRule
	// Tunnel is the VXLAN configuration when VXLAN mode is on (nil: off).
	Tunnel *Tunnel
}

// Tunnel is egressvip's VXLAN device and its peers.
type Tunnel struct {
	// VNI and Port of the VXLAN device; Device is its name.
	VNI    uint32
	Port   uint16
	Device string
	// Local is this node's underlay address (source of the encapsulated
	// packets).
	Local netip.Addr
	// Peers are the other nodes the device reaches.
	Peers []TunnelPeer
}

// TunnelPeer is another node's VTEP.
type TunnelPeer struct {
	Node string
	// Underlay is where its encapsulated traffic goes.
	Underlay netip.Addr
	// MAC is its VXLAN device's address.
	MAC string
	// Inner are its addresses steered traffic names as next hop (its
	// InternalIPs), reached through the device.
	Inner []netip.Addr
}

// Binding is one LoadBalancer IP this node should hold.
type Binding struct {
	Addr netip.Addr
	// KeepOnly refreshes the address's lifetime if the kernel still holds
	// it but never adds it: the node keeps what it has through an API
	// outage, but an address that expired (the daemon was frozen or dead)
	// comes back only once the holding is confirmed again.
	KeepOnly bool
}
