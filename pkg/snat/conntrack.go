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

// Flush selects the conntrack entries of one pod whose SNAT changed: an
// entry established under the old rules keeps its old translation until it
// is deleted. It implements netlink.CustomConntrackFilter.
type Flush struct {
	PodIP netip.Addr
	// Ports limits the flush to these protocols and destination ports;
	// empty means every destination port.
	Ports []annotations.DestinationPort
	// Exclude lists destinations whose entries are never deleted (pod and
	// Service CIDRs: in-cluster flows are not SNATed by egressvip).
	Exclude []netip.Prefix
}

var _ netlink.CustomConntrackFilter = Flush{}

// protoNumbers maps protocols to their IP protocol numbers.
var protoNumbers = map[annotations.Protocol]uint8{
	annotations.TCP:  6,
	annotations.UDP:  17,
	annotations.SCTP: 132,
}

// MatchConntrackFlow says whether flow is one of the pod's entries towards
// a destination outside Exclude, on one of Ports when Ports is set. SCTP
// entries, whose ports the netlink library does not read, match by
// protocol when Ports has an SCTP port.
func (f Flush) MatchConntrackFlow(flow *netlink.ConntrackFlow) bool {
	src, ok1 := addrFromIP(flow.Forward.SrcIP)
	dst, ok2 := addrFromIP(flow.Forward.DstIP)
	if !ok1 || !ok2 || src != f.PodIP.Unmap() {
		return false
	}
	for _, p := range f.Exclude {
		if p.Contains(dst) {
			return false
		}
	}
	if len(f.Ports) == 0 {
		return true
	}
	for _, p := range f.Ports {
		if protoNumbers[p.Protocol] != flow.Forward.Protocol {
			continue
		}
		// The netlink library reads ports of TCP and UDP entries only:
		// an SCTP entry has DstPort 0. Its flows then go by protocol and
		// addresses, so none survives a change of its pod's SNAT (other
		// SCTP flows of the pod are deleted too, and re-created by
		// their next packet under the same rules).
		if p.Port == flow.Forward.DstPort || (p.Protocol == annotations.SCTP && flow.Forward.DstPort == 0) {
			return true
		}
	}
	return false
}

func addrFromIP(ip net.IP) (netip.Addr, bool) {
	a, ok := netip.AddrFromSlice(ip)
	return a.Unmap(), ok
}

// translation is what a pod's rules do to its traffic: the source for all
// traffic (when some rule has no ports) and per (protocol, port) otherwise.
type translation struct {
	all   netip.Addr
	ports map[annotations.DestinationPort]netip.Addr
}

// translations computes, per pod, the source its packets get from the
// rendered chain, honouring first-match order.
func translations(d Desired) map[netip.Addr]*translation {
	out := make(map[netip.Addr]*translation, len(d.Rules))
	for _, r := range d.Rules {
		t := out[r.PodIP]
		if t == nil {
			t = &translation{}
			out[r.PodIP] = t
		}
		if t.all.IsValid() {
			continue // an earlier all-traffic rule shadows everything after it
		}
		if len(r.Ports) == 0 {
			t.all = r.SourceIP
			continue
		}
		if t.ports == nil {
			t.ports = make(map[annotations.DestinationPort]netip.Addr, len(r.Ports))
		}
		for _, p := range r.Ports {
			if _, seen := t.ports[p]; !seen {
				t.ports[p] = r.SourceIP
			}
		}
	}
	return out
}

// ConntrackFlushes returns, sorted by pod, the flushes needed when the rules
// of one family go from prev to next (both as forFamily returns them): a pod
// whose translation changed for some traffic gets its entries for that
// traffic deleted: the ports whose source changed, or all its entries when
// the source for all other traffic changed. Exclusions of both states stay.
func ConntrackFlushes(prev, next Desired) []Flush {
	exclude := append(slices.Clone(prev.Exclude), next.Exclude...)
	before, after := translations(prev), translations(next)
	pods := map[netip.Addr]bool{}
	for p := range before {
		pods[p] = true
	}
	for p := range after {
		pods[p] = true
	}
	var out []Flush
	for pod := range pods {
		b, a := before[pod], after[pod]
		if b == nil {
			b = &translation{}
		}
		if a == nil {
			a = &translation{}
		}
		if b.all != a.all {
			out = append(out, Flush{PodIP: pod, Exclude: exclude})
			continue
		}
		var ports []annotations.DestinationPort
		for p, s := range b.ports {
			if a.ports[p] != s {
				ports = append(ports, p)
			}
		}
		for p := range a.ports {
			if _, ok := b.ports[p]; !ok {
				ports = append(ports, p)
			}
		}
		if len(ports) > 0 {
			slices.SortFunc(ports, comparePort)
			out = append(out, Flush{PodIP: pod, Ports: ports, Exclude: exclude})
		}
	}
	slices.SortFunc(out, func(x, y Flush) int { return x.PodIP.Compare(y.PodIP) })
	return out
}
