// Package snat owns the nat-table chains that give egress pods their
// Service's LoadBalancer IP as source address.
//
// Like kube-proxy, it renders the whole owned chain (EGRESSVIP-SNAT) per
// family from a Desired value (Render) and writes it with one
// iptables-restore --noflush, which flushes and refills only that chain.
// A jump at position 1 of nat POSTROUTING puts it ahead of CNI and
// kube-proxy MASQUERADE rules. After a write, conntrack entries of pods
// whose translation changed are deleted, never those towards excluded
// (in-cluster) destinations. Kernel access goes through Runner and
// Conntrack; Fake is a stateful Runner that can Trace packets.
package snat

import (
	"net/netip"

	"github.com/egressvip/egressvip/pkg/annotations"
)

// Rule says: packets from PodIP leave with SourceIP, optionally only for the
// listed protocols and destination ports. PodIP and SourceIP are of one family.
type Rule struct {
	// Service is "namespace/name"; it becomes the rule's comment.
	Service  string
	PodIP    netip.Addr
	SourceIP netip.Addr
	// Ports is empty for "all traffic".
	Ports []annotations.DestinationPort
}

// Desired is the whole SNAT state of a node, both families.
type Desired struct {
	Rules []Rule
	// Exclude lists destinations (pod and Service CIDRs, both families)
	// that are never SNATed by egressvip.
	Exclude []netip.Prefix
}
