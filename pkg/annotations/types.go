// Package annotations holds the kube-vip.io/* annotation names egressvip
// honours and pure parsers for their values.
//
// The names are kube-vip's on purpose, so that a kube-vip user can switch
// without rewriting manifests. Where kube-vip's two egress backends disagree
// on what a value means, egressvip follows kube-vip's nftables backend (the
// default since kube-vip v1.2.2), except that it never SNATs more than the
// annotation asks for: a value whose meaning is unclear stops egress for the
// Service instead of being guessed at.
package annotations

// Annotation names a user sets. They are kube-vip's (pkg/kubevip/annotations.go
// in kube-vip), except EgressStrict, which is egressvip's own.
const (
	// Egress: "true" makes the Service's pods leave with its LoadBalancer IP.
	Egress = "kube-vip.io/egress"
	// EgressIPv6: "true" egresses the pods' IPv6 traffic too.
	EgressIPv6 = "kube-vip.io/egress-ipv6"
	// EgressDestinationPorts: "proto:port,...": SNAT only these destinations.
	EgressDestinationPorts = "kube-vip.io/egress-destination-ports"
	// EgressSourcePorts: "proto:port,...": with FlushConntrack, the ports of
	// the LoadBalancer IP whose inbound connections kube-vip flushes. It never
	// narrows SNAT.
	EgressSourcePorts = "kube-vip.io/egress-source-ports"
	// EgressAllowedNetworks: "cidr,...": SNAT only towards these networks.
	EgressAllowedNetworks = "kube-vip.io/egress-allowed-networks"
	// EgressDeniedNetworks: "cidr,...": never SNAT towards these networks.
	EgressDeniedNetworks = "kube-vip.io/egress-denied-networks"
	// EgressInternal selects kube-vip's nftables backend for one Service.
	EgressInternal = "kube-vip.io/egress-internal"
	// EgressNoInternalTraffic: see EgressConfig.NoInternalTraffic.
	EgressNoInternalTraffic = "kube-vip.io/egress-no-internal-traffic"
	// EgressDetectAPIServer: see EgressConfig.DetectAPIServer.
	EgressDetectAPIServer = "kube-vip.io/egress-detect-api-server"
	// FlushConntrack: see EgressConfig.FlushConntrack.
	FlushConntrack = "kube-vip.io/flush-conntrack"
	// Ignore: "true" makes the Service invisible to kube-vip (and egressvip).
	Ignore = "kube-vip.io/ignore"
	// LoadBalancerIPs: the Service's LoadBalancer IPs, comma-separated.
	LoadBalancerIPs = "kube-vip.io/loadbalancerIPs"

	// EgressStrict is egressvip's own: "true" drops the pods' off-cluster
	// traffic while no path to the egress address exists, instead of
	// letting it leave with the node's address.
	EgressStrict = "egressvip.io/egress-strict"
	// EgressFamilies is egressvip's own: the families egressed,
	// "ipv4", "ipv6" or "ipv4,ipv6". Without it kube-vip's rule holds:
	// IPv4, or IPv6 instead with kube-vip.io/egress-ipv6 "true".
	EgressFamilies = "egressvip.io/egress-families"
)

// Annotation names the leader writes on a Service. They are state, not
// configuration: they are never a user error.
const (
	// ActiveEndpoint and ActiveEndpointIPv6 name the pod IPs being egressed.
	ActiveEndpoint     = "kube-vip.io/active-endpoint"
	ActiveEndpointIPv6 = "kube-vip.io/active-endpoint-ipv6"
	// VIPHost names the node that holds the address.
	VIPHost = "kube-vip.io/vipHost"
	// EgressNftablesTable is written by kube-vip (v1.2.2 and later) on every
	// egress Service it programmed with nftables: the base name of its
	// nftables table ("kube_vip" or "kube_vip_<instance>"). egressvip never
	// writes it and ignores it: after a switch from kube-vip it stays on the
	// Services it was written to.
	EgressNftablesTable = "kube-vip.io/egress-nftables-table"
)

// Prefixes of annotation names that belong to egress. A name with one of these
// prefixes (compared without regard to case) that is not one of the names
// above is an unknown egress annotation: egressvip cannot tell what it would
// narrow, so it programs no egress for the Service.
const (
	KubeVIPEgressPrefix   = "kube-vip.io/egress"
	EgressVIPEgressPrefix = "egressvip.io/egress"
)

// Protocol is a transport protocol an egress rule may be limited to.
type Protocol string

// Protocols accepted in kube-vip.io/egress-destination-ports.
const (
	TCP  Protocol = "tcp"
	UDP  Protocol = "udp"
	SCTP Protocol = "sctp"
)

// DestinationPort limits SNAT to one protocol and destination port. It is
// also the element of EgressConfig.SourcePorts, where Port is the
// LoadBalancer IP's port of an inbound connection.
type DestinationPort struct {
	Protocol Protocol
	Port     uint16
}
