package snat

import (
	"net"
	"net/netip"
	"slices"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/vishvananda/netlink"
)

// Conntrack deletes conntrack entries; *netlink.Handle implements it.
type Conntrack interface {
	ConntrackDeleteFilters(table netlink.ConntrackTableType, family netlink.InetFamily, filters ...netlink.CustomConntrackFilter) (uint, error)
}

// netlinkConntrack uses the netlink package handle, which opens its socket
// in the network namespace of the calling thread.
type netlinkConntrack struct{}

func (netlinkConntrack) ConntrackDeleteFilters(table netlink.ConntrackTableType, family netlink.InetFamily, filters ...netlink.CustomConntrackFilter) (uint, error) {
	return netlink.ConntrackDeleteFilters(table, family, filters...)
}

// flush selects the conntrack entries of one pod whose treatment changed:
// an entry established under the old rules keeps its old translation (or
// none) until it is deleted. It implements netlink.CustomConntrackFilter.
type flush struct {
	pod netip.Addr
	// ports limits the flush to these protocols and destination ports;
	// empty means every destination port.
	ports []annotations.DestinationPort
	// exclude lists destinations whose entries are never deleted (pod and
	// Service CIDRs: in-cluster flows are not egressvip's). An entry is
	// excluded when its original destination or, after a DNAT, its
	// current one is inside.
	exclude []netip.Prefix
}

var _ netlink.CustomConntrackFilter = flush{}

// MatchConntrackFlow says whether flow is one of the pod's entries towards
// a destination outside exclude, on one of ports when ports is set. SCTP
// entries, whose ports the netlink library does not read, match by
// protocol when ports has an SCTP port.
func (f flush) MatchConntrackFlow(flow *netlink.ConntrackFlow) bool {
	src, _, ok := outside(flow, f.exclude)
	if !ok || src != f.pod.Unmap() {
		return false
	}
	return len(f.ports) == 0 || slices.ContainsFunc(f.ports, func(p annotations.DestinationPort) bool { return portTakes(p, flow) })
}

// outside returns the flow's original source and destination, and whether
// it is one egressvip may touch: neither its original destination nor,
// after a DNAT, the address replies come from is inside exclude (pod and
// Service CIDRs: in-cluster flows are not egressvip's).
func outside(flow *netlink.ConntrackFlow, exclude []netip.Prefix) (src, dst netip.Addr, ok bool) {
	src, ok1 := addrFromIP(flow.Forward.SrcIP)
	dst, ok2 := addrFromIP(flow.Forward.DstIP)
	if !ok1 || !ok2 {
		return src, dst, false
	}
	cur, okCur := addrFromIP(flow.Reverse.SrcIP)
	for _, p := range exclude {
		if p.Contains(dst) || (okCur && p.Contains(cur)) {
			return src, dst, false
		}
	}
	return src, dst, true
}

// portTakes says whether the flow goes to destination port p. The netlink
// library reads ports of TCP and UDP entries only: an SCTP entry has
// DstPort 0 and goes by protocol, so none survives a change of its pod's
// treatment (other SCTP flows of the pod are deleted too, and re-created
// by their next packet under the same rules).
func portTakes(p annotations.DestinationPort, flow *netlink.ConntrackFlow) bool {
	return protoNumbers[p.Protocol] == flow.Forward.Protocol &&
		(p.Port == flow.Forward.DstPort || (p.Protocol == annotations.SCTP && flow.Forward.DstPort == 0))
}

func addrFromIP(ip net.IP) (netip.Addr, bool) {
	a, ok := netip.AddrFromSlice(ip)
	return a.Unmap(), ok
}

// flushes returns, sorted by pod, the flushes needed when a family's pods
// go from the plans prev to next: a pod whose treatment changed for some
// traffic gets its entries for that traffic deleted: the ports whose
// action changed, or all its entries when the action for all other
// traffic, or a pod's clause chain, changed. Exclusions of both states
// stay.
func flushes(prev, next map[netip.Addr]*podPlan, exclude []netip.Prefix) []flush {
	empty := &podPlan{}
	var out []flush
	seen := map[netip.Addr]bool{}
	visit := func(pod netip.Addr) {
		if seen[pod] {
			return
		}
		seen[pod] = true
		b, a := prev[pod], next[pod]
		if b == nil {
			b = empty
		}
		if a == nil {
			a = empty
		}
		if sameTreatment(b, a) {
			return
		}
		if b.digest != a.digest || b.all.action != a.all.action {
			out = append(out, flush{pod: pod, exclude: exclude})
			return
		}
		var ports []annotations.DestinationPort
		eff := func(p *podPlan, port annotations.DestinationPort) action {
			if e, ok := p.ports[port]; ok {
				return e.action
			}
			return p.all.action
		}
		for port := range b.ports {
			if eff(b, port) != eff(a, port) {
				ports = append(ports, port)
			}
		}
		for port := range a.ports {
			if _, ok := b.ports[port]; !ok && eff(b, port) != eff(a, port) {
				ports = append(ports, port)
			}
		}
		if len(ports) > 0 {
			slices.SortFunc(ports, comparePort)
			out = append(out, flush{pod: pod, ports: ports, exclude: exclude})
		}
	}
	for pod := range prev {
		visit(pod)
	}
	for pod := range next {
		visit(pod)
	}
	slices.SortFunc(out, func(x, y flush) int { return x.pod.Compare(y.pod) })
	return out
}

// mistranslated selects the conntrack entries whose translation is not
// what egressvip's rules give their packets: entries set up while someone
// else's rule ran before ours (a CNI's MASQUERADE inserted first, our
// table deleted by hand). Their packets keep that translation for as long
// as the entry lives, so a repaired rule set alone does not stop them
// from leaving with the node's address. Entries that are right, and
// traffic none of our clauses takes, are never selected. It implements
// netlink.CustomConntrackFilter.
type mistranslated struct {
	// clauses are each pod's clauses in the order in which they apply.
	clauses map[netip.Addr][]clause
	exclude []netip.Prefix
}

var _ netlink.CustomConntrackFilter = mistranslated{}

// newMistranslated selects among the pods of d, except those in keep.
func newMistranslated(d *famDesired, keep map[netip.Addr]bool) mistranslated {
	m := mistranslated{clauses: map[netip.Addr][]clause{}, exclude: d.exclude}
	for _, c := range d.clauses {
		if !keep[c.pod] {
			m.clauses[c.pod] = append(m.clauses[c.pod], c)
		}
	}
	return m
}

// MatchConntrackFlow says whether the first clause of the flow's pod that
// takes the flow wants another translation than the entry has: an SNAT
// clause its LoadBalancer IP, a steering clause none (the holder
// translates).
func (m mistranslated) MatchConntrackFlow(flow *netlink.ConntrackFlow) bool {
	src, dst, ok := outside(flow, m.exclude)
	cs := m.clauses[src]
	if !ok || len(cs) == 0 {
		return false
	}
	// Replies go to the translated source.
	got, ok := addrFromIP(flow.Reverse.DstIP)
	if !ok {
		return false
	}
	for _, c := range cs {
		if !c.takes(flow, dst) {
			continue
		}
		switch c.kind {
		case kindSNAT:
			return got != c.source
		case kindSteer:
			return got != src
		}
		return false
	}
	return false
}

// takes says whether the clause's filter lets the flow, to dst, through.
func (c clause) takes(flow *netlink.ConntrackFlow, dst netip.Addr) bool {
	if len(c.ports) > 0 && !slices.ContainsFunc(c.ports, func(p annotations.DestinationPort) bool { return portTakes(p, flow) }) {
		return false
	}
	if len(c.allow) > 0 && !slices.ContainsFunc(c.allow, func(p netip.Prefix) bool { return p.Contains(dst) }) {
		return false
	}
	return !slices.ContainsFunc(c.deny, func(p netip.Prefix) bool { return p.Contains(dst) })
}
