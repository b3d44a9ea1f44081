package desired

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/pkg/model"
)

const node = "node-a"

var podCIDRs = []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("fd00:10:244::/56")}

var opts = Options{Node: node, PodCIDRs: podCIDRs}

func svc(name string, local bool, ann map[string]string) *corev1.Service {
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name, Annotations: ann},
		Spec:       corev1.ServiceSpec{Type: corev1.ServiceTypeLoadBalancer, Selector: map[string]string{"app": name}},
	}
	if local {
		s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
	} else {
		s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyCluster
	}
	return s
}

type ep struct {
	pod, node, addr string
	ready           bool
	terminating     bool
	serving         *bool
}

func slice(svcName string, family discoveryv1.AddressType, eps ...ep) *discoveryv1.EndpointSlice {
	sl := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "default", Name: svcName + "-" + strings.ToLower(string(family)), Labels: map[string]string{discoveryv1.LabelServiceName: svcName}},
		AddressType: family,
	}
	for _, e := range eps {
		sl.Endpoints = append(sl.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{e.addr},
			NodeName:   &e.node,
			TargetRef:  &corev1.ObjectReference{Kind: "Pod", Name: e.pod},
			Conditions: discoveryv1.EndpointConditions{Ready: &e.ready, Terminating: &e.terminating, Serving: e.serving},
		})
	}
	return sl
}

func egressAnn(ips string, extra ...string) map[string]string {
	m := map[string]string{annotations.LoadBalancerIPs: ips, annotations.Egress: "true"}
	for i := 0; i+1 < len(extra); i += 2 {
		m[extra[i]] = extra[i+1]
	}
	return m
}

func hasProblem(s model.Service, reason string) bool {
	return slices.ContainsFunc(s.Problems, func(p model.Problem) bool { return p.Reason == reason })
}

var (
	localPod  = ep{pod: "a-1", node: node, addr: "10.244.1.5", ready: true}
	remotePod = ep{pod: "a-2", node: "node-b", addr: "10.244.2.5", ready: true}
	yes       = true
	no        = false
)

func TestAnalyzeValidity(t *testing.T) {
	for _, tc := range []struct {
		name        string
		svc         *corev1.Service
		wantInvalid string
		wantEvent   string
	}{
		{name: "a plain Service", svc: svc("a", false, map[string]string{annotations.LoadBalancerIPs: "203.0.113.10"})},
		{name: "egress with Cluster policy is possible now", svc: svc("a", false, egressAnn("203.0.113.10"))},
		{name: "no address", svc: svc("a", true, nil), wantInvalid: ReasonNoAddress, wantEvent: EventNoAddress},
		{name: "a bad address", svc: svc("a", true, map[string]string{annotations.LoadBalancerIPs: "nope"}), wantInvalid: ReasonInvalid, wantEvent: EventInvalidAddress},
		{name: "a bad port filter", svc: svc("a", true, egressAnn("203.0.113.10", annotations.EgressDestinationPorts, "tcp:70000")),
			wantInvalid: ReasonInvalid, wantEvent: annotations.ReasonInvalid},
		{name: "an unknown egress annotation is refused, never widened", svc: svc("a", true, egressAnn("203.0.113.10", "kube-vip.io/egress-foo", "bar")),
			wantInvalid: ReasonInvalid, wantEvent: annotations.ReasonUnknown},
		{name: "IPv6 egress without an IPv6 address", svc: svc("a", true, egressAnn("203.0.113.10", annotations.EgressIPv6, "true")),
			wantInvalid: ReasonInvalid, wantEvent: EventFamilyMismatch},
		{name: "IPv4 egress without an IPv4 address", svc: svc("a", true, egressAnn("2001:db8:1::10")),
			wantInvalid: ReasonInvalid, wantEvent: EventFamilyMismatch},
		{name: "IPv6 egress, kube-vip's way", svc: svc("a", true, egressAnn("2001:db8:1::10", annotations.EgressIPv6, "true"))},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := Analyze(tc.svc, []*discoveryv1.EndpointSlice{slice("a", discoveryv1.AddressTypeIPv4, localPod)}, opts)
			if s.Invalid != tc.wantInvalid {
				t.Fatalf("invalid %q, want %q (problems %+v)", s.Invalid, tc.wantInvalid, s.Problems)
			}
			if tc.wantEvent != "" && !hasProblem(s, tc.wantEvent) {
				t.Fatalf("problems %+v lack %s", s.Problems, tc.wantEvent)
			}
		})
	}
}

// Every pod egresses, ready or not; only ready ones (or, on a node without
// one, terminating ones that still serve) make their node eligible.
func TestEndpointsAndReadyNodes(t *testing.T) {
	notReady := ep{pod: "starting", node: "node-c", addr: "10.244.3.5"}
	termServing := ep{pod: "old", node: "node-d", addr: "10.244.4.5", terminating: true, serving: &yes}
	termDone := ep{pod: "done", node: "node-e", addr: "10.244.5.5", terminating: true, serving: &no}
	s := Analyze(svc("a", true, egressAnn("203.0.113.10")), []*discoveryv1.EndpointSlice{
		slice("a", discoveryv1.AddressTypeIPv4, localPod, remotePod, notReady, termServing, termDone)}, opts)
	var names []string
	for _, e := range s.Endpoints {
		names = append(names, e.Name)
	}
	if want := []string{"a-1", "a-2", "done", "old", "starting"}; !slices.Equal(names, want) {
		t.Errorf("endpoints %v, want %v (this node's first)", names, want)
	}
	if want := []string{"node-a", "node-b", "node-d"}; !slices.Equal(s.ReadyNodes, want) {
		t.Errorf("ready nodes %v, want %v", s.ReadyNodes, want)
	}
	if !s.Endpoints[0].Local || s.Endpoints[1].Local {
		t.Errorf("local flags %+v", s.Endpoints[:2])
	}
}

// A pod the Service selects egresses from its first packet, before any
// slice lists it; one still without an address makes the node hold back
// unknown pods (PendingLocal).
func TestLocalPodsSelectedBeforeTheSlice(t *testing.T) {
	o := opts
	o.LocalPods = func(ns string, sel labels.Selector) []PodRef {
		if ns != "default" || !sel.Matches(labels.Set{"app": "a"}) {
			return nil
		}
		return []PodRef{
			{Namespace: "default", Name: "a-1", IPs: []netip.Addr{netip.MustParseAddr("10.244.1.5")}},
			{Namespace: "default", Name: "a-new", IPs: []netip.Addr{netip.MustParseAddr("10.244.1.9")}},
			{Namespace: "default", Name: "a-pending"},
		}
	}
	o.LocalPod = func(a netip.Addr) (PodRef, bool) { return PodRef{Namespace: "default", Name: "p"}, true }
	s := Analyze(svc("a", true, egressAnn("203.0.113.10")), []*discoveryv1.EndpointSlice{slice("a", discoveryv1.AddressTypeIPv4, localPod)}, o)
	var local []string
	for _, e := range s.LocalEndpoints() {
		local = append(local, e.Name+"="+e.V4.String())
	}
	if want := []string{"a-1=10.244.1.5", "a-new=10.244.1.9"}; !slices.Equal(local, want) {
		t.Errorf("local endpoints %v, want %v", local, want)
	}
	if !s.PendingLocal {
		t.Error("a selected pod without an address must make PendingLocal true")
	}
	if slices.Contains(s.ReadyNodes, "") {
		t.Errorf("ready nodes %v", s.ReadyNodes)
	}
}

func TestEndpointTrust(t *testing.T) {
	pods := map[string]PodRef{
		"10.244.1.5": {Namespace: "default", Name: "a-1"},
		"10.244.1.6": {Namespace: "other", Name: "x"},
		"10.244.1.7": {Namespace: "default", Name: "h", HostNetwork: true},
		"10.244.1.8": {Namespace: "default", Name: "dup", Shared: true},
	}
	o := opts
	o.NodeAddresses = map[netip.Addr]bool{netip.MustParseAddr("198.51.100.11"): true}
	o.LocalPod = func(a netip.Addr) (PodRef, bool) { p, ok := pods[a.String()]; return p, ok }
	o.RemotePod = func(ns, name, node string, a netip.Addr) (Verdict, string) {
		switch name {
		case "r-ok":
			return Trusted, ""
		case "r-bad":
			return Refused, "there is no pod default/r-bad"
		}
		return Unknown, ""
	}
	for _, tc := range []struct {
		name       string
		ep         ep
		noEgress   bool
		unverified bool
	}{
		{name: "a pod of the namespace on this node", ep: localPod},
		{name: "another namespace's pod", ep: ep{pod: "x", node: node, addr: "10.244.1.6", ready: true}, noEgress: true},
		{name: "a hostNetwork pod", ep: ep{pod: "h", node: node, addr: "10.244.1.7", ready: true}, noEgress: true},
		{name: "an address two pods claim", ep: ep{pod: "dup", node: node, addr: "10.244.1.8", ready: true}, noEgress: true},
		{name: "not a pod of this node", ep: ep{pod: "ghost", node: node, addr: "10.244.1.99", ready: true}, noEgress: true},
		{name: "outside the pod CIDRs", ep: ep{pod: "out", node: node, addr: "192.0.2.50", ready: true}, noEgress: true},
		{name: "a Node's address", ep: ep{pod: "n", node: node, addr: "198.51.100.11", ready: true}, noEgress: true},
		{name: "another node's confirmed pod", ep: ep{pod: "r-ok", node: "node-b", addr: "10.244.2.5", ready: true}},
		{name: "another node's refused pod", ep: ep{pod: "r-bad", node: "node-b", addr: "10.244.2.6", ready: true}, noEgress: true},
		{name: "another node's pod not read yet", ep: ep{pod: "r-new", node: "node-b", addr: "10.244.2.7", ready: true}, unverified: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := Analyze(svc("a", true, egressAnn("203.0.113.10")), []*discoveryv1.EndpointSlice{slice("a", discoveryv1.AddressTypeIPv4, tc.ep)}, o)
			if len(s.Endpoints) != 1 {
				t.Fatalf("endpoints %+v", s.Endpoints)
			}
			e := s.Endpoints[0]
			if (e.NoEgress != "") != tc.noEgress || e.Unverified != tc.unverified {
				t.Fatalf("noEgress %q unverified %v, want %v %v", e.NoEgress, e.Unverified, tc.noEgress, tc.unverified)
			}
			if tc.noEgress && !hasProblem(s, EventEndpointNotEgressed) {
				t.Fatalf("no %s: %+v", EventEndpointNotEgressed, s.Problems)
			}
			if s.Invalid != "" {
				t.Fatalf("an untrusted endpoint must not take the Service down: %q", s.Invalid)
			}
		})
	}
}

// A pod missing one family only loses that family's egress, reported once
// it lasts (each family's slice is updated on its own).
func TestPodMissingAFamilyIsTransient(t *testing.T) {
	s := Analyze(svc("a", true, egressAnn("203.0.113.10,2001:db8:1::10", annotations.EgressFamilies, "ipv4,ipv6")),
		[]*discoveryv1.EndpointSlice{slice("a", discoveryv1.AddressTypeIPv4, localPod)}, opts)
	if s.Invalid != "" {
		t.Fatalf("invalid %q", s.Invalid)
	}
	if !slices.ContainsFunc(s.Problems, func(p model.Problem) bool { return p.Reason == EventFamilyMismatch && p.Transient }) {
		t.Fatalf("problems %+v", s.Problems)
	}
}

func TestEgressFilterFromAnnotations(t *testing.T) {
	s := Analyze(svc("a", true, egressAnn("203.0.113.10",
		annotations.EgressDestinationPorts, "udp:5060",
		annotations.EgressDeniedNetworks, "192.168.0.0/16",
		annotations.EgressAllowedNetworks, "203.0.113.0/24",
		annotations.EgressStrict, "true")),
		[]*discoveryv1.EndpointSlice{slice("a", discoveryv1.AddressTypeIPv4, localPod)}, opts)
	if s.Invalid != "" || !s.Egress || !s.Strict {
		t.Fatalf("invalid %q egress %v strict %v: %+v", s.Invalid, s.Egress, s.Strict, s.Problems)
	}
	f := s.Filter
	if len(f.Ports) != 1 || f.Ports[0].Port != 5060 || len(f.Deny) != 1 || len(f.Allow) != 1 {
		t.Errorf("filter %+v", f)
	}
}

// kube-vip.io/flush-conntrack: absent or "true" flushes, "false" keeps.
func TestFlushConntrackFromAnnotations(t *testing.T) {
	slices := []*discoveryv1.EndpointSlice{slice("a", discoveryv1.AddressTypeIPv4, localPod)}
	if s := Analyze(svc("a", true, egressAnn("203.0.113.10")), slices, opts); !s.FlushConntrack {
		t.Errorf("without the annotation: FlushConntrack false, want true")
	}
	s := Analyze(svc("a", true, egressAnn("203.0.113.10", annotations.FlushConntrack, "false")), slices, opts)
	if s.Invalid != "" || !s.Egress || s.FlushConntrack {
		t.Errorf("flush-conntrack false: invalid %q egress %v FlushConntrack %v", s.Invalid, s.Egress, s.FlushConntrack)
	}
}

func TestMissingIPv6Exclusions(t *testing.T) {
	o := opts
	o.MissingIPv6 = []string{"pod"}
	s := Analyze(svc("a", true, egressAnn("203.0.113.10,2001:db8:1::10", annotations.EgressIPv6, "true")),
		[]*discoveryv1.EndpointSlice{slice("a", discoveryv1.AddressTypeIPv4, localPod)}, o)
	if !hasProblem(s, EventExclusionMissing) {
		t.Fatalf("problems %+v", s.Problems)
	}
}

// Another node's endpoints are read only where they may be steered to this
// node: where it may hold the Service, or holds one of its addresses.
func TestRemotePodsReadOnlyWhereSteeredTo(t *testing.T) {
	remote := ep{pod: "r-ok", node: "node-b", addr: "10.244.2.5", ready: true}
	lb := netip.MustParseAddr("203.0.113.10")
	for _, tc := range []struct {
		name   string
		local  bool
		eps    []ep
		holds  bool
		nilFn  bool
		reads  bool
		trusts bool
	}{
		{name: "Local, no ready endpoint here, address not held", local: true, eps: []ep{remote}},
		{name: "Local, a ready endpoint here", local: true, eps: []ep{localPod, remote}, reads: true, trusts: true},
		{name: "Local, the address held here (shared with another Service)", local: true, eps: []ep{remote}, holds: true, reads: true, trusts: true},
		{name: "Cluster: any node may hold it", eps: []ep{remote}, reads: true, trusts: true},
		{name: "no Holds: everywhere", local: true, eps: []ep{remote}, nilFn: true, reads: true, trusts: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := opts
			o.LocalPod = func(a netip.Addr) (PodRef, bool) {
				return PodRef{Namespace: "default", Name: localPod.pod}, a.String() == localPod.addr
			}
			read := 0
			o.RemotePod = func(ns, name, node string, a netip.Addr) (Verdict, string) {
				read++
				return Trusted, ""
			}
			if !tc.nilFn {
				o.Holds = func(a netip.Addr) bool { return tc.holds && a == lb }
			}
			s := Analyze(svc("a", tc.local, egressAnn(lb.String())), []*discoveryv1.EndpointSlice{slice("a", discoveryv1.AddressTypeIPv4, tc.eps...)}, o)
			if (read > 0) != tc.reads {
				t.Fatalf("%d reads, want reads %v", read, tc.reads)
			}
			i := slices.IndexFunc(s.Endpoints, func(e model.Endpoint) bool { return e.Name == remote.pod })
			if i < 0 {
				t.Fatalf("endpoints %+v", s.Endpoints)
			}
			if e := s.Endpoints[i]; e.NoEgress != "" || e.Unverified == tc.trusts {
				t.Fatalf("remote endpoint: noEgress %q unverified %v; want trusted %v", e.NoEgress, e.Unverified, tc.trusts)
			}
		})
	}
}
