// Package desired reads one Service and its endpoints from a node's view of
// the cluster (Analyze) and decides which LoadBalancer IPs it may claim
// (Admit). Everything here is pure: no API calls, no kernel. The planner
// (pkg/plan) turns the result into the node's state.
package desired

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/pkg/model"
)

// Reasons nothing is programmed for a Service. They appear in logs, Events
// and tests.
const (
	ReasonInvalid   = "invalid"
	ReasonNoAddress = "noLoadBalancerIP"
	ReasonRefused   = "loadBalancerIPRefused"
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

// PodRef is what a node knows of one pod.
type PodRef struct {
	Namespace, Name string
	HostNetwork     bool
	// IPs are the pod's addresses (none while it starts).
	IPs []netip.Addr
	// Terminating is set once the pod is being deleted.
	Terminating bool
	// Shared is true when another pod this node knows has one of the same
	// addresses: such an address is trusted for neither.
	Shared bool
}

// Verdict is what a node could find out about another node's pod.
type Verdict uint8

// Verdicts on a remote endpoint.
const (
	// Unknown: not confirmed yet (a read is under way).
	Unknown Verdict = iota
	// Trusted: a pod of the Service's namespace with that address, on
	// that node, not on the host network.
	Trusted
	// Refused: not such a pod.
	Refused
)

// Options are the node-wide settings and lookups Analyze needs.
type Options struct {
	Node string
	// PodCIDRs are the cluster's pod ranges: an endpoint outside them is
	// not egressed.
	PodCIDRs []netip.Prefix
	// NodeAddresses are every Node's addresses: never egressed.
	NodeAddresses map[netip.Addr]bool
	// LocalPod finds this node's pod by address. Nil disables the check
	// (unit tests of other things).
	LocalPod func(netip.Addr) (PodRef, bool)
	// LocalPods lists this node's pods of a namespace that a selector
	// selects, also those still starting without an address. Nil: none.
	LocalPods func(namespace string, selector labels.Selector) []PodRef
	// RemotePod says whether another node's endpoint is a pod of the
	// namespace with that address on that node (see Verdict). Nil trusts
	// what the EndpointSlice says (unit tests of other things).
	RemotePod func(namespace, name, node string, addr netip.Addr) (Verdict, string)
	// Holds says whether this node holds an address (its address Lease
	// names it). Another node's endpoints are confirmed (RemotePod) only
	// where they may be steered to this node: it may hold the Service
	// (any node for Cluster policy, a node with a ready endpoint for
	// Local) or holds one of its addresses (a shared address held for
	// another Service). Elsewhere they stay unverified and cost no read.
	// Nil: everywhere.
	Holds func(netip.Addr) bool
	// MissingIPv6 names the IPv6 exclusions no range is known for
	// ("pod", "Service"): IPv6 egress would SNAT traffic to those too.
	MissingIPv6 []string
}

// Analyze reads one Service and its EndpointSlices from this node's view.
func Analyze(svc *corev1.Service, epSlices []*discoveryv1.EndpointSlice, opts Options) model.Service {
	s := model.Service{
		Key:            types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name},
		UID:            svc.UID,
		Local:          svc.Spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal,
		Created:        svc.CreationTimestamp.Time,
		FlushConntrack: true,
	}
	problem := func(fatal bool, reason, format string, args ...any) {
		s.Problems = append(s.Problems, model.Problem{Reason: reason, Message: fmt.Sprintf(format, args...), Fatal: fatal})
	}

	var err error
	if s.LBv4, s.LBv6, err = annotations.ServiceLoadBalancerIPs(svc); err != nil {
		problem(true, EventInvalidAddress, "%v", err)
	}
	parseEgress(&s, svc, problem)
	s.Endpoints, s.ReadyNodes = endpoints(epSlices, opts.Node)
	if s.Egress {
		addLocalPods(&s, svc, opts)
		checkTrust(&s, opts)
		if !s.Fatal() {
			checkFamilies(&s)
		}
		if s.EgressIPv6 && len(opts.MissingIPv6) > 0 {
			problem(false, EventExclusionMissing, "no IPv6 %s CIDR is known, so IPv6 egress would also SNAT traffic to those: set egress_podcidr / egress_servicecidr with IPv6 ranges",
				strings.Join(opts.MissingIPv6, " or "))
		}
	}

	switch {
	case s.Fatal():
		s.Invalid = ReasonInvalid
	case !s.LBv4.IsValid() && !s.LBv6.IsValid():
		s.Invalid = ReasonNoAddress
		// An IP allocator (kube-vip-cloud-provider, or egressvip's own)
		// writes the address tens of milliseconds after the Service is
		// created: reported only if it lasts.
		s.Problems = append(s.Problems, model.Problem{Reason: EventNoAddress, Transient: true,
			Message: fmt.Sprintf("no LoadBalancer IP: set %s or spec.loadBalancerIP", annotations.LoadBalancerIPs)})
	}
	return s
}

// parseEgress reads the egress annotations. Any problem with them is
// fatal for egress: egressvip never SNATs more than the user asked for.
func parseEgress(s *model.Service, svc *corev1.Service, problem func(bool, string, string, ...any)) {
	e, problems := annotations.ParseEgress(svc.Annotations)
	for _, p := range problems {
		problem(p.Fatal, p.Reason, "%s", p.Message)
	}
	s.Egress, s.EgressIPv4, s.EgressIPv6, s.Strict = e.IPv4 || e.IPv6, e.IPv4, e.IPv6, e.Strict
	s.FlushConntrack = e.FlushConntrack
	s.Filter = model.Filter{Ports: e.Ports, Allow: e.Allow, Deny: e.Deny}
}

// addLocalPods adds this node's pods the Service selects that no slice
// lists yet: a pod egresses from its first packet, as soon as it has an
// address, not once it is Ready. A selected pod still without an address
// makes the node hold back unknown pods' traffic (model.Gate).
func addLocalPods(s *model.Service, svc *corev1.Service, opts Options) {
	if opts.LocalPods == nil || len(svc.Spec.Selector) == 0 {
		return
	}
	listed := map[netip.Addr]bool{}
	for _, e := range s.Endpoints {
		if e.Local {
			for _, a := range []netip.Addr{e.V4, e.V6} {
				if a.IsValid() {
					listed[a] = true
				}
			}
		}
	}
	var added []model.Endpoint
	for _, p := range opts.LocalPods(svc.Namespace, labels.SelectorFromSet(svc.Spec.Selector)) {
		if p.HostNetwork {
			continue
		}
		if len(p.IPs) == 0 {
			s.PendingLocal = true
			continue
		}
		if p.Terminating || slices.ContainsFunc(p.IPs, func(a netip.Addr) bool { return listed[a] }) {
			// A slice lists it (with its conditions), or it is going
			// away and no slice says it still serves.
			continue
		}
		e := model.Endpoint{Name: p.Name, Node: opts.Node, Local: true, TargetKind: "Pod", TargetNamespace: p.Namespace}
		for _, a := range p.IPs {
			if a.Is4() && !e.V4.IsValid() {
				e.V4 = a
			} else if a.Is6() && !e.V6.IsValid() {
				e.V6 = a
			}
		}
		added = append(added, e)
	}
	if len(added) == 0 {
		return
	}
	s.Endpoints = append(s.Endpoints, added...)
	sortEndpoints(s.Endpoints)
}

// sortEndpoints puts this node's endpoints first, each part by name.
func sortEndpoints(eps []model.Endpoint) {
	slices.SortFunc(eps, func(a, b model.Endpoint) int {
		if a.Local != b.Local {
			if a.Local {
				return -1
			}
			return 1
		}
		return strings.Compare(a.Name, b.Name)
	})
}

// checkFamilies reports egress that asks for a family the Service or its
// local pods lack. A Service without the LoadBalancer IP of a family it
// asks for is misconfigured: nothing is programmed for it. A pod without
// an address of that family only misses that family's SNAT: each family's
// EndpointSlice is its own object, updated on its own, so a pod may be
// missing from one for a moment, and that must not tear down the
// Service's address and its other family's egress.
func checkFamilies(s *model.Service) {
	if s.EgressIPv6 && !s.LBv6.IsValid() {
		s.Problems = append(s.Problems, model.Problem{Reason: EventFamilyMismatch, Fatal: true,
			Message: fmt.Sprintf("IPv6 egress (%s or %s) but the Service has no IPv6 LoadBalancer IP", annotations.EgressIPv6, annotations.EgressFamilies)})
	}
	if s.EgressIPv4 && !s.LBv4.IsValid() {
		s.Problems = append(s.Problems, model.Problem{Reason: EventFamilyMismatch, Fatal: true,
			Message: fmt.Sprintf("IPv4 egress but the Service has no IPv4 LoadBalancer IP: set %s: \"true\" for IPv6 egress (or %s)", annotations.EgressIPv6, annotations.EgressFamilies)})
	}
	for _, ep := range s.Endpoints {
		if !ep.Local || ep.NoEgress != "" {
			continue
		}
		if s.EgressIPv4 && !ep.V4.IsValid() {
			s.Problems = append(s.Problems, model.Problem{Reason: EventFamilyMismatch, Transient: true,
				Message: fmt.Sprintf("endpoint %s has no IPv4 address: no IPv4 egress for it", ep.Name)})
		}
		if s.EgressIPv6 && !ep.V6.IsValid() {
			s.Problems = append(s.Problems, model.Problem{Reason: EventFamilyMismatch, Transient: true,
				Message: fmt.Sprintf("IPv6 egress but endpoint %s has no IPv6 address: no IPv6 egress for it", ep.Name)})
		}
	}
}

// checkTrust marks the endpoints that are not egressed: an egress address
// is an identity, so it is lent only to pods of the Service's own
// namespace. A hand-written EndpointSlice may name any address and any
// targetRef. A pod of this node must be one of the node's own pods (its
// pod cache, which a slice cannot fake) in the Service's namespace, inside
// the pod CIDRs, not a Node's address, and its address must belong to no
// other pod. Another node's pod is confirmed by reading the pod itself
// (RemotePod); until then its steered traffic is held, not SNATed.
func checkTrust(s *model.Service, opts Options) {
	holds := func(a netip.Addr) bool { return a.IsValid() && opts.Holds(a) }
	// Where nothing of the Service is steered to this node, another node's
	// endpoints are not read and stay unverified.
	confirm := opts.Holds == nil || s.ReadyOn(opts.Node) || holds(s.LBv4) || holds(s.LBv6)
	for i := range s.Endpoints {
		ep := &s.Endpoints[i]
		why, transient := endpointTrust(*ep, s.Key.Namespace, opts)
		if why == "" && !ep.Local && opts.RemotePod != nil {
			verdict, reason := Unknown, ""
			for _, a := range []netip.Addr{ep.V4, ep.V6} {
				if a.IsValid() && confirm {
					if verdict, reason = opts.RemotePod(s.Key.Namespace, ep.Name, ep.Node, a); verdict != Trusted {
						break
					}
				}
			}
			switch verdict {
			case Unknown:
				ep.Unverified = true
			case Refused:
				why = reason
			}
		}
		if why == "" {
			continue
		}
		ep.NoEgress = why
		s.Problems = append(s.Problems, model.Problem{
			Reason:    EventEndpointNotEgressed,
			Message:   fmt.Sprintf("endpoint %s is not egressed: %s; its traffic keeps the node address", ep.Name, why),
			Transient: transient,
		})
	}
}

// endpointTrust says why an endpoint may not be egressed ("" if it may);
// transient is true when the node's pod cache may only be behind.
func endpointTrust(ep model.Endpoint, namespace string, opts Options) (string, bool) {
	if ep.TargetKind != "Pod" || (ep.TargetNamespace != "" && ep.TargetNamespace != namespace) {
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
		if !ep.Local || opts.LocalPod == nil {
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
		case pod.Shared:
			return a.String() + " is the address of more than one pod on this node", true
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

// endpoints joins the IPv4 and IPv6 slices of a Service by pod. It keeps
// every endpoint that has an address and is not terminating without
// serving: a pod that is not ready yet still egresses (from its first
// packet). ReadyNodes are the nodes with a ready endpoint and, like
// kube-proxy, the nodes whose only endpoints are terminating but still
// serve.
func endpoints(epSlices []*discoveryv1.EndpointSlice, node string) ([]model.Endpoint, []string) {
	byName := map[string]*model.Endpoint{}
	var order []string
	for _, sl := range epSlices {
		for _, ep := range sl.Endpoints {
			if len(ep.Addresses) == 0 {
				continue
			}
			// Terminating pods stay: their traffic keeps its egress
			// address for their grace period.
			term := ep.Conditions.Terminating != nil && *ep.Conditions.Terminating
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
				e = &model.Endpoint{Name: name, Ready: true, Serving: true}
				if ep.TargetRef != nil {
					e.TargetKind, e.TargetNamespace = ep.TargetRef.Kind, ep.TargetRef.Namespace
				}
				byName[name] = e
				order = append(order, name)
			}
			// Both families must agree for the pod to count as ready.
			e.Ready = e.Ready && ready(ep.Conditions)
			e.Serving = e.Serving && (ready(ep.Conditions) || servingTerminating(ep.Conditions))
			e.Terminating = e.Terminating || term
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
	out := make([]model.Endpoint, 0, len(order))
	ready := map[string]bool{}
	serving := map[string]bool{}
	for _, name := range order {
		e := byName[name]
		if !e.Ready && !e.Terminating {
			// Not ready yet: egresses, but does not make its node
			// eligible.
			e.Serving = false
		}
		e.Local = e.Node == node
		if e.Ready {
			ready[e.Node] = true
		} else if e.Serving {
			serving[e.Node] = true
		}
		out = append(out, *e)
	}
	var nodes []string
	for n := range ready {
		if n != "" {
			nodes = append(nodes, n)
		}
	}
	for n := range serving {
		if n != "" && !ready[n] {
			nodes = append(nodes, n)
		}
	}
	slices.Sort(nodes)
	sortEndpoints(out)
	return out, nodes
}
