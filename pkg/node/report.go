package node

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/util/workqueue"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/pkg/kube"
	"github.com/egressvip/egressvip/pkg/metrics"
	"github.com/egressvip/egressvip/pkg/plan"
)

// reportTimeout bounds one write of a Service's annotations or status.
const reportTimeout = 10 * time.Second

// reporter writes what the leader reports on its Services (annotations and
// status.loadBalancer.ingress) from its own queue, so an API server that
// hangs never holds up the sync loop: the datapath must react to a lost
// Lease at once, also while a write is stuck.
type reporter struct {
	client   kube.Interface
	services corelisters.ServiceLister
	log      *logrus.Entry
	metrics  *metrics.Metrics
	queue    workqueue.TypedRateLimitingInterface[types.NamespacedName]

	mu   sync.Mutex
	want map[types.NamespacedName]plan.Report
	// seen is the resourceVersion of the Service last compared with
	// its report.
	seen map[types.NamespacedName]string
}

func newReporter(client kube.Interface, services corelisters.ServiceLister, m *metrics.Metrics, log *logrus.Entry) *reporter {
	return &reporter{
		client: client, services: services, log: log, metrics: m,
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedItemExponentialFailureRateLimiter[types.NamespacedName](200*time.Millisecond, 30*time.Second),
			workqueue.TypedRateLimitingQueueConfig[types.NamespacedName]{Name: "egressvip-report"}),
		want: map[types.NamespacedName]plan.Report{},
		seen: map[types.NamespacedName]string{},
	}
}

// set records what this node, as leader, reports on svc, and queues a
// write if the cached Service shows something else.
func (r *reporter) set(svc *corev1.Service, rep plan.Report) {
	key := types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name}
	r.mu.Lock()
	prev, had := r.want[key]
	r.want[key] = rep
	r.mu.Unlock()
	// Most syncs change nothing in a report; the cached Service then
	// already shows it, unless it changed, which re-queues it.
	if had && prev.Equal(rep) && r.seen[key] == svc.ResourceVersion {
		return
	}
	r.mu.Lock()
	r.seen[key] = svc.ResourceVersion
	r.mu.Unlock()
	if !patchFor(svc, rep).empty() {
		r.queue.Add(key)
	}
}

// retain forgets every Service not in keep: this node no longer leads it,
// and the new leader reports.
func (r *reporter) retain(keep map[types.NamespacedName]bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for k := range r.want {
		if !keep[k] {
			delete(r.want, k)
			delete(r.seen, k)
		}
	}
}

// reportWorkers is how many writes the reporter has in flight: a write
// waits for the API server (tens of milliseconds on a busy one), and a node
// that takes 2,000 Services over has two or three to do for each. The
// report client's QPS bounds them all; the queue never hands one Service
// to two workers.
const reportWorkers = 8

// run writes until ctx ends.
func (r *reporter) run(ctx context.Context) {
	go func() {
		<-ctx.Done()
		r.queue.ShutDown()
	}()
	var wg sync.WaitGroup
	for range reportWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r.processNext(ctx) {
			}
		}()
	}
	wg.Wait()
}

func (r *reporter) processNext(ctx context.Context) bool {
	key, quit := r.queue.Get()
	if quit {
		return false
	}
	defer r.queue.Done(key)
	// A Service deleted since the sync has nothing left to report on.
	if err := r.write(ctx, key); err != nil && !apierrors.IsNotFound(err) {
		r.log.WithError(err).WithField("service", key.String()).Warn("reporting on the Service failed; retrying")
		if r.metrics != nil {
			r.metrics.ReportErrors.Inc()
		}
		r.queue.AddRateLimited(key)
		return true
	}
	r.queue.Forget(key)
	return true
}

// write brings one Service's annotations and status to what this node
// reports, from the cached Service, each only when it differs.
func (r *reporter) write(ctx context.Context, key types.NamespacedName) error {
	r.mu.Lock()
	rep, ok := r.want[key]
	r.mu.Unlock()
	if !ok {
		return nil
	}
	svc, err := r.services.Services(key.Namespace).Get(key.Name)
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	p := patchFor(svc, rep)
	ctx, cancel := context.WithTimeout(ctx, reportTimeout)
	defer cancel()
	if p.annotations != nil {
		body, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": p.annotations}})
		if _, err := r.client.Services(key.Namespace).Patch(ctx, key.Name, types.MergePatchType, body, metav1.PatchOptions{}); err != nil {
			return fmt.Errorf("annotate Service %s: %w", key, err)
		}
	}
	if p.status != nil {
		body, _ := json.Marshal(map[string]any{"status": map[string]any{"loadBalancer": map[string]any{"ingress": p.status}}})
		if _, err := r.client.Services(key.Namespace).Patch(ctx, key.Name, types.MergePatchType, body, metav1.PatchOptions{}, "status"); err != nil {
			return fmt.Errorf("update status of Service %s: %w", key, err)
		}
	}
	return nil
}

// patch is what a Service lacks of a report: annotations to set (a nil
// value removes one) and the ingress list; nil where nothing differs.
type patch struct {
	annotations map[string]any
	status      []corev1.LoadBalancerIngress
}

func (p patch) empty() bool { return p.annotations == nil && p.status == nil }

// Annotations egressvip writes besides kube-vip's: how many pods of the
// Service egress with its address, and how many of them run on other nodes
// and are steered to the holder. (Not under egressvip.io/egress, the
// prefix of the annotations users write.)
const (
	AnnotationEgressEndpoints  = "egressvip.io/endpoints"
	AnnotationSteeredEndpoints = "egressvip.io/steered-endpoints"
)

// reportAnnotations maps each reported annotation to its value; "" means
// the annotation should be absent.
func reportAnnotations(r plan.Report) map[string]string {
	return map[string]string{
		annotations.VIPHost:            r.VIPHost,
		annotations.ActiveEndpoint:     r.ActiveEndpoint,
		annotations.ActiveEndpointIPv6: r.ActiveEndpointIPv6,
		AnnotationEgressEndpoints:      r.Egress,
		AnnotationSteeredEndpoints:     r.Steered,
	}
}

func patchFor(svc *corev1.Service, rep plan.Report) patch {
	var p patch
	anns := map[string]any{}
	for k, want := range reportAnnotations(rep) {
		have, ok := svc.Annotations[k]
		switch {
		case want == "" && ok:
			anns[k] = nil
		case want != "" && have != want:
			anns[k] = want
		}
	}
	if len(anns) > 0 {
		p.annotations = anns
	}
	ingress := make([]corev1.LoadBalancerIngress, 0, len(rep.Ingress))
	vip := corev1.LoadBalancerIPModeVIP
	for _, ip := range rep.Ingress {
		ingress = append(ingress, corev1.LoadBalancerIngress{IP: ip, IPMode: &vip})
	}
	if !sameIngress(svc.Status.LoadBalancer.Ingress, ingress) {
		p.status = ingress
	}
	return p
}

func sameIngress(a, b []corev1.LoadBalancerIngress) bool {
	return slices.EqualFunc(a, b, func(x, y corev1.LoadBalancerIngress) bool {
		return x.IP == y.IP && x.Hostname == "" && (x.IPMode == nil || y.IPMode == nil || *x.IPMode == *y.IPMode)
	})
}
