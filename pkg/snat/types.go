// Package snat owns the rules that give egress pods their Service's
// LoadBalancer IP as source address, in one of three backends
// (SelectBackend):
//
//   - nftables: a table "egressvip" of its own in the ip and the ip6
//     family (knftables, the nft binary), whose nat postrouting chain runs
//     at priority srcnat-10 (90), before iptables' nat POSTROUTING and
//     kube-proxy's nftables chains (100), so no rule another component adds
//     anywhere can come first. Exclusions are an interval set; the SNAT
//     translations are maps keyed by pod (and by pod, protocol and
//     destination port), so a new connection costs the same few lookups
//     whatever the number of Services; each map element names its Service
//     in its comment. One transaction per family and sync: the changed
//     elements only, or the whole table replaced when its state is unknown.
//   - iptables-legacy and iptables-nft: like kube-proxy, the whole owned
//     chain (EGRESSVIP-SNAT) per family is rendered from a Desired value
//     (Render) and written with one iptables-restore --noflush, which
//     flushes and refills only that chain; a jump at position 1 of nat
//     POSTROUTING, repaired by rule spec in the same restore, puts it ahead
//     of CNI and kube-proxy MASQUERADE rules.
//
// After a write, conntrack entries of pods whose translation changed are
// deleted, never those towards excluded (in-cluster) destinations. Check
// tells cheaply whether someone changed what was written; the first Apply
// removes what egressvip left in the other backends. Kernel access goes
// through Runner (iptables), NFTables and Conntrack; Fake and FakeNFT are
// stateful fakes that can Trace packets.
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
