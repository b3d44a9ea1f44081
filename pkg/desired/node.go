package desired

import (
	"fmt"
	"net/netip"
	"slices"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/pkg/snat"
)

// State is what the node's kernel should hold.
type State struct {
	// Addresses for the serviceInterface, sorted and unique.
	Addresses []netip.Addr
	SNAT      snat.Desired
	// Conflicts are Problems found across Services (a pod egressing
	// through two of them), by Service.
	Conflicts map[string][]Problem
}

// Build computes the node state from the Services this node owns.
func Build(owned []Service, exclude []netip.Prefix) State {
	st := State{SNAT: snat.Desired{Exclude: exclude}}
	byKey := func(a, b Service) int { return CompareKeys(a.Key, b.Key) }
	if !slices.IsSortedFunc(owned, byKey) {
		owned = slices.Clone(owned)
		slices.SortFunc(owned, byKey)
	}
	egressBy := make(map[netip.Addr]string, len(owned))
	st.SNAT.Rules = make([]snat.Rule, 0, len(owned))
	st.Addresses = make([]netip.Addr, 0, len(owned))
	for _, s := range owned {
		if s.fatal() {
			continue
		}
		st.Addresses = append(st.Addresses, s.Addresses()...)
		if !s.Egress {
			continue
		}
		key := s.Key.String()
		for _, ep := range s.LocalEndpoints {
			if ep.NoEgress != "" {
				continue
			}
			for _, pair := range [][2]netip.Addr{{ep.V4, s.LBv4}, {ep.V6, s.LBv6}} {
				pod, lb := pair[0], pair[1]
				if !pod.IsValid() || !lb.IsValid() || (pod.Is6() && !s.EgressIPv6) {
					continue
				}
				if other, taken := egressBy[pod]; taken && other != key {
					if st.Conflicts == nil {
						st.Conflicts = map[string][]Problem{}
					}
					st.Conflicts[key] = append(st.Conflicts[key], Problem{
						Reason:  EventEgressConflict,
						Message: fmt.Sprintf("pod %s (%s) already egresses through Service %s; no SNAT for it here", ep.Name, pod, other),
					})
					continue
				}
				egressBy[pod] = key
				st.SNAT.Rules = append(st.SNAT.Rules, snat.Rule{
					Service:  key,
					PodIP:    pod,
					SourceIP: lb,
					Ports:    slices.Clone(s.Ports),
				})
			}
		}
	}
	slices.SortFunc(st.Addresses, func(a, b netip.Addr) int { return a.Compare(b) })
	st.Addresses = slices.Compact(st.Addresses)
	return st
}

// Report is what the leader writes on a Service.
type Report struct {
	Ingress            []string
	VIPHost            string
	ActiveEndpoint     string
	ActiveEndpointIPv6 string
}

// Equal reports whether two reports are the same.
func (r Report) Equal(o Report) bool {
	return slices.Equal(r.Ingress, o.Ingress) && r.VIPHost == o.VIPHost &&
		r.ActiveEndpoint == o.ActiveEndpoint && r.ActiveEndpointIPv6 == o.ActiveEndpointIPv6
}

// ReportFor is the status and annotations the leader of s writes.
func ReportFor(s Service, node string) Report {
	r := Report{VIPHost: node}
	for _, a := range s.Addresses() {
		r.Ingress = append(r.Ingress, a.String())
	}
	if s.Egress && len(s.LocalEndpoints) > 0 {
		ep := s.LocalEndpoints[0]
		if s.LBv4.IsValid() && ep.V4.IsValid() {
			r.ActiveEndpoint = ep.V4.String()
		}
		if s.EgressIPv6 && ep.V6.IsValid() {
			r.ActiveEndpointIPv6 = ep.V6.String()
		}
	}
	return r
}

// Annotations maps each reported annotation to its value; "" means the
// annotation should be absent.
func (r Report) Annotations() map[string]string {
	return map[string]string{
		annotations.VIPHost:            r.VIPHost,
		annotations.ActiveEndpoint:     r.ActiveEndpoint,
		annotations.ActiveEndpointIPv6: r.ActiveEndpointIPv6,
	}
}
