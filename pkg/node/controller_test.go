package node

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/pkg/election"
	"github.com/egressvip/egressvip/pkg/kube/kubefake"
	"github.com/egressvip/egressvip/pkg/netif"
	"github.com/egressvip/egressvip/pkg/plan"
	"github.com/egressvip/egressvip/pkg/snat"
)

const nodeName = "node-a"

// fakeAddrs is a stateful stand-in for pkg/netif.
type fakeAddrs struct {
	mu      sync.Mutex
	bound   map[netip.Addr]bool
	missing bool
}

func (f *fakeAddrs) Sync(_ context.Context, want []netip.Addr) (added, removed []netip.Addr, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.missing {
		return nil, nil, netif.ErrInterfaceNotFound
	}
	next := map[netip.Addr]bool{}
	for _, a := range want {
		next[a] = true
		if !f.bound[a] {
			added = append(added, a)
		}
	}
	for a := range f.bound {
		if !next[a] {
			removed = append(removed, a)
		}
	}
	f.bound = next
	return added, removed, nil
}

func (f *fakeAddrs) Owned() ([]netip.Addr, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []netip.Addr
	for a := range f.bound {
		out = append(out, a)
	}
	return out, nil
}

func (f *fakeAddrs) Host() (netif.Host, error) {
	return netif.Host{Own: []netip.Addr{netip.MustParseAddr("203.0.113.2")}, Subnets: []netip.Prefix{netip.MustParsePrefix("203.0.113.0/24")},
		Gateways: []netip.Addr{netip.MustParseAddr("203.0.113.1")}}, nil
}

func (f *fakeAddrs) has(ip string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.bound[netip.MustParseAddr(ip)]
}

type fakeSNAT struct {
	mu       sync.Mutex
	last     snat.Desired
	tampered bool
	rechecks int
	applies  int
}

// Check reports whether someone changed the rules since the last Apply.
func (f *fakeSNAT) Check(context.Context) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return !f.tampered, nil
}

func (f *fakeSNAT) Apply(_ context.Context, d snat.Desired) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.last = d
	f.applies++
	if f.rechecks > 0 {
		f.tampered = false
	}
	return nil
}

func (f *fakeSNAT) Recheck() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.rechecks++
}

func (f *fakeSNAT) rulesFor(service string) []snat.Rule {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []snat.Rule
	for _, r := range f.last.Rules {
		if r.Service == service {
			out = append(out, r)
		}
	}
	return out
}

// fakeElections is a stateful election view: tests set who holds what;
// acquisitions and releases are recorded (and granted when grant is set).
type fakeElections struct {
	mu          sync.Mutex
	view        election.View
	grant       bool
	claims      []election.Claim
	released    []types.NamespacedName
	releasedNow []types.NamespacedName
	drained     bool
}

func newFakeElections() *fakeElections {
	return &fakeElections{view: election.View{
		Self: nodeName, Established: true,
		Live: map[string]bool{nodeName: true}, Candidates: map[string]bool{nodeName: true},
		Leases: map[types.NamespacedName]election.Lease{},
	}}
}

func (f *fakeElections) View() election.View {
	f.mu.Lock()
	defer f.mu.Unlock()
	v := f.view
	v.Now = time.Now()
	v.Leases = maps.Clone(f.view.Leases)
	v.Live = maps.Clone(f.view.Live)
	v.Candidates = maps.Clone(f.view.Candidates)
	return v
}

func (f *fakeElections) Acquire(c election.Claim) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.claims = append(f.claims, c)
	if f.grant {
		f.view.Leases[c.Lease] = election.Lease{Holder: nodeName, Current: true, OwnerUID: ownerUID(c)}
	}
}

func ownerUID(c election.Claim) types.UID {
	if c.Owner == nil {
		return ""
	}
	return c.Owner.UID
}

func (f *fakeElections) Release(l types.NamespacedName) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.released = append(f.released, l)
	f.view.Leases[l] = election.Lease{}
}

func (f *fakeElections) Drain(context.Context) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.drained = true
	f.view.Draining = true
}

func (f *fakeElections) ReleaseNow(_ context.Context, leases []types.NamespacedName) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, l := range leases {
		f.releasedNow = append(f.releasedNow, l)
		f.view.Leases[l] = election.Lease{}
	}
}

func (f *fakeElections) PeerAddresses() map[netip.Addr]bool {
	return map[netip.Addr]bool{netip.MustParseAddr("203.0.113.12"): true}
}

func (f *fakeElections) set(service string, l election.Lease) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.view.Leases[lease(service)] = l
}

// lead makes this node the current holder of service's Lease.
func (f *fakeElections) lead(service string) {
	f.set(service, election.Lease{Holder: nodeName, Current: true})
}

// follow makes node-b, alive, the holder of service's Lease.
func (f *fakeElections) follow(service string) {
	f.mu.Lock()
	f.view.Live["node-b"] = true
	f.view.Candidates["node-b"] = true
	f.mu.Unlock()
	f.set(service, election.Lease{Holder: "node-b"})
}

func (f *fakeElections) claimed(service string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.ContainsFunc(f.claims, func(c election.Claim) bool { return c.Lease == lease(service) })
}

func (f *fakeElections) wasReleased(service string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Contains(f.released, lease(service)) || slices.Contains(f.releasedNow, lease(service))
}

func lease(service string) types.NamespacedName {
	return types.NamespacedName{Namespace: "default", Name: election.LeaseName(service)}
}

// staticExclusions are pod ranges used as the only exclusions, with no
// Node addresses.
type staticExclusions []netip.Prefix

func (s staticExclusions) Exclude() []netip.Prefix            { return s }
func (s staticExclusions) PodCIDRs() []netip.Prefix           { return s }
func (s staticExclusions) NodeAddresses() map[netip.Addr]bool { return nil }
func (s staticExclusions) Missing(v6 bool) []string {
	for _, p := range s {
		if p.Addr().Is6() == v6 {
			return nil
		}
	}
	return []string{"pod", "Service"}
}

// podsFor returns the Pods behind the EndpointSlices' endpoints on this
// node, so that they pass the trust check like real pods.
func podsFor(objs []runtime.Object) []runtime.Object {
	var out []runtime.Object
	for _, o := range objs {
		sl, ok := o.(*discoveryv1.EndpointSlice)
		if !ok {
			continue
		}
		for _, ep := range sl.Endpoints {
			if ep.NodeName == nil || *ep.NodeName != nodeName || ep.TargetRef == nil {
				continue
			}
			out = append(out, &corev1.Pod{
				ObjectMeta: metav1.ObjectMeta{Namespace: sl.Namespace, Name: ep.TargetRef.Name},
				Spec:       corev1.PodSpec{NodeName: nodeName},
				Status:     corev1.PodStatus{PodIPs: []corev1.PodIP{{IP: ep.Addresses[0]}}},
			})
		}
	}
	return out
}

type harness struct {
	t         testing.TB
	client    *fake.Clientset
	ctrl      *Controller
	addrs     *fakeAddrs
	snat      *fakeSNAT
	elections *fakeElections
	events    *record.FakeRecorder
}

func newHarness(t testing.TB, objs ...runtime.Object) *harness {
	t.Helper()
	client := fake.NewClientset(append(objs, podsFor(objs)...)...)
	log := logrus.New()
	log.SetOutput(io.Discard)
	h := &harness{t: t, client: client, addrs: &fakeAddrs{bound: map[netip.Addr]bool{}}, snat: &fakeSNAT{},
		elections: newFakeElections(), events: record.NewFakeRecorder(10000)}
	ctrl, err := New(Options{Node: nodeName, Owns: func(c *string) bool { return c == nil || *c == "kube-vip.io/kube-vip-class" }, Election: true},
		kubefake.Wrap(client), kubefake.Wrap(client), h.addrs, h.snat, h.elections, staticExclusions{netip.MustParsePrefix("10.244.0.0/16")}, h.events, logrus.NewEntry(log))
	if err != nil {
		t.Fatal(err)
	}
	h.ctrl = ctrl
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	ctrl.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), ctrl.hasSynced...) {
		t.Fatal("caches did not sync")
	}
	return h
}

// sync runs one sync after the informers caught up with the fake client.
func (h *harness) sync() {
	h.t.Helper()
	time.Sleep(50 * time.Millisecond) // let informer events land in the cache
	if err := h.ctrl.Sync(context.Background()); err != nil {
		h.t.Fatalf("sync: %v", err)
	}
	h.report()
}

// report performs the writes the sync queued for the reporter.
func (h *harness) report() {
	for h.ctrl.reporter.queue.Len() > 0 {
		h.ctrl.reporter.processNext(context.Background())
	}
}

func (h *harness) service(name string) *corev1.Service {
	h.t.Helper()
	s, err := h.client.CoreV1().Services("default").Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		h.t.Fatal(err)
	}
	return s
}

func (h *harness) drainEvents() []string {
	var out []string
	for {
		select {
		case e := <-h.events.Events:
			out = append(out, e)
		default:
			return out
		}
	}
}

func lbService(name, ips string, local bool, ann ...string) *corev1.Service {
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name, Annotations: map[string]string{annotations.LoadBalancerIPs: ips}},
		Spec:       corev1.ServiceSpec{Type: corev1.ServiceTypeLoadBalancer, ExternalTrafficPolicy: corev1.ServiceExternalTrafficPolicyCluster},
	}
	if local {
		s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
	}
	for i := 0; i+1 < len(ann); i += 2 {
		s.Annotations[ann[i]] = ann[i+1]
	}
	return s
}

func endpointSlice(svc, podIP, onNode string) *discoveryv1.EndpointSlice {
	ready := true
	return &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "default", Name: svc + "-abc", Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Endpoints: []discoveryv1.Endpoint{{
			Addresses: []string{podIP}, NodeName: &onNode, Conditions: discoveryv1.EndpointConditions{Ready: &ready},
			TargetRef: &corev1.ObjectReference{Kind: "Pod", Name: svc + "-pod"},
		}},
	}
}

func TestLeaderProgramsAndReports(t *testing.T) {
	h := newHarness(t,
		lbService("web", "203.0.113.10", true, annotations.Egress, "true"),
		endpointSlice("web", "10.244.1.5", nodeName))
	h.sync()
	if !h.elections.claimed("web") {
		t.Fatal("the only node with a local ready endpoint must acquire the free Lease")
	}
	if c := h.elections.claims[0]; c.Owner == nil || c.Owner.Kind != "Service" || c.Owner.Name != "web" {
		t.Fatalf("the Lease must be owned by its Service: %+v", c.Owner)
	}
	if h.addrs.has("203.0.113.10") || len(h.snat.rulesFor("default/web")) != 0 {
		t.Fatal("programmed before the Lease was written")
	}
	h.elections.lead("web")
	h.sync()
	if !h.addrs.has("203.0.113.10") {
		t.Fatal("leader did not bind the LoadBalancer IP")
	}
	rules := h.snat.rulesFor("default/web")
	if len(rules) != 1 || rules[0].PodIP != netip.MustParseAddr("10.244.1.5") || rules[0].SourceIP != netip.MustParseAddr("203.0.113.10") {
		t.Fatalf("rules %+v", rules)
	}
	svc := h.service("web")
	if svc.Annotations[annotations.VIPHost] != nodeName || svc.Annotations[annotations.ActiveEndpoint] != "10.244.1.5" {
		t.Fatalf("annotations %v", svc.Annotations)
	}
	if len(svc.Status.LoadBalancer.Ingress) != 1 || svc.Status.LoadBalancer.Ingress[0].IP != "203.0.113.10" {
		t.Fatalf("status %+v", svc.Status.LoadBalancer)
	}

	// A steady state writes nothing more.
	before := len(h.client.Actions())
	h.sync()
	for _, a := range h.client.Actions()[before:] {
		if a.GetVerb() == "patch" || a.GetVerb() == "update" {
			t.Fatalf("steady state wrote %s %s", a.GetVerb(), a.GetResource().Resource)
		}
	}

	// Egress annotation removed: rules go, the address stays, active-endpoint is cleared.
	svc = h.service("web")
	delete(svc.Annotations, annotations.Egress)
	if _, err := h.client.CoreV1().Services("default").Update(context.Background(), svc, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	h.sync()
	if len(h.snat.rulesFor("default/web")) != 0 || !h.addrs.has("203.0.113.10") {
		t.Fatalf("after removing the egress annotation: rules %v", h.snat.rulesFor("default/web"))
	}
	if _, ok := h.service("web").Annotations[annotations.ActiveEndpoint]; ok {
		t.Fatal("active-endpoint not cleared")
	}

	// Service deleted: address gone; the Lease goes with the Service
	// (ownerReference), so it is not written.
	if err := h.client.CoreV1().Services("default").Delete(context.Background(), "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	h.sync()
	if h.addrs.has("203.0.113.10") {
		t.Fatal("address kept after the Service was deleted")
	}
}

// The pod leaves the node: the Lease is released only once the kernel no
// longer holds the address, never while a failed removal may have left it.
func TestLeaseReleasedOnlyAfterTheKernelLetGo(t *testing.T) {
	h := newHarness(t,
		lbService("web", "203.0.113.10", true, annotations.Egress, "true"),
		endpointSlice("web", "10.244.1.5", nodeName))
	h.elections.lead("web")
	h.sync()
	if !h.addrs.has("203.0.113.10") {
		t.Fatal("setup: leader did not bind the address")
	}
	moved := endpointSlice("web", "10.244.2.5", "node-b")
	if _, err := h.client.DiscoveryV1().EndpointSlices("default").Update(context.Background(), moved, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond)
	h.addrs.missing = true
	if err := h.ctrl.Sync(context.Background()); err == nil {
		t.Fatal("setup: the address sync should fail")
	}
	if h.elections.wasReleased("web") {
		t.Fatal("released the Lease although removing the address failed")
	}
	h.addrs.missing = false
	h.sync()
	if h.addrs.has("203.0.113.10") || !h.elections.wasReleased("web") {
		t.Fatalf("after a successful removal: bound %v, released %v", h.addrs.has("203.0.113.10"), h.elections.released)
	}
}

// A write to the API server that hangs does not hold up the sync loop: the
// address of a Service whose Lease is lost goes at once.
func TestHangingAPIWriteDoesNotBlockTheDatapath(t *testing.T) {
	h := newHarness(t, lbService("web", "203.0.113.10", false))
	unblock := make(chan struct{})
	defer close(unblock)
	h.client.PrependReactor("patch", "services", func(k8stesting.Action) (bool, runtime.Object, error) {
		<-unblock
		return true, nil, errors.New("API server unreachable")
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go h.ctrl.reporter.run(ctx)

	h.elections.lead("web")
	time.Sleep(50 * time.Millisecond) // let informer events land in the cache
	if err := h.ctrl.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !h.addrs.has("203.0.113.10") {
		t.Fatal("leader did not bind the address")
	}
	eventuallyTrue(t, "the report write is stuck", func() bool { return h.ctrl.reporter.queue.Len() == 0 })

	h.elections.follow("web")
	synced := make(chan error, 1)
	go func() { synced <- h.ctrl.Sync(context.Background()) }()
	select {
	case err := <-synced:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the sync loop waited for a hanging API write")
	}
	if h.addrs.has("203.0.113.10") {
		t.Fatal("the address stayed after the Lease was lost")
	}
}

func TestFollowerWritesNothing(t *testing.T) {
	h := newHarness(t, lbService("web", "203.0.113.10", false))
	h.elections.follow("web")
	h.sync()
	if h.addrs.has("203.0.113.10") {
		t.Fatal("follower bound the address")
	}
	for _, a := range h.client.Actions() {
		if a.GetVerb() == "patch" {
			t.Fatalf("follower patched %s", a.GetResource().Resource)
		}
	}
}

func TestLocalPolicyWithoutLocalEndpointDoesNotStand(t *testing.T) {
	h := newHarness(t,
		lbService("web", "203.0.113.10", true, annotations.Egress, "true"),
		endpointSlice("web", "10.244.2.5", "node-b"))
	h.sync()
	if h.elections.claimed("web") {
		t.Fatal("acquired without a local endpoint")
	}
}

func TestForeignClassIgnored(t *testing.T) {
	svc := lbService("web", "203.0.113.10", false)
	class := "example.com/other"
	svc.Spec.LoadBalancerClass = &class
	h := newHarness(t, svc)
	h.elections.lead("web")
	h.sync()
	if h.elections.claimed("web") || h.addrs.has("203.0.113.10") {
		t.Fatal("a Service of another class was served")
	}
}

func TestBadInputIsAnEventOnceAndOthersKeepWorking(t *testing.T) {
	h := newHarness(t,
		lbService("bad", "203.0.113.11", true, annotations.Egress, "true", annotations.EgressDestinationPorts, "tcp:70000"),
		endpointSlice("bad", "10.244.1.6", nodeName),
		lbService("good", "203.0.113.10", true, annotations.Egress, "true"),
		endpointSlice("good", "10.244.1.5", nodeName))
	h.elections.lead("bad")
	h.elections.lead("good")
	h.sync()
	h.sync()
	events := h.drainEvents()
	var bad int
	for _, e := range events {
		if strings.Contains(e, "Warning InvalidAnnotation") && strings.Contains(e, "70000") {
			bad++
		}
	}
	if bad != 1 {
		t.Fatalf("want one InvalidAnnotation event over two syncs, got %d in %q", bad, events)
	}
	if h.addrs.has("203.0.113.11") || len(h.snat.rulesFor("default/bad")) != 0 || h.elections.claimed("bad") {
		t.Fatal("the malformed Service got something programmed")
	}
	if !h.addrs.has("203.0.113.10") || len(h.snat.rulesFor("default/good")) != 1 {
		t.Fatal("the healthy Service stopped working")
	}
}

// A missing interface is one Warning per Service while it lasts, not one
// per sync.
func TestMissingInterfaceIsAnEventOnce(t *testing.T) {
	h := newHarness(t, lbService("web", "203.0.113.10", false))
	h.addrs.missing = true
	h.elections.lead("web")
	time.Sleep(50 * time.Millisecond)
	count := 0
	for range 4 {
		if err := h.ctrl.Sync(context.Background()); !errors.Is(err, netif.ErrInterfaceNotFound) {
			t.Fatalf("Sync error %v, want ErrInterfaceNotFound", err)
		}
		for _, e := range h.drainEvents() {
			if strings.Contains(e, "Warning InterfaceNotFound") {
				count++
			}
		}
	}
	if count != 1 {
		t.Fatalf("want one InterfaceNotFound Warning over four syncs, got %d", count)
	}
}

func TestRestartResumesWithoutRemovingState(t *testing.T) {
	h := newHarness(t,
		lbService("web", "203.0.113.10", true, annotations.Egress, "true"),
		endpointSlice("web", "10.244.1.5", nodeName))
	// The previous process left the address bound and the Lease naming
	// this node; the new process has not renewed its heartbeat yet.
	h.addrs.bound[netip.MustParseAddr("203.0.113.10")] = true
	h.ctrl.mem = plan.Start([]netip.Addr{netip.MustParseAddr("203.0.113.10")})
	h.elections.view.Established = false
	h.elections.set("web", election.Lease{Holder: nodeName})
	h.sync()
	if !h.addrs.has("203.0.113.10") || len(h.snat.rulesFor("default/web")) != 1 {
		t.Fatal("restart removed the datapath before the election decided")
	}
	if evs := h.drainEvents(); len(evs) != 0 {
		t.Fatalf("a restart that changes nothing raised Events: %q", evs)
	}
	// Heartbeat written, but after a gap: the holding must be confirmed
	// by writing it again; the datapath stays meanwhile.
	h.elections.view.Established = true
	h.sync()
	if !h.elections.claimed("web") {
		t.Fatal("an unconfirmed holding was not written again")
	}
	if !h.addrs.has("203.0.113.10") || len(h.snat.rulesFor("default/web")) != 1 {
		t.Fatal("restart removed the datapath while confirming its Lease")
	}
	// Another node turns out to hold the Lease: give it up.
	h.elections.follow("web")
	h.sync()
	if h.addrs.has("203.0.113.10") {
		t.Fatal("kept the address although another node holds the Lease")
	}
}

func TestShutdownKeepsPinnedEgressAndReleasesTheRest(t *testing.T) {
	h := newHarness(t,
		lbService("pinned", "203.0.113.10", true, annotations.Egress, "true"),
		endpointSlice("pinned", "10.244.1.5", nodeName),
		lbService("shared", "203.0.113.20", false))
	h.elections.lead("pinned")
	h.elections.lead("shared")
	h.sync()
	if !h.addrs.has("203.0.113.10") || !h.addrs.has("203.0.113.20") {
		t.Fatal("setup: both addresses should be bound")
	}
	h.ctrl.shutdown()
	if !h.addrs.has("203.0.113.10") || len(h.snat.rulesFor("default/pinned")) != 1 {
		t.Fatal("shutdown removed the pinned egress Service's datapath")
	}
	if h.addrs.has("203.0.113.20") {
		t.Fatal("shutdown kept the address of a Service another node can serve")
	}
	if !h.elections.drained {
		t.Fatal("shutdown did not mark the node as draining")
	}
	if h.elections.wasReleased("pinned") || !h.elections.wasReleased("shared") {
		t.Fatalf("released %v, want only the shared Service's Lease", h.elections.releasedNow)
	}
}

func eventuallyTrue(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for i := 0; i < 200; i++ {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}

// BenchmarkSync1000Services measures one full sync of 1,000 egress
// Services this node leads (informer caches, analysis, desired state,
// fake kernel appliers): the per-event cost of the sync loop.
func BenchmarkSync1000Services(b *testing.B) {
	var objs []runtime.Object
	for i := range 1000 {
		name := fmt.Sprintf("svc-%d", i)
		ip := fmt.Sprintf("198.51.%d.%d", 100+i/250, 1+i%250)
		objs = append(objs,
			lbService(name, ip, true, annotations.Egress, "true", annotations.EgressDestinationPorts, "udp:5060,tcp:8080"),
			endpointSlice(name, fmt.Sprintf("10.244.%d.%d", i/250, 1+i%250), nodeName))
	}
	h := newHarness(b, objs...)
	for i := range 1000 {
		h.elections.lead(fmt.Sprintf("svc-%d", i))
	}
	ctx := context.Background()
	if err := h.ctrl.Sync(ctx); err != nil {
		b.Fatal(err)
	}
	if n := len(h.snat.last.Rules); n != 1000 {
		b.Fatalf("want 1000 rules, got %d", n)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if err := h.ctrl.Sync(ctx); err != nil {
			b.Fatal(err)
		}
	}
}

// A Service deleted between the sync and the write is not retried.
func TestReportOnDeletedServiceIsNotRetried(t *testing.T) {
	h := newHarness(t, lbService("web", "203.0.113.10", false))
	h.client.PrependReactor("patch", "services", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewNotFound(corev1.Resource("services"), "web")
	})
	h.elections.lead("web")
	time.Sleep(50 * time.Millisecond) // let informer events land in the cache
	if err := h.ctrl.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	key := types.NamespacedName{Namespace: "default", Name: "web"}
	if h.ctrl.reporter.queue.Len() != 1 {
		t.Fatal("setup: no write queued")
	}
	h.ctrl.reporter.processNext(context.Background())
	if n := h.ctrl.reporter.queue.NumRequeues(key); n != 0 {
		t.Fatalf("write to a deleted Service requeued %d times", n)
	}
}

// A pod seen in one family only is reported once that lasts, not during
// the moment its two EndpointSlices disagree.
func TestTransientProblemIsReportedOnlyIfItLasts(t *testing.T) {
	svc := lbService("dual", "203.0.113.10,2001:db8:1::10", true, annotations.Egress, "true", annotations.EgressIPv6, "true")
	h := newHarness(t, svc, endpointSlice("dual", "10.244.1.5", nodeName))
	h.elections.lead("dual")
	h.ctrl.settle = time.Hour
	h.sync()
	h.sync()
	if evs := h.drainEvents(); slices.ContainsFunc(evs, func(e string) bool { return strings.Contains(e, "EgressFamilyMismatch") }) {
		t.Fatalf("reported before it lasted: %q", evs)
	}
	if !h.addrs.has("203.0.113.10") || !h.addrs.has("2001:db8:1::10") || len(h.snat.rulesFor("default/dual")) != 1 {
		t.Fatal("the Service lost its addresses or its IPv4 egress while a pod lacked IPv6")
	}
	h.ctrl.settle = 0
	h.sync()
	if evs := h.drainEvents(); !slices.ContainsFunc(evs, func(e string) bool { return strings.Contains(e, "Warning EgressFamilyMismatch") }) {
		t.Fatalf("not reported once it lasted: %q", evs)
	}
}

// For externalTrafficPolicy Local only nodes with a local ready endpoint
// report a Service's problems, not every node of the cluster.
func TestOnlyServingNodesReportProblems(t *testing.T) {
	h := newHarness(t,
		lbService("bad-here", "203.0.113.11", true, annotations.Egress, "true", annotations.EgressDestinationPorts, "tcp:0"),
		endpointSlice("bad-here", "10.244.1.6", nodeName),
		lbService("bad-elsewhere", "203.0.113.12", true, annotations.Egress, "true", annotations.EgressDestinationPorts, "tcp:0"),
		endpointSlice("bad-elsewhere", "10.244.2.6", "node-b"),
		lbService("bad-cluster", "not-an-ip", false))
	h.sync()
	evs := strings.Join(h.drainEvents(), "\n")
	if n := strings.Count(evs, "Warning"); n != 2 {
		t.Fatalf("want 2 Warnings (bad-here, bad-cluster), got:\n%s", evs)
	}
	if !strings.Contains(evs, "InvalidAnnotation") || !strings.Contains(evs, "InvalidLoadBalancerIP") {
		t.Fatalf("events:\n%s", evs)
	}
}

// The caches hold no managedFields, which nothing reads.
func TestCachesDropManagedFields(t *testing.T) {
	svc := lbService("web", "203.0.113.10", false)
	svc.Spec.Ports = []corev1.ServicePort{{Port: 5060}}
	svc.ManagedFields = []metav1.ManagedFieldsEntry{{Manager: "kubectl", Operation: metav1.ManagedFieldsOperationApply}}
	sl := endpointSlice("web", "10.244.1.5", nodeName)
	sl.ManagedFields = svc.ManagedFields
	h := newHarness(t, svc, sl)
	cached, err := h.ctrl.services.Services("default").Get("web")
	if err != nil || len(cached.ManagedFields) != 0 {
		t.Fatalf("cached Service keeps managedFields: %v (%v)", cached.ManagedFields, err)
	}
	if len(cached.Spec.Ports) != 0 || cached.Annotations[annotations.LoadBalancerIPs] != "203.0.113.10" {
		t.Fatalf("cached Service not cut down to what is read: %+v", cached)
	}
	objs, err := h.ctrl.sliceIndex.ByIndex(byService, "default/web")
	if err != nil || len(objs) != 1 || len(objs[0].(*discoveryv1.EndpointSlice).ManagedFields) != 0 {
		t.Fatalf("cached EndpointSlice keeps managedFields: %v (%v)", objs, err)
	}
}

// Addresses of Nodes, of this node's interface and of other nodes'
// interfaces (from their heartbeats) are refused with one Event.
func TestClaimsOfNodeAddressesAreRefused(t *testing.T) {
	h := newHarness(t,
		lbService("own-iface", "203.0.113.2", false),
		lbService("peer-iface", "203.0.113.12", false),
		lbService("gateway", "203.0.113.1", false),
		lbService("fine", "203.0.113.10", false))
	for _, s := range []string{"own-iface", "peer-iface", "gateway", "fine"} {
		h.elections.lead(s)
	}
	h.sync()
	h.sync()
	for _, ip := range []string{"203.0.113.2", "203.0.113.12", "203.0.113.1"} {
		if h.addrs.has(ip) {
			t.Errorf("bound the refused address %s", ip)
		}
	}
	if !h.addrs.has("203.0.113.10") {
		t.Error("an admitted Service lost its address")
	}
	refused := 0
	for _, e := range h.drainEvents() {
		if strings.Contains(e, "Warning LoadBalancerIPRefused") {
			refused++
		}
	}
	if refused != 3 {
		t.Fatalf("want 3 LoadBalancerIPRefused Warnings over two syncs, got %d", refused)
	}
	if ing := h.service("peer-iface").Status.LoadBalancer.Ingress; len(ing) != 0 {
		t.Fatalf("status of a refused Service shows %v", ing)
	}
}

// IPv6 egress without an IPv6 pod range known is reported: it would SNAT
// pod-to-pod traffic.
func TestIPv6EgressWithoutIPv6ExclusionsIsReported(t *testing.T) {
	svc := lbService("v6", "203.0.113.10,2001:db8:1::10", true, annotations.Egress, "true", annotations.EgressIPv6, "true")
	h := newHarness(t, svc, endpointSlice("v6", "10.244.1.5", nodeName))
	h.elections.lead("v6")
	h.sync()
	if !slices.ContainsFunc(h.drainEvents(), func(e string) bool { return strings.Contains(e, "Warning EgressExclusionMissing") }) {
		t.Fatal("no EgressExclusionMissing Warning")
	}
}

// The firewall check runs on the sync loop: rules changed by someone else
// make the next sync compare with the kernel and rewrite them.
func TestTamperedRulesAreRewritten(t *testing.T) {
	h := newHarness(t, lbService("web", "203.0.113.10", true, annotations.Egress, "true"), endpointSlice("web", "10.244.1.5", nodeName))
	h.elections.lead("web")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = h.ctrl.Run(ctx) }()
	eventuallyTrue(t, "ready", h.ctrl.Ready)
	h.snat.mu.Lock()
	h.snat.tampered = true
	before := h.snat.applies
	h.snat.mu.Unlock()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		h.snat.mu.Lock()
		done := h.snat.rechecks > 0 && h.snat.applies > before && !h.snat.tampered
		h.snat.mu.Unlock()
		if done {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatal("tampered rules were not rechecked and rewritten")
}
