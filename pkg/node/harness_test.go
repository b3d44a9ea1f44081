package node

import (
	"context"
	"io"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/pkg/election"
	"github.com/egressvip/egressvip/pkg/kube/kubefake"
)

const (
	nodeName = "node-a"
	daemonNS = "egressvip"
	ourClass = "kube-vip.io/kube-vip-class"
	// waitFor bounds every wait for a condition: generous, the machine
	// running the tests may be loaded.
	waitFor = 30 * time.Second
)

var t0 = time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }

func key(name string) types.NamespacedName {
	return types.NamespacedName{Namespace: "default", Name: name}
}

func uid(name string) types.UID { return types.UID("uid-" + name) }

func svcLease(name string) types.NamespacedName { return election.ServiceLeaseKey(key(name)) }

func addrLease(ip string) types.NamespacedName {
	return types.NamespacedName{Namespace: daemonNS, Name: election.AddressLeaseName(addr(ip))}
}

// lbService is a LoadBalancer Service of namespace default selecting the
// pods labelled app=name; ann are further annotations, name then value.
func lbService(name, ips string, local bool, ann ...string) *corev1.Service {
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name, UID: uid(name), CreationTimestamp: metav1.NewTime(t0.Add(-time.Hour)),
			Annotations: map[string]string{annotations.LoadBalancerIPs: ips}},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeLoadBalancer, Selector: map[string]string{"app": name},
			ExternalTrafficPolicy: corev1.ServiceExternalTrafficPolicyCluster},
	}
	if local {
		s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
	}
	for i := 0; i+1 < len(ann); i += 2 {
		s.Annotations[ann[i]] = ann[i+1]
	}
	return s
}

// endpoint is one ready pod of an EndpointSlice.
type endpoint struct{ pod, ip, node string }

func endpointSlice(svc string, eps ...endpoint) *discoveryv1.EndpointSlice {
	ready := true
	sl := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "default", Name: svc + "-abc", Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: discoveryv1.AddressTypeIPv4,
	}
	for _, e := range eps {
		node := e.node
		sl.Endpoints = append(sl.Endpoints, discoveryv1.Endpoint{
			Addresses: []string{e.ip}, NodeName: &node, Conditions: discoveryv1.EndpointConditions{Ready: &ready},
			TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: "default", Name: e.pod},
		})
	}
	return sl
}

// podHere is a running pod of this node labelled app=app ("" ip: still
// without an address, Pending).
func podHere(name, app, ip string) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name, UID: uid(name), Labels: map[string]string{"app": app}},
		Spec:       corev1.PodSpec{NodeName: nodeName},
		Status:     corev1.PodStatus{Phase: corev1.PodPending},
	}
	if ip != "" {
		p.Status.Phase = corev1.PodRunning
		p.Status.PodIP = ip
		p.Status.PodIPs = []corev1.PodIP{{IP: ip}}
	}
	return p
}

// egressApp is an egress Service with one ready pod on this node: the
// Service, its EndpointSlice and the pod.
func egressApp(name, lb, podIP string, local bool, ann ...string) []runtime.Object {
	return []runtime.Object{
		lbService(name, lb, local, append([]string{annotations.Egress, "true"}, ann...)...),
		endpointSlice(name, endpoint{name + "-pod", podIP, nodeName}),
		podHere(name+"-pod", name, podIP),
	}
}

// harness is a Controller on fakes: client-go's fake clientset for the
// API, stateful fakes for the kernel and the election, a fake clock.
type harness struct {
	t         testing.TB
	ctx       context.Context
	client    *fake.Clientset
	clock     *clocktesting.FakeClock
	j         *journal
	ctrl      *Controller
	addrs     *fakeAddrs
	snat      *fakeSNAT
	routes    *fakeRoutes
	elections *fakeElections
	cluster   *fakeCluster
	recorder  *record.FakeRecorder

	mu     sync.Mutex
	events []string
}

func newHarness(t testing.TB, objs ...runtime.Object) *harness {
	t.Helper()
	return newHarnessWith(t, nil, objs...)
}

// newHarnessWith builds the Controller (tweak may change its options) and
// starts its informers; Sync may be called at once, Run started with run.
func newHarnessWith(t testing.TB, tweak func(*Options), objs ...runtime.Object) *harness {
	t.Helper()
	j := &journal{}
	clk := clocktesting.NewFakeClock(t0)
	h := &harness{t: t, client: fake.NewClientset(objs...), clock: clk, j: j, addrs: newFakeAddrs(j), snat: &fakeSNAT{},
		routes: &fakeRoutes{}, elections: newFakeElections(j, clk), cluster: newFakeCluster(), recorder: record.NewFakeRecorder(1000)}
	log := logrus.New()
	log.SetOutput(io.Discard)
	opts := Options{
		Node: nodeName, DaemonNamespace: daemonNS,
		Owns:        func(c *string) bool { return c == nil || *c == ourClass },
		RetryPeriod: time.Second, RenewDeadline: 3 * time.Second, Grace: 5 * time.Second,
		ExcludeNodes: true, Clock: clk,
	}
	if tweak != nil {
		tweak(&opts)
	}
	ctrl, err := New(opts, kubefake.Wrap(h.client), kubefake.Wrap(h.client), h.addrs, h.snat, h.routes, h.elections, h.cluster,
		h.recorder, logrus.NewEntry(log))
	if err != nil {
		t.Fatal(err)
	}
	h.ctrl = ctrl
	h.elections.poke = ctrl.Poke
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	h.ctx = ctx
	ctrl.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), ctrl.hasSynced...) {
		t.Fatal("caches did not sync")
	}
	return h
}

// sync runs one sync, which must succeed, then the writes it queued for
// the reporter.
func (h *harness) sync() {
	h.t.Helper()
	if err := h.ctrl.Sync(h.ctx); err != nil {
		h.t.Fatalf("sync: %v", err)
	}
	h.report()
}

// report performs the writes queued for the reporter.
func (h *harness) report() {
	for h.ctrl.reporter.queue.Len() > 0 {
		h.ctrl.reporter.processNext(h.ctx)
	}
}

// run starts Run; the returned stop (also a cleanup) ends it and waits
// until it has shut down.
func (h *harness) run() (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- h.ctrl.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					h.t.Errorf("Run: %v", err)
				}
			case <-time.After(waitFor):
				h.t.Fatal("Run did not return after its context ended")
			}
		})
	}
	h.t.Cleanup(stop)
	return stop
}

// eventually waits until cond holds, polling; a generous bound fails it.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", waitFor, what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// cachedService is the informer's copy of a Service (nil when absent).
func (h *harness) cachedService(name string) *corev1.Service {
	s, err := h.ctrl.services.Services("default").Get(name)
	if err != nil {
		return nil
	}
	return s
}

// cachedPod is the informer's copy of a pod of this node (nil when absent).
func (h *harness) cachedPod(name string) *localPod {
	obj, ok, err := h.ctrl.pods.GetByKey("default/" + name)
	if err != nil || !ok {
		return nil
	}
	return obj.(*localPod)
}

// service reads a Service from the (fake) API server.
func (h *harness) service(name string) *corev1.Service {
	h.t.Helper()
	s, err := h.client.CoreV1().Services("default").Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		h.t.Fatal(err)
	}
	return s
}

// updateService changes a Service on the API server and waits until the
// cache shows the change.
func (h *harness) updateService(name string, change func(s *corev1.Service)) {
	h.t.Helper()
	s := h.service(name)
	change(s)
	if _, err := h.client.CoreV1().Services("default").Update(context.Background(), s, metav1.UpdateOptions{}); err != nil {
		h.t.Fatal(err)
	}
	eventually(h.t, "the cache to show the updated Service "+name, func() bool {
		c := h.cachedService(name)
		return c != nil && annotationsEqual(c.Annotations, s.Annotations)
	})
}

func annotationsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// collect moves the Events recorded so far into h.events.
func (h *harness) collect() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	for {
		select {
		case e := <-h.recorder.Events:
			h.events = append(h.events, e)
		default:
			return h.events
		}
	}
}

// count counts the Events so far of type kind and reason whose message
// contains each of words.
func (h *harness) count(kind, reason string, words ...string) int {
	n := 0
	for _, e := range h.collect() {
		rest, ok := strings.CutPrefix(e, kind+" "+reason+" ")
		if !ok {
			continue
		}
		all := true
		for _, w := range words {
			all = all && strings.Contains(rest, w)
		}
		if all {
			n++
		}
	}
	return n
}
