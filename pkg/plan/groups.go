package plan

import (
	"net/netip"
	"slices"
	"strings"

	"k8s.io/apimachinery/pkg/types"

	"github.com/egressvip/egressvip/pkg/election"
	"github.com/egressvip/egressvip/pkg/model"
)

// group is a set of Services of one namespace linked by the addresses they
// share (a TCP and a UDP Service of one DNS server; a dual-stack Service's
// two addresses), elected as one: one node holds all its addresses.
type group struct {
	// key names the group: its first address. It ranks the candidates, so
	// every address of the group ranks them alike.
	key string
	// addrs are its addresses, sorted (IPv4 first).
	addrs []netip.Addr
	// services are its Services, sorted by key; anchor is the oldest one,
	// whose nodes serve the group when its Services' nodes are disjoint.
	services []*model.Service
	anchor   *model.Service
}

// groups links the valid Services by shared addresses. Admission already
// refused every address claimed across namespaces, so each group is of one
// namespace.
func groups(services []model.Service) []*group {
	parent := map[netip.Addr]netip.Addr{}
	var find func(a netip.Addr) netip.Addr
	find = func(a netip.Addr) netip.Addr {
		p, ok := parent[a]
		if !ok || p == a {
			parent[a] = a
			return a
		}
		r := find(p)
		parent[a] = r
		return r
	}
	union := func(a, b netip.Addr) {
		ra, rb := find(a), find(b)
		if ra == rb {
			return
		}
		if rb.Less(ra) {
			ra, rb = rb, ra
		}
		parent[rb] = ra
	}
	for i := range services {
		s := &services[i]
		if s.Invalid != "" {
			continue
		}
		addrs := s.Addresses()
		for _, a := range addrs {
			find(a)
			union(addrs[0], a)
		}
	}
	byRoot := map[netip.Addr]*group{}
	var out []*group
	for i := range services {
		s := &services[i]
		if s.Invalid != "" {
			continue
		}
		addrs := s.Addresses()
		if len(addrs) == 0 {
			continue
		}
		r := find(addrs[0])
		g := byRoot[r]
		if g == nil {
			g = &group{}
			byRoot[r] = g
			out = append(out, g)
		}
		g.services = append(g.services, s)
		for _, a := range addrs {
			if !slices.Contains(g.addrs, a) {
				g.addrs = append(g.addrs, a)
			}
		}
	}
	for _, g := range out {
		slices.SortFunc(g.addrs, compareAddrs)
		g.key = g.addrs[0].String()
		slices.SortFunc(g.services, func(a, b *model.Service) int { return model.CompareKeys(a.Key, b.Key) })
		g.anchor = slices.MinFunc(g.services, func(a, b *model.Service) int {
			if c := a.Created.Compare(b.Created); c != 0 {
				return c
			}
			return model.CompareKeys(a.Key, b.Key)
		})
	}
	slices.SortFunc(out, func(a, b *group) int { return strings.Compare(a.key, b.key) })
	return out
}

// compareAddrs orders IPv4 before IPv6, then by value.
func compareAddrs(a, b netip.Addr) int { return a.Compare(b) }

// addressLease is the address Lease of a.
func addressLease(ns string, a netip.Addr) types.NamespacedName {
	return types.NamespacedName{Namespace: ns, Name: election.AddressLeaseName(a)}
}

// namespace of the group (all its Services share it).
func (g *group) namespace() string { return g.services[0].Key.Namespace }

// pinned is true when no other node could hold the group: every Service of
// it has externalTrafficPolicy Local and ready endpoints only on self.
func (g *group) pinned(self string) bool {
	for _, s := range g.services {
		if !s.Pinned(self) {
			return false
		}
	}
	return true
}

// egress reports whether any Service of the group egresses.
func (g *group) egress() bool {
	return slices.ContainsFunc(g.services, func(s *model.Service) bool { return s.Egress })
}

// eligible lists, of the candidates, the nodes that may hold the group:
// those every Service of it accepts (any node for Cluster policy, a node
// with a ready endpoint for Local). When the Services' nodes are disjoint
// (Local policy, endpoints on different nodes) no node serves them all:
// the anchor's nodes hold the group, never a second node, and split is
// set.
func (g *group) eligible(candidates []string) (nodes []string, split bool) {
	// A Service no candidate can serve (Local, no ready endpoint
	// anywhere) constrains nothing: it is served nowhere anyway.
	var constraining []*model.Service
	for _, s := range g.services {
		if slices.ContainsFunc(candidates, s.ReadyOn) {
			constraining = append(constraining, s)
		}
	}
	if len(constraining) == 0 {
		return nil, false
	}
	for _, n := range candidates {
		if !slices.ContainsFunc(constraining, func(s *model.Service) bool { return !s.ReadyOn(n) }) {
			nodes = append(nodes, n)
		}
	}
	if len(nodes) > 0 {
		return nodes, false
	}
	// Disjoint: the oldest Service that can be served decides.
	first := slices.MinFunc(constraining, func(a, b *model.Service) int {
		if c := a.Created.Compare(b.Created); c != 0 {
			return c
		}
		return model.CompareKeys(a.Key, b.Key)
	})
	for _, n := range candidates {
		if first.ReadyOn(n) {
			nodes = append(nodes, n)
		}
	}
	return nodes, true
}
