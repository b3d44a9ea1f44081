package desired

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/pkg/snat"
)

const node = "node-a"

var podCIDRs = []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("fd00:10:244::/56")}

var opts = Options{Node: node, Election: true, PodCIDRs: podCIDRs}

func svc(name string, local bool, ann map[string]string) *corev1.Service {
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name, Annotations: ann},
		Spec:       corev1.ServiceSpec{Type: corev1.ServiceTypeLoadBalancer},
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

func TestAnalyzeStand(t *testing.T) {
	localPod := ep{pod: "p1", node: node, addr: "10.244.1.5", ready: true}
	remotePod := ep{pod: "p2", node: "node-b", addr: "10.244.2.5", ready: true}
	for _, tc := range []struct {
		name       string
		svc        *corev1.Service
		slices     []*discoveryv1.EndpointSlice
		opts       Options
		wantStand  bool
		wantReason string
		wantEvent  string
		wantFatal  bool
	}{
		{name: "local policy with local ready pod stands", svc: svc("a", true, egressAnn("203.0.113.10")),
			slices: []*discoveryv1.EndpointSlice{slice("a", discoveryv1.AddressTypeIPv4, localPod)}, wantStand: true},
		{name: "local policy with only remote pod does not stand", svc: svc("a", true, egressAnn("203.0.113.10")),
			slices: []*discoveryv1.EndpointSlice{slice("a", discoveryv1.AddressTypeIPv4, remotePod)}, wantReason: ReasonNoLocalEndpoint},
		{name: "terminating local pod that no longer serves does not count", svc: svc("a", true, egressAnn("203.0.113.10")),
			slices:     []*discoveryv1.EndpointSlice{slice("a", discoveryv1.AddressTypeIPv4, ep{pod: "p1", node: node, addr: "10.244.1.5", ready: true, terminating: true})},
			wantReason: ReasonNoLocalEndpoint},
		{name: "unready local pod does not count", svc: svc("a", true, egressAnn("203.0.113.10")),
			slices:     []*discoveryv1.EndpointSlice{slice("a", discoveryv1.AddressTypeIPv4, ep{pod: "p1", node: node, addr: "10.244.1.5"})},
			wantReason: ReasonNoLocalEndpoint},
		{name: "cluster policy stands everywhere", svc: svc("a", false, map[string]string{annotations.LoadBalancerIPs: "203.0.113.10"}), wantStand: true},
		{name: "no address: one event, no stand", svc: svc("a", false, nil), wantReason: ReasonNoAddress, wantEvent: EventNoAddress},
		{name: "spec.loadBalancerIP is used", svc: func() *corev1.Service {
			s := svc("a", false, nil)
			s.Spec.LoadBalancerIP = "203.0.113.11"
			return s
		}(), wantStand: true},
		{name: "address that is not an IP is fatal", svc: svc("a", false, map[string]string{annotations.LoadBalancerIPs: "not-an-ip"}),
			wantReason: ReasonInvalid, wantEvent: EventInvalidAddress, wantFatal: true},
		{name: "bad destination ports are fatal", svc: svc("a", true, egressAnn("203.0.113.10", annotations.EgressDestinationPorts, "tcp:70000")),
			slices: []*discoveryv1.EndpointSlice{slice("a", discoveryv1.AddressTypeIPv4, localPod)}, wantReason: ReasonInvalid, wantEvent: EventInvalidAnnotation, wantFatal: true},
		{name: "ipv6 egress without ipv6 address is fatal", svc: svc("a", true, egressAnn("203.0.113.10", annotations.EgressIPv6, "true")),
			slices: []*discoveryv1.EndpointSlice{slice("a", discoveryv1.AddressTypeIPv4, localPod)}, wantReason: ReasonInvalid, wantEvent: EventFamilyMismatch, wantFatal: true},
		{name: "ipv6 egress with a pod lacking ipv6 is an event, and the service stands", svc: svc("a", true, egressAnn("203.0.113.10,2001:db8:1::10", annotations.EgressIPv6, "true")),
			slices: []*discoveryv1.EndpointSlice{slice("a", discoveryv1.AddressTypeIPv4, localPod)}, wantStand: true, wantEvent: EventFamilyMismatch},
		{name: "a pod missing from the ipv4 slice is an event, and the service stands", svc: svc("a", true, egressAnn("203.0.113.10,2001:db8:1::10", annotations.EgressIPv6, "true")),
			slices:    []*discoveryv1.EndpointSlice{slice("a", discoveryv1.AddressTypeIPv6, ep{pod: "p1", node: node, addr: "fd00:10:244:1::5", ready: true})},
			wantStand: true, wantEvent: EventFamilyMismatch},
		{name: "egress with cluster policy serves the address without egress", svc: svc("a", false, egressAnn("203.0.113.10")),
			wantStand: true, wantEvent: EventEgressNotSupported},
		{name: "egress without election is refused with an event", svc: svc("a", true, egressAnn("203.0.113.10")),
			slices:    []*discoveryv1.EndpointSlice{slice("a", discoveryv1.AddressTypeIPv4, localPod)},
			opts:      Options{Node: node, Election: false, GlobalLease: types.NamespacedName{Namespace: "egressvip", Name: "egressvip.services"}, PodCIDRs: podCIDRs},
			wantStand: true, wantEvent: EventEgressNotSupported},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := tc.opts
			if o.Node == "" {
				o = opts
			}
			s := Analyze(tc.svc, tc.slices, o)
			if s.Stand != tc.wantStand || s.Reason != tc.wantReason {
				t.Fatalf("Stand=%v Reason=%q, want %v %q (problems %+v)", s.Stand, s.Reason, tc.wantStand, tc.wantReason, s.Problems)
			}
			if tc.wantEvent == "" && len(s.Problems) > 0 {
				t.Fatalf("unexpected problems %+v", s.Problems)
			}
			if tc.wantEvent != "" {
				if !slices.ContainsFunc(s.Problems, func(p Problem) bool { return p.Reason == tc.wantEvent }) {
					t.Fatalf("want event %s, got %+v", tc.wantEvent, s.Problems)
				}
				if s.fatal() != tc.wantFatal {
					t.Fatalf("fatal=%v want %v", s.fatal(), tc.wantFatal)
				}
			}
			if s.Egress && !o.Election {
				t.Fatal("egress must be off without election")
			}
			if !o.Election && s.Lease != o.GlobalLease {
				t.Fatalf("lease %v, want the global lease", s.Lease)
			}
		})
	}
}

// A pod known in one family only gets that family's SNAT; the Service keeps
// its addresses.
func TestBuildPodMissingAFamily(t *testing.T) {
	s := Analyze(svc("dual", true, egressAnn("203.0.113.10,2001:db8:1::10", annotations.EgressIPv6, "true")),
		[]*discoveryv1.EndpointSlice{slice("dual", discoveryv1.AddressTypeIPv6, ep{pod: "p1", node: node, addr: "fd00:10:244:1::5", ready: true})}, opts)
	if len(s.Problems) != 1 || s.Problems[0].Reason != EventFamilyMismatch || !s.Problems[0].Transient || s.Problems[0].Fatal {
		t.Fatalf("problems %+v, want one transient, non-fatal %s", s.Problems, EventFamilyMismatch)
	}
	st := Build([]Service{s}, nil)
	if len(st.Addresses) != 2 {
		t.Fatalf("addresses %v, want both LoadBalancer IPs", st.Addresses)
	}
	if len(st.SNAT.Rules) != 1 || st.SNAT.Rules[0].PodIP != netip.MustParseAddr("fd00:10:244:1::5") || st.SNAT.Rules[0].SourceIP != netip.MustParseAddr("2001:db8:1::10") {
		t.Fatalf("rules %+v, want the IPv6 rule only", st.SNAT.Rules)
	}
}

func TestBuild(t *testing.T) {
	dual := Analyze(svc("dual", true, egressAnn("203.0.113.10,2001:db8:1::10", annotations.EgressIPv6, "true", annotations.EgressDestinationPorts, "udp:5060")),
		[]*discoveryv1.EndpointSlice{
			slice("dual", discoveryv1.AddressTypeIPv4, ep{pod: "p1", node: node, addr: "10.244.1.5", ready: true}, ep{pod: "p9", node: "node-b", addr: "10.244.2.9", ready: true}),
			slice("dual", discoveryv1.AddressTypeIPv6, ep{pod: "p1", node: node, addr: "fd00:10:244:1::5", ready: true}),
		}, opts)
	plain := Analyze(svc("plain", false, map[string]string{annotations.LoadBalancerIPs: "203.0.113.20"}), nil, opts)
	// Shares the pod of "dual": the second Service gets a conflict, not a rule.
	other := Analyze(svc("zz-other", true, egressAnn("203.0.113.30")),
		[]*discoveryv1.EndpointSlice{slice("zz-other", discoveryv1.AddressTypeIPv4, ep{pod: "p1", node: node, addr: "10.244.1.5", ready: true})}, opts)
	// Same address as "plain": bound once.
	sameIP := Analyze(svc("same-ip", false, map[string]string{annotations.LoadBalancerIPs: "203.0.113.20"}), nil, opts)
	exclude := []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")}

	st := Build([]Service{plain, dual, other, sameIP}, exclude)

	wantAddrs := []netip.Addr{netip.MustParseAddr("203.0.113.10"), netip.MustParseAddr("203.0.113.20"), netip.MustParseAddr("203.0.113.30"), netip.MustParseAddr("2001:db8:1::10")}
	if !slices.Equal(st.Addresses, wantAddrs) {
		t.Fatalf("addresses %v, want %v", st.Addresses, wantAddrs)
	}
	wantRules := []snat.Rule{
		{Service: "default/dual", PodIP: netip.MustParseAddr("10.244.1.5"), SourceIP: netip.MustParseAddr("203.0.113.10"), Ports: []annotations.DestinationPort{{Protocol: annotations.UDP, Port: 5060}}},
		{Service: "default/dual", PodIP: netip.MustParseAddr("fd00:10:244:1::5"), SourceIP: netip.MustParseAddr("2001:db8:1::10"), Ports: []annotations.DestinationPort{{Protocol: annotations.UDP, Port: 5060}}},
	}
	if len(st.SNAT.Rules) != len(wantRules) {
		t.Fatalf("rules %+v, want %+v", st.SNAT.Rules, wantRules)
	}
	for i := range wantRules {
		g, w := st.SNAT.Rules[i], wantRules[i]
		if g.Service != w.Service || g.PodIP != w.PodIP || g.SourceIP != w.SourceIP || !slices.Equal(g.Ports, w.Ports) {
			t.Fatalf("rule %d = %+v, want %+v", i, g, w)
		}
	}
	if !slices.Equal(st.SNAT.Exclude, exclude) {
		t.Fatalf("exclude %v", st.SNAT.Exclude)
	}
	if c := st.Conflicts["default/zz-other"]; len(c) != 1 || c[0].Reason != EventEgressConflict {
		t.Fatalf("want one conflict on zz-other, got %+v", st.Conflicts)
	}

	// A fatal Service contributes nothing, even when owned.
	bad := Analyze(svc("bad", true, egressAnn("203.0.113.40", annotations.EgressDestinationPorts, "tcp:0")),
		[]*discoveryv1.EndpointSlice{slice("bad", discoveryv1.AddressTypeIPv4, ep{pod: "p3", node: node, addr: "10.244.1.7", ready: true})}, opts)
	if st := Build([]Service{bad}, nil); len(st.Addresses) != 0 || len(st.SNAT.Rules) != 0 {
		t.Fatalf("fatal Service programmed %+v", st)
	}
}

func TestReportFor(t *testing.T) {
	s := Analyze(svc("dual", true, egressAnn("203.0.113.10,2001:db8:1::10", annotations.EgressIPv6, "true")),
		[]*discoveryv1.EndpointSlice{
			slice("dual", discoveryv1.AddressTypeIPv4, ep{pod: "p1", node: node, addr: "10.244.1.5", ready: true}),
			slice("dual", discoveryv1.AddressTypeIPv6, ep{pod: "p1", node: node, addr: "fd00:10:244:1::5", ready: true}),
		}, opts)
	r := ReportFor(s, node)
	if !slices.Equal(r.Ingress, []string{"203.0.113.10", "2001:db8:1::10"}) || r.VIPHost != node ||
		r.ActiveEndpoint != "10.244.1.5" || r.ActiveEndpointIPv6 != "fd00:10:244:1::5" {
		t.Fatalf("report %+v", r)
	}
	noEgress := Analyze(svc("plain", false, map[string]string{annotations.LoadBalancerIPs: "203.0.113.20"}), nil, opts)
	if a := ReportFor(noEgress, node).Annotations(); a[annotations.ActiveEndpoint] != "" || a[annotations.VIPHost] != node {
		t.Fatalf("annotations %v", a)
	}
}

// Like kube-proxy: a terminating pod that still serves keeps its egress
// (and the node standing) while this node has no ready endpoint.
func TestTerminatingEndpoints(t *testing.T) {
	yes := true
	term := ep{pod: "old", node: node, addr: "10.244.1.5", terminating: true, serving: &yes}
	fresh := ep{pod: "new", node: node, addr: "10.244.1.6", ready: true}
	elsewhere := ep{pod: "other", node: "node-b", addr: "10.244.2.6", ready: true}
	for _, tc := range []struct {
		name      string
		eps       []ep
		wantStand bool
		wantLocal []string
	}{
		{name: "only a serving terminating pod: it keeps egress", eps: []ep{term}, wantStand: true, wantLocal: []string{"old"}},
		{name: "a ready pod elsewhere does not end it here", eps: []ep{term, elsewhere}, wantStand: true, wantLocal: []string{"old"}},
		{name: "a ready pod on this node replaces it", eps: []ep{term, fresh}, wantStand: true, wantLocal: []string{"new"}},
		{name: "gone", eps: nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := Analyze(svc("a", true, egressAnn("203.0.113.10")), []*discoveryv1.EndpointSlice{slice("a", discoveryv1.AddressTypeIPv4, tc.eps...)}, opts)
			var local []string
			for _, e := range s.LocalEndpoints {
				local = append(local, e.Name)
			}
			if s.Stand != tc.wantStand || !slices.Equal(local, tc.wantLocal) {
				t.Fatalf("stand %v local %v, want %v %v", s.Stand, local, tc.wantStand, tc.wantLocal)
			}
			st := Build([]Service{s}, nil)
			if len(st.SNAT.Rules) != len(tc.wantLocal) {
				t.Fatalf("rules %+v, want one per local endpoint %v", st.SNAT.Rules, tc.wantLocal)
			}
		})
	}
}

// An endpoint is egressed only if it is shown to be a pod of the Service's
// namespace on this node; anything else keeps the node address, with an
// Event.
func TestEndpointTrust(t *testing.T) {
	podIP := netip.MustParseAddr("10.244.1.5")
	own := map[netip.Addr]PodRef{podIP: {Namespace: "default", Name: "p1"}}
	for _, tc := range []struct {
		name          string
		targetRef     *corev1.ObjectReference
		addr          string
		nodeAddrs     map[netip.Addr]bool
		pods          map[netip.Addr]PodRef
		wantEgress    bool
		wantTransient bool
	}{
		{name: "a pod of the namespace on this node", targetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: "default", Name: "p1"}, addr: "10.244.1.5", pods: own, wantEgress: true},
		{name: "no targetRef", addr: "10.244.1.5", pods: own},
		{name: "targetRef not a Pod", targetRef: &corev1.ObjectReference{Kind: "Node", Name: "node-a"}, addr: "10.244.1.5", pods: own},
		{name: "targetRef in another namespace", targetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: "victim", Name: "p1"}, addr: "10.244.1.5", pods: own},
		{name: "a Node's address (hostNetwork)", targetRef: &corev1.ObjectReference{Kind: "Pod", Name: "p1"}, addr: "10.244.1.5",
			nodeAddrs: map[netip.Addr]bool{podIP: true}, pods: own},
		{name: "outside the pod CIDRs", targetRef: &corev1.ObjectReference{Kind: "Pod", Name: "p1"}, addr: "198.51.100.11",
			pods: map[netip.Addr]PodRef{netip.MustParseAddr("198.51.100.11"): {Namespace: "default", Name: "p1"}}},
		{name: "the address of another namespace's pod (hand-written slice)", targetRef: &corev1.ObjectReference{Kind: "Pod", Name: "p1"}, addr: "10.244.1.5",
			pods: map[netip.Addr]PodRef{podIP: {Namespace: "victim", Name: "db"}}},
		{name: "a hostNetwork pod", targetRef: &corev1.ObjectReference{Kind: "Pod", Name: "p1"}, addr: "10.244.1.5",
			pods: map[netip.Addr]PodRef{podIP: {Namespace: "default", Name: "p1", HostNetwork: true}}},
		{name: "no such pod on this node yet", targetRef: &corev1.ObjectReference{Kind: "Pod", Name: "p1"}, addr: "10.244.1.5",
			pods: map[netip.Addr]PodRef{}, wantTransient: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sl := slice("a", discoveryv1.AddressTypeIPv4, ep{pod: "p1", node: node, addr: tc.addr, ready: true})
			sl.Endpoints[0].TargetRef = tc.targetRef
			o := opts
			o.NodeAddresses = tc.nodeAddrs
			o.LocalPod = func(a netip.Addr) (PodRef, bool) { p, ok := tc.pods[a]; return p, ok }
			s := Analyze(svc("a", true, egressAnn("203.0.113.10")), []*discoveryv1.EndpointSlice{sl}, o)
			if !s.Stand {
				t.Fatalf("the node must still stand for the address: %+v", s)
			}
			rules := Build([]Service{s}, nil).SNAT.Rules
			if (len(rules) == 1) != tc.wantEgress {
				t.Fatalf("rules %+v, want egress %v", rules, tc.wantEgress)
			}
			problem := slices.IndexFunc(s.Problems, func(p Problem) bool { return p.Reason == EventEndpointNotEgressed })
			if tc.wantEgress != (problem < 0) {
				t.Fatalf("problems %+v", s.Problems)
			}
			if problem >= 0 && s.Problems[problem].Transient != tc.wantTransient {
				t.Fatalf("transient %v, want %v", s.Problems[problem].Transient, tc.wantTransient)
			}
		})
	}
}

// An IP allocator writes the address moments after the Service is created:
// a missing address is reported only if it lasts.
func TestMissingAddressIsTransient(t *testing.T) {
	s := Analyze(svc("a", false, nil), nil, opts)
	i := slices.IndexFunc(s.Problems, func(p Problem) bool { return p.Reason == EventNoAddress })
	if i < 0 || !s.Problems[i].Transient || s.Problems[i].Fatal {
		t.Fatalf("problems %+v, want one transient NoLoadBalancerIP", s.Problems)
	}
}

// IPv6 egress where no IPv6 pod or Service range is known is reported;
// IPv4-only egress is not.
func TestMissingIPv6Exclusions(t *testing.T) {
	o := opts
	o.MissingIPv6 = []string{"pod"}
	local := slice("a", discoveryv1.AddressTypeIPv6, ep{pod: "p1", node: node, addr: "fd00:10:244:1::5", ready: true})
	v6 := Analyze(svc("a", true, egressAnn("203.0.113.10,2001:db8:1::10", annotations.EgressIPv6, "true")), []*discoveryv1.EndpointSlice{local}, o)
	if !slices.ContainsFunc(v6.Problems, func(p Problem) bool { return p.Reason == EventExclusionMissing }) {
		t.Fatalf("problems %+v, want %s", v6.Problems, EventExclusionMissing)
	}
	v4 := Analyze(svc("a", true, egressAnn("203.0.113.10")), nil, o)
	if slices.ContainsFunc(v4.Problems, func(p Problem) bool { return p.Reason == EventExclusionMissing }) {
		t.Fatalf("IPv4-only egress reported %+v", v4.Problems)
	}
}
