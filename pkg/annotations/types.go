// Package annotations holds the kube-vip.io/* annotation names egressvip
// honours and pure parsers for their values.
package annotations

// Annotation names. They are kube-vip's on purpose, so that a kube-vip user
// can switch without rewriting manifests.
const (
	Egress                 = "kube-vip.io/egress"
	EgressIPv6             = "kube-vip.io/egress-ipv6"
	EgressDestinationPorts = "kube-vip.io/egress-destination-ports"
	LoadBalancerIPs        = "kube-vip.io/loadbalancerIPs"
	ActiveEndpoint         = "kube-vip.io/active-endpoint"
	ActiveEndpointIPv6     = "kube-vip.io/active-endpoint-ipv6"
	VIPHost                = "kube-vip.io/vipHost"
)

// Protocol is a transport protocol an egress rule may be limited to.
type Protocol string

// Protocols accepted in kube-vip.io/egress-destination-ports.
const (
	TCP  Protocol = "tcp"
	UDP  Protocol = "udp"
	SCTP Protocol = "sctp"
)

// DestinationPort limits SNAT to one protocol and destination port.
type DestinationPort struct {
	Protocol Protocol
	Port     uint16
}
