// Package snat owns the firewall rules of egressvip's datapath on a node
// (model.Datapath): the SNAT that gives egress pods their Service's
// LoadBalancer IP as source address, the steering mark that sends pods'
// traffic to the node holding the address, holds, the gate for pods not yet
// known, anti-spoofing, the fence and the tunnel guard. Three backends
// (SelectBackend):
//
//   - nftables (the default): a table "egressvip" of its own in the ip and
//     the ip6 family (knftables, the nft binary). Its nat postrouting chain
//     runs at priority srcnat-10 (90), before iptables' nat POSTROUTING and
//     kube-proxy's nftables chains (100), so no rule another component adds
//     anywhere can come first; its prerouting filter chain runs at priority
//     0, after kube-proxy's DNAT (dstnat, -100), so it sees a connection's
//     original and current destination; its fence runs at srcnat+10 (110),
//     after every source translation. What changes lives in sets and maps
//     keyed by pod, so a new connection costs the same few lookups whatever
//     the number of Services (see the layout in nftables.go). One
//     transaction per family and sync: the changed elements only, or the
//     whole table replaced when its state is unknown.
//   - iptables-legacy and iptables-nft: like kube-proxy, the owned chains
//     (EGRESSVIP-* in the raw, mangle and nat tables) are rendered from the
//     Datapath and written with one iptables-restore --noflush per family;
//     a jump at position 1 of each built-in chain they hang off, repaired by
//     rule spec in the same restore, puts them ahead of CNI and kube-proxy
//     rules. What iptables cannot express is said in iptables.go; the fence
//     lives in an nftables table of the backend's own when nft works.
//
// After a write, conntrack entries of pods whose treatment changed are
// deleted, never those towards excluded (in-cluster) destinations. Check
// tells cheaply whether someone changed what was written; the first Apply
// removes what egressvip left in the other backends. Kernel access goes
// through Runner (iptables), NFTables and Conntrack.
package snat

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/pkg/model"
)

// Family is an IP family; each has its own tables and binaries.
type Family int

// The two families, in the order Apply writes them.
const (
	IPv4 Family = iota
	IPv6
)

// Families lists both families in write order.
var Families = []Family{IPv4, IPv6}

func (f Family) String() string {
	if f == IPv6 {
		return "IPv6"
	}
	return "IPv4"
}

// familyOf returns the family of a, which must be valid.
func familyOf(a netip.Addr) Family {
	if a.Unmap().Is4() {
		return IPv4
	}
	return IPv6
}

// kind is what a rule does to the traffic it matches.
type kind uint8

const (
	// kindSNAT: the source becomes the rule's LoadBalancer IP here.
	kindSNAT kind = iota + 1
	// kindSteer: the packet gets the steering mark and is routed to the
	// holder, unchanged.
	kindSteer
	// kindHold: the packet is dropped.
	kindHold
)

func (k kind) String() string {
	switch k {
	case kindSNAT:
		return "snat"
	case kindSteer:
		return "steer"
	case kindHold:
		return "hold"
	}
	return "none"
}

// clause is one rule of a pod in one family, normalised: model.SNATRule,
// SteerRule or HoldRule with the filter's prefixes of the pod's family.
type clause struct {
	service string
	kind    kind
	pod     netip.Addr
	// source is the LoadBalancer IP of an SNAT clause.
	source netip.Addr
	// ports, allow and deny are sorted and de-duplicated; allow and deny
	// hold no prefix inside another. Empty allow means every destination.
	ports       []annotations.DestinationPort
	allow, deny []netip.Prefix
	// keep leaves the pod's conntrack entries alone when its treatment
	// changes (model.SNATRule.KeepConntrack); it writes no rule.
	keep bool
}

// filtered says whether the clause has destination prefixes, which the
// per-pod maps cannot express.
func (c clause) filtered() bool { return len(c.allow) > 0 || len(c.deny) > 0 }

// matchesAll says whether the clause takes every destination.
func (c clause) matchesAll() bool { return !c.filtered() && len(c.ports) == 0 }

func compareClause(a, b clause) int {
	if c := cmp.Or(a.pod.Compare(b.pod), cmp.Compare(a.service, b.service), cmp.Compare(a.kind, b.kind), a.source.Compare(b.source)); c != 0 {
		return c
	}
	return cmp.Or(slices.CompareFunc(a.ports, b.ports, comparePort),
		slices.CompareFunc(a.allow, b.allow, comparePrefix),
		slices.CompareFunc(a.deny, b.deny, comparePrefix))
}

// famDesired is the part of a Datapath that belongs to one family,
// normalised: sorted, de-duplicated, addresses unmapped.
type famDesired struct {
	exclude []netip.Prefix
	// clauses are sorted by pod, then in the order in which they apply:
	// for each pod, the first clause whose filter passes decides.
	clauses []clause
	// gateCIDRs and known are the Gate's (gateCIDRs empty: no gate).
	gateCIDRs []netip.Prefix
	known     []netip.Addr
	fenced    []netip.Addr
	// guard are the sources that may not send to the tunnel port.
	guard []netip.Prefix
	// transit are the sources whose forwarded off-cluster traffic from
	// nodeIfaces is dropped unless a rule's pod.
	transit []netip.Prefix
	// nodeIfaces are the interfaces exempt from the anti-spoofing check
	// (other nodes' traffic arrives there, and the tunnel device).
	nodeIfaces []string
}

// services returns the sorted, distinct Services that have clauses.
func (d *famDesired) services() []string {
	var out []string
	for _, c := range d.clauses {
		out = append(out, c.service)
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// keepPods are the pods with a clause whose Service keeps their conntrack
// entries: a change of their treatment deletes none.
func (d *famDesired) keepPods() map[netip.Addr]bool {
	var out map[netip.Addr]bool
	for _, c := range d.clauses {
		if c.keep {
			if out == nil {
				out = map[netip.Addr]bool{}
			}
			out[c.pod] = true
		}
	}
	return out
}

// only returns a copy of d with the clauses of the Services keep accepts.
func (d *famDesired) only(keep func(service string) bool) *famDesired {
	out := *d
	out.clauses = nil
	for _, c := range d.clauses {
		if keep(c.service) {
			out.clauses = append(out.clauses, c)
		}
	}
	return &out
}

// normalize splits d into its families. Rules with an invalid or missing
// address, or addresses of two families, are returned in bad by Service
// (nothing is written for them). guard are the tunnel guard's sources.
func normalize(d model.Datapath, guard []netip.Prefix, tunnelDevice string) (out [2]*famDesired, bad map[string]error) {
	if len(d.PodCIDRs) > 0 {
		guard = d.PodCIDRs
	}
	ifaces := slices.Clone(d.NodeInterfaces)
	if tunnelDevice != "" {
		ifaces = append(ifaces, tunnelDevice)
	}
	ifaces = slices.DeleteFunc(ifaces, func(s string) bool { return s == "" || len(s) > 15 || strings.ContainsAny(s, "\" \\/\t\n") })
	slices.Sort(ifaces)
	ifaces = slices.Compact(ifaces)
	for _, f := range Families {
		fd := &famDesired{
			exclude:    prefixesOf(f, d.Exclude),
			guard:      prefixesOf(f, guard),
			fenced:     addrsOf(f, d.Fenced),
			nodeIfaces: ifaces,
		}
		if len(ifaces) > 0 {
			fd.transit = prefixesOf(f, d.Transit)
		}
		if d.Gate != nil {
			fd.gateCIDRs = prefixesOf(f, d.Gate.PodCIDRs)
			if len(fd.gateCIDRs) > 0 {
				fd.known = addrsOf(f, d.Gate.Known)
			}
		}
		out[f] = fd
	}
	fail := func(service, what string, addrs ...netip.Addr) {
		if bad == nil {
			bad = map[string]error{}
		}
		bad[service] = fmt.Errorf("%s rule with an invalid address or mixed families (%v): not written", what, addrs)
	}
	add := func(c clause, f model.Filter) {
		fam := familyOf(c.pod)
		c.pod = c.pod.Unmap()
		c.source = c.source.Unmap()
		c.service = commentSafe(c.service)
		c.ports = slices.Clone(f.Ports)
		slices.SortFunc(c.ports, comparePort)
		c.ports = slices.Compact(c.ports)
		c.allow = minimalPrefixes(prefixesOf(fam, f.Allow))
		c.deny = minimalPrefixes(prefixesOf(fam, f.Deny))
		if len(f.Allow) > 0 && len(c.allow) == 0 {
			// Only destinations of the other family are allowed: no
			// destination of this one passes.
			return
		}
		out[fam].clauses = append(out[fam].clauses, c)
	}
	for _, r := range d.SNAT {
		if !r.Pod.IsValid() || !r.Source.IsValid() || familyOf(r.Pod) != familyOf(r.Source) {
			fail(r.Service, "SNAT", r.Pod, r.Source)
			continue
		}
		add(clause{service: r.Service, kind: kindSNAT, pod: r.Pod, source: r.Source, keep: r.KeepConntrack}, r.Filter)
	}
	for _, r := range d.Steer {
		if !r.Pod.IsValid() {
			fail(r.Service, "steering", r.Pod)
			continue
		}
		add(clause{service: r.Service, kind: kindSteer, pod: r.Pod, keep: r.KeepConntrack}, r.Filter)
	}
	for _, r := range d.Hold {
		if !r.Pod.IsValid() {
			fail(r.Service, "hold", r.Pod)
			continue
		}
		add(clause{service: r.Service, kind: kindHold, pod: r.Pod}, r.Filter)
	}
	for _, fd := range out {
		slices.SortFunc(fd.clauses, compareClause)
		fd.clauses = slices.CompactFunc(fd.clauses, func(a, b clause) bool { return compareClause(a, b) == 0 })
	}
	return out, bad
}

// prefixesOf returns the valid prefixes of family f in ps, masked, sorted
// and de-duplicated.
func prefixesOf(f Family, ps []netip.Prefix) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range ps {
		if !p.IsValid() || familyOf(p.Addr()) != f {
			continue
		}
		if bits := p.Bits() - ifMapped(p.Addr()); bits >= 0 {
			out = append(out, netip.PrefixFrom(p.Addr().Unmap(), bits).Masked())
		}
	}
	slices.SortFunc(out, comparePrefix)
	return slices.Compact(out)
}

// ifMapped is the number of bits an IPv4-mapped IPv6 prefix loses when
// unmapped.
func ifMapped(a netip.Addr) int {
	if a.Is4In6() {
		return 96
	}
	return 0
}

// addrsOf returns the valid addresses of family f in as, unmapped, sorted
// and de-duplicated.
func addrsOf(f Family, as []netip.Addr) []netip.Addr {
	var out []netip.Addr
	for _, a := range as {
		if a.IsValid() && familyOf(a) == f {
			out = append(out, a.Unmap())
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out)
}

// minimalPrefixes drops every prefix inside another one (an interval set
// refuses overlapping elements). ps is sorted by comparePrefix, so a
// prefix can only lie inside the last one kept.
func minimalPrefixes(ps []netip.Prefix) []netip.Prefix {
	var kept []netip.Prefix
	for _, p := range ps {
		if n := len(kept); n > 0 && kept[n-1].Bits() <= p.Bits() && kept[n-1].Contains(p.Addr()) {
			continue
		}
		kept = append(kept, p)
	}
	return kept
}

// commentSafe replaces the characters that would end or break a quoted
// comment of nft or iptables-restore. Kubernetes names never contain them.
func commentSafe(s string) string {
	return strings.Map(func(r rune) rune {
		if r == '"' || r == '\\' || r < ' ' {
			return '_'
		}
		return r
	}, s)
}

func comparePrefix(a, b netip.Prefix) int {
	return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
}

func comparePort(a, b annotations.DestinationPort) int {
	return cmp.Or(cmp.Compare(a.Protocol, b.Protocol), cmp.Compare(a.Port, b.Port))
}

// protoNumbers maps protocols to their IP protocol numbers.
var protoNumbers = map[annotations.Protocol]uint8{
	annotations.TCP:  6,
	annotations.UDP:  17,
	annotations.SCTP: 132,
}

// parseProto reads a protocol as nft prints it (a name) or as a number.
func parseProto(s string) (annotations.Protocol, bool) {
	for p, n := range protoNumbers {
		if s == string(p) || s == fmt.Sprint(n) {
			return p, true
		}
	}
	return "", false
}
