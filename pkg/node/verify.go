package node

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/workqueue"

	"github.com/egressvip/egressvip/pkg/desired"
	"github.com/egressvip/egressvip/pkg/kube"
)

// verifier confirms that another node's endpoint is what its EndpointSlice
// says: a pod of the Service's namespace, on that node, not on the host
// network, with that address. The holder SNATs the traffic other nodes
// steer to it by source address, and a hand-written EndpointSlice may name
// any address: so it reads the pod itself, once per pod and address, before
// that traffic gets the Service's identity. Until then the steered traffic
// is held (dropped), never sent with the node's address.
type verifier struct {
	client kube.Interface
	poke   func()
	log    *logrus.Entry
	queue  workqueue.TypedRateLimitingInterface[podKey]
	now    func() time.Time

	mu      sync.Mutex
	entries map[podKey]*verdict
}

type podKey struct {
	namespace, name, node string
	addr                  netip.Addr
}

type verdict struct {
	v      desired.Verdict
	reason string
	at     time.Time
	used   time.Time
}

// Refusals are read again after refusedTTL (the slice may have been ahead
// of the pod); entries nobody asked for in unusedTTL are forgotten.
const (
	refusedTTL = 30 * time.Second
	unusedTTL  = 10 * time.Minute
)

func newVerifier(client kube.Interface, poke func(), log *logrus.Entry) *verifier {
	return &verifier{
		client: client, poke: poke, log: log, now: time.Now,
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedItemExponentialFailureRateLimiter[podKey](100*time.Millisecond, 30*time.Second),
			workqueue.TypedRateLimitingQueueConfig[podKey]{Name: "egressvip-verify"}),
		entries: map[podKey]*verdict{},
	}
}

// Verdict answers from the cache and queues a read when it has no answer.
func (v *verifier) Verdict(namespace, name, node string, addr netip.Addr) (desired.Verdict, string) {
	k := podKey{namespace, name, node, addr}
	now := v.now()
	v.mu.Lock()
	e, ok := v.entries[k]
	if ok {
		e.used = now
	}
	v.mu.Unlock()
	switch {
	case !ok:
		v.queue.Add(k)
		return desired.Unknown, ""
	case e.v == desired.Refused && now.Sub(e.at) > refusedTTL:
		v.queue.Add(k)
	}
	return e.v, e.reason
}

// run reads pods until ctx ends, with a few workers.
func (v *verifier) run(ctx context.Context, workers int) {
	go func() {
		<-ctx.Done()
		v.queue.ShutDown()
	}()
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for v.next(ctx) {
			}
		}()
	}
	sweep := time.NewTicker(time.Minute)
	defer sweep.Stop()
	for {
		select {
		case <-ctx.Done():
			wg.Wait()
			return
		case <-sweep.C:
			v.mu.Lock()
			for k, e := range v.entries {
				if v.now().Sub(e.used) > unusedTTL {
					delete(v.entries, k)
				}
			}
			v.mu.Unlock()
		}
	}
}

func (v *verifier) next(ctx context.Context) bool {
	k, quit := v.queue.Get()
	if quit {
		return false
	}
	defer v.queue.Done(k)
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	pod, err := v.client.Pods(k.namespace).Get(rctx, k.name, metav1.GetOptions{})
	cancel()
	var res desired.Verdict
	var reason string
	switch {
	case apierrors.IsNotFound(err):
		res, reason = desired.Refused, fmt.Sprintf("there is no pod %s/%s", k.namespace, k.name)
	case err != nil:
		v.log.WithError(err).WithField("pod", k.namespace+"/"+k.name).Debug("cannot read a steered pod; retrying")
		v.queue.AddRateLimited(k)
		return true
	default:
		res, reason = judgePod(pod, k)
	}
	v.queue.Forget(k)
	now := v.now()
	v.mu.Lock()
	prev, had := v.entries[k]
	v.entries[k] = &verdict{v: res, reason: reason, at: now, used: now}
	v.mu.Unlock()
	if !had || prev.v != res {
		v.poke()
	}
	return true
}

// judgePod checks a pod against the endpoint that names it.
func judgePod(p *corev1.Pod, k podKey) (desired.Verdict, string) {
	switch {
	case p.Spec.HostNetwork:
		return desired.Refused, fmt.Sprintf("pod %s/%s is on the host network", k.namespace, k.name)
	case k.node != "" && p.Spec.NodeName != k.node:
		return desired.Refused, fmt.Sprintf("pod %s/%s runs on %q, not on %q", k.namespace, k.name, p.Spec.NodeName, k.node)
	case p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed:
		return desired.Refused, fmt.Sprintf("pod %s/%s has ended", k.namespace, k.name)
	}
	if !slices.ContainsFunc(p.Status.PodIPs, func(ip corev1.PodIP) bool {
		a, err := netip.ParseAddr(ip.IP)
		return err == nil && a.Unmap() == k.addr
	}) {
		return desired.Refused, fmt.Sprintf("%s is not an address of pod %s/%s", k.addr, k.namespace, k.name)
	}
	return desired.Trusted, ""
}
