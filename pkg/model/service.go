package model

import (
	"cmp"
	"net/netip"
	"slices"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/types"
)

// Problem is something wrong with a Service that its owner should see as a
// Warning Event. A Fatal problem means nothing is programmed for it.
type Problem struct {
	Reason  string
	Message string
	Fatal   bool
	// Transient problems may clear by themselves within moments (views of
	// EndpointSlices catching up); they are reported only if they last.
	Transient bool
}

// Endpoint is one pod of a Service, from its EndpointSlices or, for pods of
// this node, from the node's own pods.
type Endpoint struct {
	// Name is the pod's name (or its address when the slice names none).
	Name string
	// Node is the node the pod runs on ("" when unknown).
	Node   string
	V4, V6 netip.Addr
	// Ready: may receive new connections. Serving: a terminating pod that
	// still serves (kube-proxy's rule). A pod this node knows only from
	// its own pods (not ready yet, not in a slice yet) is neither.
	Ready, Serving, Terminating bool
	// Local is true for a pod of this node.
	Local bool
	// NoEgress says why the pod is not egressed ("" when it is): it could
	// not be shown to be a pod of the Service's namespace.
	NoEgress string
	// Unverified is true for another node's pod whose identity this node
	// has not confirmed yet: its steered traffic is held, not SNATed.
	Unverified bool
	// TargetKind and TargetNamespace are the slice's targetRef.
	TargetKind, TargetNamespace string
}

// Service is what a node needs to know about one LoadBalancer Service.
type Service struct {
	Key types.NamespacedName
	UID types.UID
	// Created is the Service's creationTimestamp (set by the API server).
	Created time.Time
	LBv4    netip.Addr
	LBv6    netip.Addr
	// Local is true for externalTrafficPolicy: Local.
	Local bool

	// Egress: the Service's pods leave with its address, for the families
	// EgressIPv4 and EgressIPv6 say; Filter narrows the destinations;
	// Strict drops their off-cluster traffic while no path to the address
	// exists.
	Egress     bool
	EgressIPv4 bool
	EgressIPv6 bool
	Filter     Filter
	Strict     bool
	// FlushConntrack deletes the pods' conntrack entries when their
	// translation changes (on by default; kube-vip.io/flush-conntrack).
	FlushConntrack bool

	// Endpoints are the Service's pods, this node's first, each sorted by
	// name.
	Endpoints []Endpoint
	// ReadyNodes are the nodes with a ready endpoint (or, on a node
	// without one, a terminating endpoint that still serves), sorted:
	// with externalTrafficPolicy Local the only nodes that may hold it.
	ReadyNodes []string
	// PendingLocal is true while a pod this Service selects is starting
	// on this node without an address yet.
	PendingLocal bool

	// Invalid says why nothing is programmed for the Service ("" when it
	// is valid).
	Invalid  string
	Problems []Problem
}

// Addresses returns the Service's LoadBalancer IPs, IPv4 first.
func (s *Service) Addresses() []netip.Addr {
	var out []netip.Addr
	for _, a := range []netip.Addr{s.LBv4, s.LBv6} {
		if a.IsValid() {
			out = append(out, a)
		}
	}
	return out
}

// LocalEndpoints are the Service's endpoints on this node.
func (s *Service) LocalEndpoints() []Endpoint {
	var out []Endpoint
	for _, e := range s.Endpoints {
		if e.Local {
			out = append(out, e)
		}
	}
	return out
}

// ReadyOn reports whether node may hold the Service under its traffic
// policy: any node for Cluster, a node with a ready endpoint for Local.
func (s *Service) ReadyOn(node string) bool {
	if !s.Local {
		return true
	}
	_, ok := slices.BinarySearch(s.ReadyNodes, node)
	return ok
}

// Pinned is true when no other node could hold the Service: its traffic
// policy is Local and every ready endpoint is on this node. Such a Service
// keeps its address through an API outage and across a daemon restart.
func (s *Service) Pinned(self string) bool {
	return s.Local && len(s.ReadyNodes) == 1 && s.ReadyNodes[0] == self
}

// Fatal reports whether a problem stops everything for the Service.
func (s *Service) Fatal() bool {
	return s.Invalid != "" || slices.ContainsFunc(s.Problems, func(p Problem) bool { return p.Fatal })
}

// CompareKeys orders Services by namespace, then name.
func CompareKeys(a, b types.NamespacedName) int {
	return cmp.Or(strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name))
}

// Host is what a node knows of its own serviceInterface: the addresses
// egressvip did not add, its on-link subnets and gateways, and whether it
// is up.
type Host struct {
	Own      []netip.Addr
	Subnets  []netip.Prefix
	Gateways []netip.Addr
	Up       bool
}
