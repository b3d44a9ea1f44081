// Package desired turns the cluster view of one node into the node state it
// should have: addresses on the serviceInterface and SNAT rules. Everything
// here is pure: no API calls, no kernel.
package desired

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/pkg/election"
)

// Reasons a node does not stand for a Service. They appear in logs and tests.
const (
	ReasonInvalid         = "invalid"
	ReasonNoAddress       = "noLoadBalancerIP"
	ReasonNoLocalEndpoint = "noLocalReadyEndpoint"
	ReasonNotLeader       = "notLeader"
	ReasonRenewalOverdue  = "leaseRenewalOverdue"
	ReasonRefused         = "loadBalancerIPRefused"
)

// Event reasons for problems with a Service's configuration.
const (
	EventInvalidAnnotation   = "InvalidAnnotation"
	EventInvalidAddress      = "InvalidLoadBalancerIP"
	EventNoAddress           = "NoLoadBalancerIP"
	EventFamilyMismatch      = "EgressFamilyMismatch"
	EventEgressNotSupported  = "EgressNotSupported"
	EventEgressConflict      = "EgressConflict"
	EventEndpointNotEgressed = "EndpointNotEgressed"
	EventAddressRefused      = "LoadBalancerIPRefused"
	EventAddressConflict     = "LoadBalancerIPConflict"
	EventExclusionMissing    = "EgressExclusionMissing"
)

// Problem is something wrong with a Service that the user should see as an
// Event. A Fatal problem means nothing is programmed for the Service.
type Problem struct {
	Reason  string
	Message string
	Fatal   bool
	// Transient problems may clear by themselves within moments (views of
	// EndpointSlices catching up); they are reported only if they last.
	Transient bool
}

// Endpoint is one ready endpoint pod of a Service.
type Endpoint struct {
	// Name identifies the endpoint (the pod's name, or its address).
	Name string
	Node string
	V4   netip.Addr
	V6   netip.Addr
	// Terminating is true for an endpoint that is terminating but still
	// serving: it is egressed only while the Service has no ready
	// endpoint on this node.
	Terminating bool
	// NoEgress says why the endpoint is not egressed ("" when it is): it
	// could not be shown to be a pod of the Service's namespace.
	NoEgress  string
	namespace string
	kind      string
}

// PodRef is what this node knows of one of its pods.
type PodRef struct {
	Namespace, Name string
	HostNetwork     bool
}

// Service is what this node needs to know about one LoadBalancer Service.
type Service struct {
	Key types.NamespacedName
	// Created is the Service's creationTimestamp; StatusIPs are the
	// addresses its status shows. Both decide which of two namespaces
	// claiming one address keeps it.
	Created   time.Time
	StatusIPs []netip.Addr
	// UID is the Service's, for the ownerReference of its Lease.
	UID   types.UID
	Lease types.NamespacedName
	LBv4  netip.Addr
	LBv6  netip.Addr
	// Local is true for externalTrafficPolicy: Local.
	Local      bool
	Egress     bool
	EgressIPv6 bool
	Ports      []annotations.DestinationPort
	// LocalEndpoints are the ready endpoints on this node, sorted by name.
	LocalEndpoints []Endpoint
	// RemoteReady counts ready endpoints on other nodes.
	RemoteReady int
	// ReadyNodes are the nodes with a ready endpoint, sorted: with
	// externalTrafficPolicy Local the only nodes that may serve it.
	ReadyNodes []string
	// Stand says whether this node is a candidate; Reason says why not.
	Stand    bool
	Reason   string
	Problems []Problem
}

// Options are the node-wide settings Analyze needs.
type Options struct {
	Node string
	// Election is svc_election. Without it one cluster-wide Lease decides
	// for every Service, and egress is refused.
	Election    bool
	GlobalLease types.NamespacedName
	// PodCIDRs are the cluster's pod ranges: an endpoint outside them is
	// not egressed.
	PodCIDRs []netip.Prefix
	// NodeAddresses are every Node's addresses: never egressed.
	NodeAddresses map[netip.Addr]bool
	// LocalPod finds this node's pod by address: an endpoint is egressed
	// only if its address is one of a pod of the Service's namespace.
	// Nil disables that check (unit tests of other things).
	LocalPod func(netip.Addr) (PodRef, bool)
	// MissingIPv6 names the IPv6 exclusions no range is known for
	// ("pod", "Service"): IPv6 egress would SNAT traffic to those too.
	MissingIPv6 []string
}

// CompareKeys orders Services by namespace, then name.
func CompareKeys(a, b types.NamespacedName) int {
	if c := strings.Compare(a.Namespace, b.Namespace); c != 0 {
		return c
	}
	return strings.Compare(a.Name, b.Name)
}

// Addresses returns the Service's LoadBalancer IPs, IPv4 first.
func (s Service) Addresses() []netip.Addr {
	var out []netip.Addr
	for _, a := range []netip.Addr{s.LBv4, s.LBv6} {
		if a.IsValid() {
			out = append(out, a)
		}
	}
	return out
}

// Pinned is true when no other node could serve the Service: its traffic
// policy is Local and every ready endpoint is on this node. Such a Service
// keeps its datapath through an API outage and across a daemon restart.
func (s Service) Pinned() bool {
	return s.Local && s.RemoteReady == 0 && len(s.LocalEndpoints) > 0
}

func (s Service) fatal() bool {
	return slices.ContainsFunc(s.Problems, func(p Problem) bool { return p.Fatal })
}

// Analyze reads one Service and its EndpointSlices from this node's view.
func Analyze(svc *corev1.Service, epSlices []*discoveryv1.EndpointSlice, opts Options) Service {
	s := Service{
		Key:     types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name},
		UID:     svc.UID,
		Lease:   types.NamespacedName{Namespace: svc.Namespace, Name: election.LeaseName(svc.Name)},
		Local:   svc.Spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal,
		Created: svc.CreationTimestamp.Time,
	}
	for _, ing := range svc.Status.LoadBalancer.Ingress {
		if a, err := netip.ParseAddr(ing.IP); err == nil {
			s.StatusIPs = append(s.StatusIPs, a.Unmap())
		}
	}
	if !opts.Election {
		s.Lease = opts.GlobalLease
	}
	problem := func(fatal bool, reason, format string, args ...any) {
		s.Problems = append(s.Problems, Problem{Reason: reason, Message: fmt.Sprintf(format, args...), Fatal: fatal})
	}

	var err error
	if s.LBv4, s.LBv6, err = annotations.ServiceLoadBalancerIPs(svc); err != nil {
		problem(true, EventInvalidAddress, "%v", err)
	}
	if s.Egress, err = annotations.EgressEnabled(svc); err != nil {
		problem(true, EventInvalidAnnotation, "%v", err)
	}
	if s.EgressIPv6, err = annotations.EgressIPv6Enabled(svc); err != nil {
		problem(true, EventInvalidAnnotation, "%v", err)
	}
	if s.Ports, err = annotations.ParseDestinationPorts(svc.Annotations[annotations.EgressDestinationPorts]); err != nil {
		problem(true, EventInvalidAnnotation, "%s: %v", annotations.EgressDestinationPorts, err)
	}
	s.LocalEndpoints, s.RemoteReady, s.ReadyNodes = readyEndpoints(epSlices, opts.Node)
	if s.Egress {
		s.checkTrust(svc.Namespace, opts)
	}

	if s.Egress {
		switch {
		case !opts.Election:
			problem(false, EventEgressNotSupported, "egress needs per-Service election (svc_election=true); serving the address without egress")
			s.Egress, s.EgressIPv6 = false, false
		case !s.Local:
			problem(false, EventEgressNotSupported, "egress needs externalTrafficPolicy: Local, so the address follows the pod; serving the address without egress")
			s.Egress, s.EgressIPv6 = false, false
		}
	}
	if s.Egress && !s.fatal() {
		s.checkFamilies(problem)
	}
	if s.EgressIPv6 && len(opts.MissingIPv6) > 0 {
		problem(false, EventExclusionMissing, "no IPv6 %s CIDR is known, so IPv6 egress would also SNAT traffic to those: set egress_podcidr / egress_servicecidr with IPv6 ranges",
			strings.Join(opts.MissingIPv6, " or "))
	}

	switch {
	case s.fatal():
		s.Reason = ReasonInvalid
	case !s.LBv4.IsValid() && !s.LBv6.IsValid():
		s.Reason = ReasonNoAddress
		// An IP allocator (kube-vip-cloud-provider) writes the address
		// tens of milliseconds after the Service is created: reported
		// only if it lasts.
		s.Problems = append(s.Problems, Problem{Reason: EventNoAddress, Transient: true,
			Message: fmt.Sprintf("no LoadBalancer IP: set %s or spec.loadBalancerIP", annotations.LoadBalancerIPs)})
	case s.Local && len(s.LocalEndpoints) == 0:
		s.Reason = ReasonNoLocalEndpoint
	default:
		s.Stand = true
	}
	return s
}

// checkFamilies reports egress that asks for a family the Service or its
// local pods lack. A Service without the LoadBalancer IP of a family it
// asks for is misconfigured: nothing is programmed for it. A pod without
// an address of that family only misses that family's SNAT: each family's
// EndpointSlice is its own object, updated on its own, so a pod may be
// missing from one for a moment, and that must not tear down the
// Service's address and its other family's egress.
func (s *Service) checkFamilies(problem func(bool, string, string, ...any)) {
	if s.EgressIPv6 && !s.LBv6.IsValid() {
		problem(true, EventFamilyMismatch, "%s is true but the Service has no IPv6 LoadBalancer IP", annotations.EgressIPv6)
	}
	if !s.EgressIPv6 && !s.LBv4.IsValid() && s.LBv6.IsValid() {
		problem(true, EventFamilyMismatch, "egress with only an IPv6 LoadBalancer IP needs %s: \"true\"", annotations.EgressIPv6)
	}
	podLacks := func(format string, args ...any) {
		s.Problems = append(s.Problems, Problem{Reason: EventFamilyMismatch, Message: fmt.Sprintf(format, args...), Transient: true})
	}
	for _, ep := range s.LocalEndpoints {
		if ep.NoEgress != "" {
			continue
		}
		if s.LBv4.IsValid() && !ep.V4.IsValid() {
			podLacks("endpoint %s has no IPv4 address: no IPv4 egress for it", ep.Name)
		}
		if s.EgressIPv6 && !ep.V6.IsValid() {
			podLacks("%s is true but endpoint %s has no IPv6 address: no IPv6 egress for it", annotations.EgressIPv6, ep.Name)
		}
	}
}

// checkTrust marks the local endpoints that are not egressed: an egress
// address is an identity, so it is lent only to pods of the Service's own
// namespace. A hand-written EndpointSlice may name any address and any
// targetRef; the address must belong to a pod of this node in the
// Service's namespace, lie inside the pod CIDRs and not be a Node's (a
// hostNetwork pod's traffic is the node's own).
func (s *Service) checkTrust(namespace string, opts Options) {
	for i := range s.LocalEndpoints {
		ep := &s.LocalEndpoints[i]
		why, transient := endpointTrust(*ep, namespace, opts)
		if why == "" {
			continue
		}
		ep.NoEgress = why
		s.Problems = append(s.Problems, Problem{
			Reason:    EventEndpointNotEgressed,
			Message:   fmt.Sprintf("endpoint %s is not egressed: %s; its traffic keeps the node address", ep.Name, why),
			Transient: transient,
		})
	}
}

// endpointTrust says why an endpoint may not be egressed ("" if it may);
// transient is true when the node's pod cache may only be behind.
func endpointTrust(ep Endpoint, namespace string, opts Options) (string, bool) {
	if ep.kind != "Pod" || (ep.namespace != "" && ep.namespace != namespace) {
		return "its targetRef is not a Pod of namespace " + namespace, false
	}
	for _, a := range []netip.Addr{ep.V4, ep.V6} {
		if !a.IsValid() {
			continue
		}
		if opts.NodeAddresses[a] {
			return a.String() + " is a Node's address (hostNetwork)", false
		}
		if !slices.ContainsFunc(opts.PodCIDRs, func(p netip.Prefix) bool { return p.Contains(a) }) {
			return a.String() + " is outside the pod CIDRs", false
		}
		if opts.LocalPod == nil {
			continue
		}
		pod, ok := opts.LocalPod(a)
		switch {
		case !ok:
			return a.String() + " is not the address of a pod on this node", true
		case pod.HostNetwork:
			return a.String() + " belongs to a hostNetwork pod", false
		case pod.Namespace != namespace:
			return a.String() + " belongs to a pod of another namespace", false
		}
	}
	return "", false
}

// ready is the EndpointSlice rule for "may receive new traffic": ready
// (nil counts as ready) and not terminating.
func ready(c discoveryv1.EndpointConditions) bool {
	return (c.Ready == nil || *c.Ready) && (c.Terminating == nil || !*c.Terminating)
}

// servingTerminating is an endpoint that is going away but still serves
// (kube-proxy's rule for terminating endpoints).
func servingTerminating(c discoveryv1.EndpointConditions) bool {
	return c.Terminating != nil && *c.Terminating && c.Serving != nil && *c.Serving
}

// readyEndpoints joins the IPv4 and IPv6 slices of a Service by pod and
// splits the ready endpoints into this node's and a count of the others; it
// also lists the nodes that have one. Like kube-proxy, terminating
// endpoints that still serve stand in for ready ones while this node has
// no ready endpoint: a pod keeps its egress address for its grace period.
func readyEndpoints(epSlices []*discoveryv1.EndpointSlice, node string) ([]Endpoint, int, []string) {
	byName := map[string]*Endpoint{}
	for _, sl := range epSlices {
		for _, ep := range sl.Endpoints {
			isReady := ready(ep.Conditions)
			if (!isReady && !servingTerminating(ep.Conditions)) || len(ep.Addresses) == 0 {
				continue
			}
			addr, err := netip.ParseAddr(ep.Addresses[0])
			if err != nil {
				continue
			}
			addr = addr.Unmap()
			name := addr.String()
			if ep.TargetRef != nil && ep.TargetRef.Name != "" {
				name = ep.TargetRef.Name
			}
			e, ok := byName[name]
			if !ok {
				e = &Endpoint{Name: name, Terminating: !isReady}
				if ep.TargetRef != nil {
					e.kind, e.namespace = ep.TargetRef.Kind, ep.TargetRef.Namespace
				}
				byName[name] = e
			}
			if !isReady {
				e.Terminating = true
			}
			if ep.NodeName != nil {
				e.Node = *ep.NodeName
			}
			if addr.Is4() {
				e.V4 = addr
			} else {
				e.V6 = addr
			}
		}
	}
	var local, terminating []Endpoint
	var nodes []string
	remote := 0
	for _, e := range byName {
		switch {
		case e.Terminating && e.Node == node:
			terminating = append(terminating, *e)
		case e.Terminating:
		case e.Node == node:
			local = append(local, *e)
			nodes = append(nodes, e.Node)
		default:
			remote++
			if e.Node != "" {
				nodes = append(nodes, e.Node)
			}
		}
	}
	if len(local) == 0 && len(terminating) > 0 {
		local = terminating
		nodes = append(nodes, node)
	}
	slices.SortFunc(local, func(a, b Endpoint) int { return strings.Compare(a.Name, b.Name) })
	slices.Sort(nodes)
	return local, remote, slices.Compact(nodes)
}
