package node

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"reflect"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	k8stesting "k8s.io/client-go/testing"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/pkg/election"
	"github.com/egressvip/egressvip/pkg/model"
	"github.com/egressvip/egressvip/pkg/plan"
)

// patches counts the patches of Services sent to the API server.
func patches(h *harness) int {
	n := 0
	for _, a := range h.client.Actions() {
		if a.GetVerb() == "patch" && a.GetResource().Resource == "services" {
			n++
		}
	}
	return n
}

// waitSlice waits until the cache shows the Service's EndpointSlice as
// cond wants it.
func (h *harness) waitSlice(svc string, cond func(sl *discoveryv1.EndpointSlice) bool) {
	h.t.Helper()
	eventually(h.t, "the cache to show the EndpointSlice of "+svc, func() bool {
		objs, err := h.ctrl.sliceIndex.ByIndex(byService, "default/"+svc)
		return err == nil && len(objs) == 1 && cond(objs[0].(*discoveryv1.EndpointSlice))
	})
}

// A free egress Service with a ready pod here: the first sync acquires the
// address Lease and the Service Lease and binds nothing; once both are
// written, the next sync probes, binds, SNATs the pod, and the reporter
// writes status and annotations.
func TestFreeServiceIsAcquiredThenBoundSNATedAndReported(t *testing.T) {
	h := newHarness(t, egressApp("web", "203.0.113.10", "10.244.1.5", true)...)
	h.sync()
	claims := h.elections.claimsOf()
	if got, want := h.elections.claimed(), []types.NamespacedName{addrLease("203.0.113.10"), svcLease("web")}; !slices.Equal(got, want) {
		t.Fatalf("acquired %v, want %v", got, want)
	}
	if c := claims[0]; c.Kind != model.AddressLease || c.Address != addr("203.0.113.10") || c.ClaimedBy != "default" {
		t.Errorf("address claim %+v: it must record the address and the namespace", c)
	}
	if c := claims[1]; c.Kind != model.ServiceLease || !slices.Equal(c.Owners, []model.Owner{{Name: "web", UID: uid("web")}}) ||
		!slices.Equal(c.AddressLeases, []string{election.AddressLeaseName(addr("203.0.113.10"))}) {
		t.Errorf("Service claim %+v: it must be owned by its Service and name its address Lease", c)
	}
	if h.addrs.has("203.0.113.10") || h.addrs.probeCount() != 0 {
		t.Fatalf("bound or probed before the Leases were written: %s", h.j)
	}
	// Taking the address: the pod is SNATed behind the fence, which drops
	// its traffic until the address is bound here.
	if dp := h.snat.datapath(); !slices.Contains(dp.Fenced, addr("203.0.113.10")) {
		t.Errorf("fenced %v while SNATing to an address not bound yet", dp.Fenced)
	}
	if n := patches(h); n != 0 {
		t.Fatalf("reported %d times before holding the Service", n)
	}

	h.elections.grantAll()
	h.sync()
	if !h.addrs.has("203.0.113.10") {
		t.Fatal("the holder did not bind its address")
	}
	if p, b := h.j.index("probe 203.0.113.10"), h.j.index("bind 203.0.113.10"); p < 0 || p > b {
		t.Errorf("the address was not probed before it was bound: %s", h.j)
	}
	if got := h.snat.snat("default/web"); !slices.Equal(got, []string{"10.244.1.5>203.0.113.10"}) {
		t.Errorf("SNAT %v", got)
	}
	svc := h.service("web")
	want := map[string]string{annotations.VIPHost: nodeName, annotations.ActiveEndpoint: "10.244.1.5",
		AnnotationEgressEndpoints: "1", AnnotationSteeredEndpoints: "0"}
	for k, v := range want {
		if svc.Annotations[k] != v {
			t.Errorf("annotation %s = %q, want %q", k, svc.Annotations[k], v)
		}
	}
	if _, ok := svc.Annotations[annotations.ActiveEndpointIPv6]; ok {
		t.Errorf("%s set without IPv6 egress", annotations.ActiveEndpointIPv6)
	}
	if ing := svc.Status.LoadBalancer.Ingress; len(ing) != 1 || ing[0].IP != "203.0.113.10" || ing[0].IPMode == nil || *ing[0].IPMode != corev1.LoadBalancerIPModeVIP {
		t.Errorf("status ingress %+v", ing)
	}
	if n := h.count("Normal", plan.EventBound, "203.0.113.10"); n != 1 {
		t.Errorf("%d %s Events, want 1: %q", n, plan.EventBound, h.collect())
	}

	// A steady state writes nothing more.
	eventually(t, "the cache to show the report", func() bool {
		c := h.cachedService("web")
		return c != nil && c.Annotations[annotations.VIPHost] == nodeName && len(c.Status.LoadBalancer.Ingress) == 1
	})
	before := patches(h)
	h.sync()
	h.sync()
	if n := patches(h) - before; n != 0 {
		t.Errorf("a steady state patched the Service %d times", n)
	}
}

// The pod leaves the node: the Leases are released only once the kernel
// no longer holds the address, never while a failed removal left it.
func TestLeaseReleasedOnlyAfterTheKernelLetGo(t *testing.T) {
	h := newHarness(t, egressApp("web", "203.0.113.10", "10.244.1.5", true)...)
	h.elections.hold(nodeName, []string{"web"}, "203.0.113.10")
	h.sync()
	if !h.addrs.has("203.0.113.10") {
		t.Fatal("setup: the holder did not bind the address")
	}
	moved := endpointSlice("web", endpoint{"web-pod-2", "10.244.2.5", "node-b"})
	if _, err := h.client.DiscoveryV1().EndpointSlices("default").Update(context.Background(), moved, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := h.client.CoreV1().Pods("default").Delete(context.Background(), "web-pod", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	h.waitSlice("web", func(sl *discoveryv1.EndpointSlice) bool { return *sl.Endpoints[0].NodeName == "node-b" })
	eventually(t, "the pod to leave the cache", func() bool { return h.cachedPod("web-pod") == nil })

	h.addrs.set(func(f *fakeAddrs) { f.failDel[addr("203.0.113.10")] = errors.New("EBUSY") })
	h.sync()
	h.sync()
	if !h.addrs.has("203.0.113.10") {
		t.Fatal("setup: the removal should have failed")
	}
	for _, l := range []types.NamespacedName{addrLease("203.0.113.10"), svcLease("web")} {
		if h.elections.wasReleased(l) {
			t.Errorf("released %s although the kernel still holds the address", l)
		}
	}

	h.addrs.set(func(f *fakeAddrs) { delete(f.failDel, addr("203.0.113.10")) })
	h.sync()
	if h.addrs.has("203.0.113.10") {
		t.Fatal("the address stayed once it could be removed")
	}
	for _, l := range []types.NamespacedName{addrLease("203.0.113.10"), svcLease("web")} {
		if r, rm := h.j.index("release "+l.String()), h.j.index("remove 203.0.113.10"); r < 0 || r < rm {
			t.Errorf("%s not released after the address was removed: %s", l, h.j)
		}
	}
}

// Bad input is one Warning while it lasts (again if it comes back), and
// every other Service keeps working.
func TestBadInputIsOneWarningWhileItLastsAndOthersKeepWorking(t *testing.T) {
	for _, tc := range []struct {
		name     string
		ann      []string
		reason   string
		mentions string
	}{
		{name: "unknown egress annotation", ann: []string{"kube-vip.io/egress-foo", "bar"}, reason: annotations.ReasonUnknown, mentions: "kube-vip.io/egress-foo"},
		{name: "destination port 70000", ann: []string{annotations.EgressDestinationPorts, "tcp:70000"}, reason: annotations.ReasonInvalid, mentions: "70000"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			objs := append(egressApp("bad", "203.0.113.11", "10.244.1.6", true, tc.ann...),
				egressApp("good", "203.0.113.10", "10.244.1.5", true)...)
			h := newHarness(t, objs...)
			h.elections.grantAll()
			for range 3 {
				h.sync()
			}
			if n := h.count("Warning", tc.reason, tc.mentions); n != 1 {
				t.Fatalf("%d %s Warnings over three syncs, want 1: %q", n, tc.reason, h.collect())
			}
			if slices.ContainsFunc(h.elections.claimed(), func(l types.NamespacedName) bool {
				return l == svcLease("bad") || l == addrLease("203.0.113.11")
			}) || h.addrs.has("203.0.113.11") || len(h.snat.snat("default/bad")) != 0 {
				t.Fatalf("the malformed Service got something: claims %v, %s, SNAT %v", h.elections.claimed(), h.j, h.snat.snat("default/bad"))
			}
			if !h.addrs.has("203.0.113.10") || !slices.Equal(h.snat.snat("default/good"), []string{"10.244.1.5>203.0.113.10"}) ||
				h.service("good").Annotations[annotations.VIPHost] != nodeName {
				t.Fatal("the healthy Service stopped working")
			}

			// Fixed: served, no further Warning. Broken again: one more.
			h.updateService("bad", func(s *corev1.Service) { delete(s.Annotations, tc.ann[0]) })
			h.sync()
			h.sync()
			if !h.addrs.has("203.0.113.11") {
				t.Fatalf("the fixed Service is not served: %s", h.j)
			}
			h.updateService("bad", func(s *corev1.Service) { s.Annotations[tc.ann[0]] = tc.ann[1] })
			h.sync()
			h.sync()
			if n := h.count("Warning", tc.reason, tc.mentions); n != 2 {
				t.Fatalf("%d %s Warnings, want 2 (the problem came back once): %q", n, tc.reason, h.collect())
			}
			if h.addrs.has("203.0.113.11") || !h.addrs.has("203.0.113.10") {
				t.Fatalf("broken again: %s", h.j)
			}
		})
	}
}

// One address the kernel refuses: that Service gets one ApplyFailed
// Warning and is given up (its Leases released, its address being gone),
// retried after the back-off; the other Service is bound and reported.
func TestOneFailingAddressIsGivenUpAlone(t *testing.T) {
	objs := append(egressApp("bad", "203.0.113.11", "10.244.1.6", true), egressApp("good", "203.0.113.10", "10.244.1.5", true)...)
	h := newHarness(t, objs...)
	h.addrs.set(func(f *fakeAddrs) { f.failAdd[addr("203.0.113.11")] = errors.New("cannot assign requested address") })
	h.elections.hold(nodeName, []string{"bad", "good"}, "203.0.113.10", "203.0.113.11")
	h.elections.grantAll()
	for range 3 {
		h.sync()
	}
	if n := h.count("Warning", plan.EventApplyFailed, "203.0.113.11"); n != 1 {
		t.Errorf("%d %s Warnings for the failing address, want 1: %q", n, plan.EventApplyFailed, h.collect())
	}
	if n := h.count("Warning", plan.EventApplyFailed); n != 1 {
		t.Errorf("%d %s Warnings in all, want 1 (none for the good Service): %q", n, plan.EventApplyFailed, h.collect())
	}
	for _, l := range []types.NamespacedName{addrLease("203.0.113.11"), svcLease("bad")} {
		if !h.elections.wasReleased(l) {
			t.Errorf("%s not released: the failing Service is given up so another node may try", l)
		}
	}
	for _, l := range []types.NamespacedName{addrLease("203.0.113.10"), svcLease("good")} {
		if h.elections.wasReleased(l) {
			t.Errorf("%s released: only the failing Service is given up", l)
		}
	}
	if !h.addrs.has("203.0.113.10") || h.service("good").Annotations[annotations.VIPHost] != nodeName {
		t.Error("the good Service is not bound and reported")
	}
	if h.service("bad").Annotations[annotations.VIPHost] != "" {
		t.Error("the failing Service is reported as served")
	}

	// After the back-off it is tried again.
	h.addrs.set(func(f *fakeAddrs) { delete(f.failAdd, addr("203.0.113.11")) })
	h.clock.Step(2 * time.Second)
	h.sync()
	h.sync()
	if !h.addrs.has("203.0.113.11") {
		t.Errorf("not bound again after the back-off: %s", h.j)
	}
}

// The serviceInterface missing or down: nothing stands (the address goes,
// the Leases are released, nothing is acquired), and the Services that
// were served say why in an Event.
func TestInterfaceUnavailableNothingStands(t *testing.T) {
	for _, tc := range []struct {
		name  string
		brk   func(f *fakeAddrs)
		fixed func(f *fakeAddrs)
	}{
		{name: "missing", brk: func(f *fakeAddrs) { f.missing, f.bound = true, map[netip.Addr]bool{} }, fixed: func(f *fakeAddrs) { f.missing = false }},
		{name: "down", brk: func(f *fakeAddrs) { f.down = true }, fixed: func(f *fakeAddrs) { f.down = false }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			objs := append(egressApp("web", "203.0.113.10", "10.244.1.5", true), lbService("other", "203.0.113.20", false))
			h := newHarness(t, objs...)
			h.elections.peer("node-b", "192.0.2.2")
			h.elections.hold(nodeName, []string{"web"}, "203.0.113.10")
			h.elections.hold("node-b", []string{"other"}, "203.0.113.20")
			h.elections.grantAll()
			h.sync()
			h.sync()
			if !h.addrs.has("203.0.113.10") {
				t.Fatal("setup: not bound")
			}
			claims := len(h.elections.claimed())

			h.addrs.set(tc.brk)
			h.sync()
			// A flap keeps the address for the grace (the renew
			// deadline); after it the node gives it up.
			if tc.name == "down" && !h.addrs.has("203.0.113.10") {
				t.Error("a link that just went down lost its address before the grace")
			}
			h.clock.Step(4 * time.Second)
			h.sync()
			h.sync()
			h.sync()
			if h.addrs.has("203.0.113.10") {
				t.Error("the address stands on an unusable interface")
			}
			for _, l := range []types.NamespacedName{addrLease("203.0.113.10"), svcLease("web")} {
				if !h.elections.wasReleased(l) {
					t.Errorf("%s kept: no other node could take the Service over: %s", l, h.j)
				}
			}
			if n := len(h.elections.claimed()); n != claims {
				t.Errorf("acquired %v with the interface %s", h.elections.claimed()[claims:], tc.name)
			}
			if h.ctrl.NodeInfo().Standing {
				t.Error("the heartbeat says the node stands")
			}
			if n := h.count("Normal", plan.EventReleased, "203.0.113.10", plan.ReasonInterface); n != 1 {
				t.Errorf("%d %s Events saying the interface is unavailable, want 1: %q", n, plan.EventReleased, h.collect())
			}
			if n := h.count("Normal", plan.EventReleased, "203.0.113.20") + h.count("Warning", plan.EventInterfaceNotFound, "203.0.113.20"); n != 0 {
				t.Errorf("an Event on a Service this node did not serve: %q", h.collect())
			}

			h.addrs.set(tc.fixed)
			h.sync()
			h.sync()
			if !h.addrs.has("203.0.113.10") || !h.ctrl.NodeInfo().Standing {
				t.Errorf("the node does not stand again once the interface is back: %s", h.j)
			}
		})
	}
}

// Another host answers the probe for an address: it is not bound (one
// AddressInUse Warning) until the host stops answering.
func TestAddressAnsweredByAnotherHostIsNotBound(t *testing.T) {
	h := newHarness(t, egressApp("web", "203.0.113.10", "10.244.1.5", true)...)
	h.elections.hold(nodeName, []string{"web"}, "203.0.113.10")
	mac, _ := net.ParseMAC("02:00:00:00:00:99")
	h.addrs.set(func(f *fakeAddrs) { f.answers[addr("203.0.113.10")] = mac })
	h.sync()
	h.sync()
	if h.addrs.has("203.0.113.10") {
		t.Fatal("bound an address another host answers for")
	}
	if n := h.count("Warning", plan.EventInUse, "203.0.113.10", "02:00:00:00:00:99"); n != 1 {
		t.Errorf("%d %s Warnings, want 1: %q", n, plan.EventInUse, h.collect())
	}
	if n := h.addrs.probeCount(); n != 1 {
		t.Errorf("probed %d times within the retry period, want 1", n)
	}
	if n := patches(h); n != 0 {
		t.Errorf("reported an address it does not hold (%d patches)", n)
	}

	h.addrs.set(func(f *fakeAddrs) { delete(f.answers, addr("203.0.113.10")) })
	h.clock.Step(time.Second)
	h.sync()
	if !h.addrs.has("203.0.113.10") {
		t.Fatalf("not bound once nobody answers: %s", h.j)
	}
	if n := h.count("Warning", plan.EventInUse); n != 1 {
		t.Errorf("%d %s Warnings, want still 1", n, plan.EventInUse)
	}
	if ing := h.service("web").Status.LoadBalancer.Ingress; len(ing) != 1 {
		t.Errorf("not reported once bound: ingress %+v", ing)
	}
}

// Another host claims a held address: while this node's heartbeat renewal
// is overdue it steps down (others may have taken the address over); with
// a valid claim it keeps it. A pinned Service keeps its address through an
// overdue heartbeat without a conflict.
func TestConflictStepsDownOnlyWhileOverdue(t *testing.T) {
	for _, tc := range []struct {
		name              string
		overdue, conflict bool
		bound             bool
		says              string
	}{
		{name: "valid claim keeps the address", conflict: true, bound: true, says: "keeping it"},
		{name: "overdue without a conflict keeps a pinned address", overdue: true, bound: true},
		{name: "conflict while overdue steps down", overdue: true, conflict: true, bound: false, says: "stepping down"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, egressApp("web", "203.0.113.10", "10.244.1.5", true)...)
			h.elections.hold(nodeName, []string{"web"}, "203.0.113.10")
			h.sync()
			if !h.addrs.has("203.0.113.10") {
				t.Fatal("setup: not bound")
			}
			h.elections.set(func(v *model.ElectionView) { v.Overdue = tc.overdue })
			if tc.conflict {
				h.ctrl.Conflict(plan.Conflict{Addr: addr("203.0.113.10"), MAC: "02:00:00:00:00:99", At: h.clock.Now()})
			}
			h.sync()
			h.sync()
			if got := h.addrs.has("203.0.113.10"); got != tc.bound {
				t.Errorf("bound %v, want %v: %s", got, tc.bound, h.j)
			}
			want := 0
			if tc.conflict {
				want = 1
			}
			if n := h.count("Warning", plan.EventConflict, "02:00:00:00:00:99", tc.says); n != want {
				t.Errorf("%d %s Warnings saying %q, want %d: %q", n, plan.EventConflict, tc.says, want, h.collect())
			}
		})
	}
}

// Another node holds the address: this node's pod is steered to it, in
// the firewall and in the routes, and nothing is bound or SNATed here.
func TestLocalPodIsSteeredToTheHolder(t *testing.T) {
	h := newHarness(t, egressApp("web", "203.0.113.10", "10.244.1.5", false)...)
	h.elections.peer("node-b", "192.0.2.2")
	h.elections.hold("node-b", []string{"web"}, "203.0.113.10")
	h.elections.grantAll()
	h.sync()
	want := []model.SteerRule{{Service: "default/web", Pod: addr("10.244.1.5"), Holder: "node-b", Via: []netip.Addr{addr("192.0.2.2")}}}
	if got := h.snat.datapath().Steer; !reflect.DeepEqual(got, want) {
		t.Errorf("firewall steering %+v, want %+v", got, want)
	}
	if got := h.routes.routes().Steer; !reflect.DeepEqual(got, want) {
		t.Errorf("routes %+v, want %+v", got, want)
	}
	if len(h.snat.snat("default/web")) != 0 || h.addrs.has("203.0.113.10") || len(h.elections.claimed()) != 0 {
		t.Errorf("took part of a Service another node holds: SNAT %v, %s, claims %v", h.snat.snat("default/web"), h.j, h.elections.claimed())
	}
}

// A pod the Service selects that no EndpointSlice lists yet: while it has
// no address the gate holds back unknown pods' traffic; once it has one it
// is SNATed (its first packet), before it is ready.
func TestSelectedPodEgressesFromItsFirstPacket(t *testing.T) {
	h := newHarness(t,
		lbService("web", "203.0.113.10", false, annotations.Egress, "true"), endpointSlice("web"),
		podHere("db", "db", "10.244.1.9"))
	h.elections.hold(nodeName, []string{"web"}, "203.0.113.10")
	h.sync()
	if !h.addrs.has("203.0.113.10") || h.snat.datapath().Gate != nil {
		t.Fatalf("setup: bound %v, gate %+v", h.addrs.has("203.0.113.10"), h.snat.datapath().Gate)
	}

	if _, err := h.client.CoreV1().Pods("default").Create(context.Background(), podHere("web-new", "web", ""), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the pending pod in the cache", func() bool { return h.cachedPod("web-new") != nil })
	h.sync()
	gate := h.snat.datapath().Gate
	if gate == nil || !slices.Equal(gate.PodCIDRs, []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24")}) ||
		!slices.Equal(gate.Known, []netip.Addr{addr("10.244.1.9")}) {
		t.Fatalf("gate %+v while a selected pod starts without an address", gate)
	}

	p := podHere("web-new", "web", "10.244.1.7")
	if _, err := h.client.CoreV1().Pods("default").UpdateStatus(context.Background(), p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the pod's address in the cache", func() bool {
		c := h.cachedPod("web-new")
		return c != nil && len(c.IPs) == 1
	})
	h.sync()
	if got := h.snat.snat("default/web"); !slices.Equal(got, []string{"10.244.1.7>203.0.113.10"}) {
		t.Errorf("SNAT %v: the pod egresses once it has an address", got)
	}
	if gate := h.snat.datapath().Gate; gate != nil {
		t.Errorf("gate %+v once every selected pod has an address", gate)
	}
}

// A Service Lease deleted by hand is written again; the address stays.
func TestDeletedServiceLeaseDoesNotUnbind(t *testing.T) {
	h := newHarness(t, egressApp("web", "203.0.113.10", "10.244.1.5", true)...)
	h.elections.hold(nodeName, []string{"web"}, "203.0.113.10")
	h.sync()
	if !h.addrs.has("203.0.113.10") {
		t.Fatal("setup: not bound")
	}
	h.elections.set(func(v *model.ElectionView) {
		l := v.Leases[svcLease("web")]
		l.Deleted = true
		v.Leases[svcLease("web")] = l
	})
	h.sync()
	h.sync()
	if !h.addrs.has("203.0.113.10") || h.j.has("remove 203.0.113.10") {
		t.Fatalf("unbound after its Service Lease was deleted: %s", h.j)
	}
	if c := h.elections.claimed(); len(c) == 0 || slices.ContainsFunc(c, func(l types.NamespacedName) bool { return l != svcLease("web") }) {
		t.Errorf("acquired %v, want the deleted Service Lease written again (and nothing else)", c)
	}
	if got := h.snat.snat("default/web"); len(got) != 1 {
		t.Errorf("SNAT %v", got)
	}
}

// A problem that may clear by itself (no address yet: an allocator is
// writing it) is reported only once it lasts.
func TestTransientProblemIsReportedOnlyIfItLasts(t *testing.T) {
	h := newHarness(t, lbService("web", "", false))
	h.sync()
	h.clock.Step(4 * time.Second)
	h.sync()
	if n := h.count("Warning", "NoLoadBalancerIP"); n != 0 {
		t.Fatalf("reported before it lasted: %q", h.collect())
	}
	h.clock.Step(2 * time.Second)
	h.sync()
	h.sync()
	if n := h.count("Warning", "NoLoadBalancerIP"); n != 1 {
		t.Fatalf("%d Warnings once it lasted, want 1: %q", n, h.collect())
	}
}

// A Service of another load balancer class is not ours.
func TestForeignClassIsIgnored(t *testing.T) {
	svc := lbService("web", "203.0.113.10", false)
	other := "example.com/other"
	svc.Spec.LoadBalancerClass = &other
	h := newHarness(t, svc)
	h.elections.grantAll()
	h.sync()
	h.sync()
	if len(h.elections.claimed()) != 0 || h.addrs.has("203.0.113.10") {
		t.Fatal("a Service of another class was served")
	}
}

// A write to a Service deleted since the sync is not retried.
func TestReportOnDeletedServiceIsNotRetried(t *testing.T) {
	h := newHarness(t, egressApp("web", "203.0.113.10", "10.244.1.5", true)...)
	h.client.PrependReactor("patch", "services", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewNotFound(corev1.Resource("services"), "web")
	})
	h.elections.hold(nodeName, []string{"web"}, "203.0.113.10")
	if err := h.ctrl.Sync(h.ctx); err != nil {
		t.Fatal(err)
	}
	if h.ctrl.reporter.queue.Len() != 1 {
		t.Fatal("setup: no write queued")
	}
	h.ctrl.reporter.processNext(h.ctx)
	if n := h.ctrl.reporter.queue.NumRequeues(key("web")); n != 0 {
		t.Fatalf("a write to a deleted Service was requeued %d times", n)
	}
}

// A plan whose heartbeat lapsed before it was applied (the process was
// frozen or starved between the two) binds nothing new: another node may
// have taken the address over meanwhile. The next sync plans again. A
// plan that was merely slow, its heartbeat fresh throughout, binds.
func TestStalePlanBindsNothingNew(t *testing.T) {
	cases := []struct {
		name     string
		between  func(h *harness)
		wantBind bool
	}{
		{"heartbeat back in a new epoch", func(h *harness) { h.clock.Step(30 * time.Second); h.elections.lapse() }, false},
		{"heartbeat overdue", func(h *harness) {
			h.clock.Step(4 * time.Second)
			h.elections.set(func(v *model.ElectionView) { v.Overdue = true })
		}, false},
		{"slow, heartbeat fresh", func(h *harness) { h.clock.Step(2 * time.Second) }, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, egressApp("web", "203.0.113.10", "10.244.1.5", true)...)
			h.sync()
			h.elections.grantAll()
			h.addrs.onProbe = func() { tc.between(h) }
			h.sync()
			if got := h.addrs.has("203.0.113.10"); got != tc.wantBind {
				t.Fatalf("bound %v, want %v: %s", got, tc.wantBind, h.j)
			}
			h.addrs.onProbe = nil
			h.elections.set(func(v *model.ElectionView) { v.Overdue = false })
			h.sync()
			if !h.addrs.has("203.0.113.10") {
				t.Fatalf("the next sync did not bind the address: %s", h.j)
			}
		})
	}
}
