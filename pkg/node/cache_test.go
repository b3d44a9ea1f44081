package node

import (
	"context"
	"fmt"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/tools/record"

	"github.com/egressvip/egressvip/pkg/annotations"
)

// The caches hold what is read: no managedFields, no Service ports, a pod
// cut down to a localPod.
func TestCachesKeepOnlyWhatIsRead(t *testing.T) {
	managed := []metav1.ManagedFieldsEntry{{Manager: "kubectl", Operation: metav1.ManagedFieldsOperationApply}}
	objs := egressApp("web", "203.0.113.10", "10.244.1.5", true)
	svc, sl, pod := objs[0].(*corev1.Service), objs[1].(*discoveryv1.EndpointSlice), objs[2].(*corev1.Pod)
	svc.Spec.Ports = []corev1.ServicePort{{Port: 5060, Protocol: corev1.ProtocolUDP}}
	svc.ManagedFields, sl.ManagedFields, pod.ManagedFields = managed, managed, managed
	pod.Spec.Containers = []corev1.Container{{Name: "app", Image: "example.com/app:1"}}
	h := newHarness(t, objs...)

	cached := h.cachedService("web")
	if cached == nil || len(cached.ManagedFields) != 0 || len(cached.Spec.Ports) != 0 {
		t.Fatalf("cached Service not cut down: %+v", cached)
	}
	if cached.Annotations[annotations.LoadBalancerIPs] != "203.0.113.10" || cached.UID != uid("web") || cached.Spec.Selector["app"] != "web" {
		t.Fatalf("cached Service lost what is read: %+v", cached)
	}
	sls, err := h.ctrl.sliceIndex.ByIndex(byService, "default/web")
	if err != nil || len(sls) != 1 {
		t.Fatalf("cached slices %v (%v)", sls, err)
	}
	if cs := sls[0].(*discoveryv1.EndpointSlice); len(cs.ManagedFields) != 0 || len(cs.Endpoints) != 1 || cs.Endpoints[0].TargetRef.Name != "web-pod" {
		t.Fatalf("cached EndpointSlice %+v", cs)
	}
	p := h.cachedPod("web-pod")
	if p == nil || len(p.ManagedFields) != 0 || len(p.IPs) != 1 || p.IPs[0] != addr("10.244.1.5") || p.Labels["app"] != "web" {
		t.Fatalf("cached pod %+v", p)
	}
}

// BenchmarkSync1000Services measures one full sync of 1,000 egress
// Services this node holds (informer caches, analysis, admission, plan,
// fake kernel appliers, settle, report bookkeeping): the per-event cost of
// the sync loop.
func BenchmarkSync1000Services(b *testing.B) {
	var objs []runtime.Object
	for i := range 1000 {
		name := fmt.Sprintf("svc-%d", i)
		objs = append(objs, egressApp(name, fmt.Sprintf("198.51.%d.%d", 100+i/250, 1+i%250), fmt.Sprintf("10.244.%d.%d", i/250, 1+i%250), true,
			annotations.EgressDestinationPorts, "udp:5060,tcp:8080")...)
	}
	h := newHarness(b, objs...)
	// Events are not the subject: a recorder that keeps none.
	h.ctrl.recorder = &record.FakeRecorder{}
	for i := range 1000 {
		h.elections.hold(nodeName, []string{fmt.Sprintf("svc-%d", i)}, fmt.Sprintf("198.51.%d.%d", 100+i/250, 1+i%250))
	}
	ctx := context.Background()
	for range 2 {
		if err := h.ctrl.Sync(ctx); err != nil {
			b.Fatal(err)
		}
	}
	if n := len(h.snat.datapath().SNAT); n != 1000 {
		b.Fatalf("want 1000 SNAT rules, got %d", n)
	}
	if n := len(h.addrs.bound); n != 1000 {
		b.Fatalf("want 1000 addresses bound, got %d", n)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if err := h.ctrl.Sync(ctx); err != nil {
			b.Fatal(err)
		}
	}
}
