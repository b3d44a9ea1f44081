// Package node is the daemon's sync loop: informers record what changed and
// poke one coalescing queue; each sync recomputes the whole desired node
// state (pkg/desired) and hands it to the address and SNAT appliers, then
// writes what the leader reports on its Services.
package node

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"

	"github.com/egressvip/egressvip/pkg/election"
	"github.com/egressvip/egressvip/pkg/kube"
	"github.com/egressvip/egressvip/pkg/metrics"
	"github.com/egressvip/egressvip/pkg/netif"
	"github.com/egressvip/egressvip/pkg/plan"
	"github.com/egressvip/egressvip/pkg/snat"
)

// Addresses binds LoadBalancer IPs on the serviceInterface (pkg/netif).
type Addresses interface {
	Sync(ctx context.Context, want []netip.Addr) (added, removed []netip.Addr, err error)
	Owned() ([]netip.Addr, error)
	// Host is the node's own addresses, subnets and gateways there.
	Host() (netif.Host, error)
}

// SNAT writes the egress rules (pkg/snat).
type SNAT interface {
	Apply(ctx context.Context, d snat.Desired) error
	// Recheck makes the next Apply compare the chains with the kernel.
	Recheck()
}

// Elections is the election (pkg/election): a view to plan with, and the
// writes the plan asks for.
type Elections interface {
	View() election.View
	Acquire(c election.Claim)
	Release(lease types.NamespacedName)
	// Drain marks this node as leaving; ReleaseNow releases and waits.
	Drain(ctx context.Context)
	ReleaseNow(ctx context.Context, leases []types.NamespacedName)
	// PeerAddresses are other nodes' serviceInterface addresses, from
	// their heartbeats.
	PeerAddresses() map[netip.Addr]bool
}

// Cluster is what the node knows of the cluster's ranges and Nodes
// (pkg/cidr).
type Cluster interface {
	// Exclude are the pod and Service CIDRs, never SNATed.
	Exclude() []netip.Prefix
	// PodCIDRs are the pod ranges: only endpoints inside are egressed.
	PodCIDRs() []netip.Prefix
	// NodeAddresses are every Node's addresses.
	NodeAddresses() map[netip.Addr]bool
	// Missing names the exclusions (pod, Service) a family lacks.
	Missing(v6 bool) []string
}

// Options configure a Controller.
type Options struct {
	Node string
	// Namespace limits the Services served ("" for all).
	Namespace string
	// Owns says whether a Service with that spec.loadBalancerClass is ours.
	Owns     func(class *string) bool
	Election bool
	// GlobalLease is the single Lease used when Election is false.
	GlobalLease types.NamespacedName
	// SNATUnavailable, when set, is why egress cannot be programmed on
	// this node (the iptables backend is missing); SNAT is then nil.
	SNATUnavailable string
	// Resync is the longest time between two full syncs.
	Resync time.Duration
	// RetryPeriod separates candidates' turns for a free Lease;
	// RenewDeadline bounds the Lease releases at shutdown.
	RetryPeriod   time.Duration
	RenewDeadline time.Duration
	// Allowed, when not empty, are the only ranges LoadBalancer IPs may
	// come from (egressvip_allowed_cidrs).
	Allowed []netip.Prefix
	// Metrics, when set, receives sync figures.
	Metrics *metrics.Metrics
}

// Controller is the node's sync loop.
type Controller struct {
	opts      Options
	log       *logrus.Entry
	addrs     Addresses
	snat      SNAT
	elections Elections
	excl      Cluster
	recorder  record.EventRecorder
	reporter  *reporter

	services   corelisters.ServiceLister
	sliceIndex cache.Indexer
	pods       cache.Indexer
	informers  []cache.SharedIndexInformer
	startOnce  sync.Once
	hasSynced  []cache.InformerSynced
	queue      workqueue.TypedRateLimitingInterface[string]

	// The fields below belong to the sync loop's goroutine (and to
	// shutdown, which runs after it has stopped).

	// mem is what the last plan left for the next one.
	mem plan.Memory
	// last is the last plan, for shutdown.
	last plan.Plan
	// interfaceErr is why the last address sync could not find the
	// serviceInterface.
	interfaceErr string
	settle       time.Duration
	// lastFull is when the kernel state was last read back in full.
	lastFull time.Time
	// ready is set after the first successful sync.
	ready atomic.Bool
}

// Ready reports whether the caches synced and one sync succeeded.
func (c *Controller) Ready() bool { return c.ready.Load() }

const (
	syncKey  = "sync"
	checkKey = "check"
)

// checkInterval is how often the firewall state egressvip owns is compared
// with what it wrote: CNIs, kube-proxy and admins change the same tables,
// and what egressvip owns must come back within a second.
const checkInterval = 500 * time.Millisecond

// Checker is the SNAT writer's cheap comparison of the kernel with what it
// last wrote (pkg/snat).
type Checker interface {
	Check(ctx context.Context) (bool, error)
}

// check runs on the sync loop's goroutine, so it never interleaves with
// an Apply: a difference makes the next sync rewrite everything.
func (c *Controller) check(ctx context.Context) {
	defer c.queue.AddAfter(checkKey, checkInterval)
	ch, ok := c.snat.(Checker)
	if !ok || !c.ready.Load() {
		return
	}
	intact, err := ch.Check(ctx)
	if err != nil {
		c.log.WithError(err).Debug("firewall check failed")
	}
	if !intact {
		c.log.Warn("egress rules changed by someone else; rewriting them")
		if m := c.opts.Metrics; m != nil {
			m.Repairs.WithLabelValues("firewall").Inc()
		}
		c.snat.Recheck()
		c.Poke()
	}
}

// transientSettle is how long a problem that may clear by itself must last
// before it becomes an Event: a pod's IPv4 and IPv6 EndpointSlices are
// updated one after the other, so every pod start or move of a dual-stack
// Service shows a pod of one family for a moment.
const transientSettle = 5 * time.Second

// New builds a Controller and its informers; Run starts them.
func New(opts Options, client, reportClient kube.Interface, addrs Addresses, snatw SNAT,
	elections Elections, excl Cluster, recorder record.EventRecorder, log *logrus.Entry,
) (*Controller, error) {
	if opts.Resync <= 0 {
		opts.Resync = time.Minute
	}
	if opts.RetryPeriod <= 0 {
		opts.RetryPeriod = time.Second
	}
	if opts.RenewDeadline <= 0 {
		opts.RenewDeadline = 3 * time.Second
	}
	c := &Controller{
		opts: opts, log: log, addrs: addrs, snat: snatw, elections: elections,
		excl: excl, recorder: recorder,
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedItemExponentialFailureRateLimiter[string](200*time.Millisecond, 30*time.Second),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "egressvip"}),
		mem:    plan.Start(nil),
		settle: transientSettle,
	}
	// Nothing reads managedFields, nor most of the rest of these objects:
	// the caches keep what is read (slim).
	svcInformer := kube.NewInformer(client, client.Services(opts.Namespace), &corev1.Service{},
		kube.InformerOptions{Transform: slim})
	// Only EndpointSlices that belong to a Service, indexed by it.
	sliceInformer := kube.NewInformer(client, client.EndpointSlices(opts.Namespace), &discoveryv1.EndpointSlice{}, kube.InformerOptions{
		Indexers:  cache.Indexers{byService: indexByService},
		Tweak:     func(o *metav1.ListOptions) { o.LabelSelector = discoveryv1.LabelServiceName },
		Transform: slim,
	})
	podInformer := localPodInformer(client, opts.Namespace, opts.Node)
	c.informers = []cache.SharedIndexInformer{svcInformer, sliceInformer, podInformer}
	c.pods = podInformer.GetIndexer()
	c.services = corelisters.NewServiceLister(svcInformer.GetIndexer())
	c.reporter = newReporter(reportClient, c.services, opts.Metrics, log)
	c.sliceIndex = sliceInformer.GetIndexer()
	poke := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { c.Poke() },
		UpdateFunc: func(any, any) { c.Poke() },
		DeleteFunc: func(any) { c.Poke() },
	}
	if _, err := svcInformer.AddEventHandler(poke); err != nil {
		return nil, fmt.Errorf("watch Services: %w", err)
	}
	if _, err := sliceInformer.AddEventHandler(cache.FilteringResourceEventHandler{
		FilterFunc: c.sliceMatters,
		Handler:    poke,
	}); err != nil {
		return nil, fmt.Errorf("watch EndpointSlices: %w", err)
	}
	if _, err := podInformer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(any) { c.Poke() },
		UpdateFunc: func(o, n any) {
			if podAddressesChanged(o, n) {
				c.Poke()
			}
		},
		DeleteFunc: func(any) { c.Poke() },
	}); err != nil {
		return nil, fmt.Errorf("watch this node's pods: %w", err)
	}
	c.hasSynced = []cache.InformerSynced{svcInformer.HasSynced, sliceInformer.HasSynced, podInformer.HasSynced}
	return c, nil
}

// slim is the Service and EndpointSlice informers' transform: it cuts them
// down to what is read (no managedFields, no spec or status the controller
// ignores). A node of a cluster with thousands of Services keeps them all.
func slim(obj any) (any, error) {
	switch o := obj.(type) {
	case *corev1.Service:
		return slimService(o), nil
	case *discoveryv1.EndpointSlice:
		return slimSlice(o), nil
	}
	return obj, nil
}

// slimService keeps what the analysis, the reporter and Events read.
func slimService(s *corev1.Service) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: s.Namespace, Name: s.Name, UID: s.UID, ResourceVersion: s.ResourceVersion,
			CreationTimestamp: s.CreationTimestamp, DeletionTimestamp: s.DeletionTimestamp, Annotations: s.Annotations},
		Spec: corev1.ServiceSpec{Type: s.Spec.Type, LoadBalancerClass: s.Spec.LoadBalancerClass,
			ExternalTrafficPolicy: s.Spec.ExternalTrafficPolicy, LoadBalancerIP: s.Spec.LoadBalancerIP},
		Status: corev1.ServiceStatus{LoadBalancer: s.Status.LoadBalancer},
	}
}

// slimSlice keeps of an EndpointSlice its Service and, per endpoint, its
// addresses, conditions, node and pod.
func slimSlice(sl *discoveryv1.EndpointSlice) *discoveryv1.EndpointSlice {
	out := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Namespace: sl.Namespace, Name: sl.Name, ResourceVersion: sl.ResourceVersion,
			Labels: map[string]string{discoveryv1.LabelServiceName: sl.Labels[discoveryv1.LabelServiceName]}},
		AddressType: sl.AddressType,
		Endpoints:   make([]discoveryv1.Endpoint, len(sl.Endpoints)),
	}
	for i, e := range sl.Endpoints {
		out.Endpoints[i] = discoveryv1.Endpoint{Addresses: e.Addresses, Conditions: e.Conditions, NodeName: e.NodeName}
		if e.TargetRef != nil {
			out.Endpoints[i].TargetRef = &corev1.ObjectReference{Kind: e.TargetRef.Kind, Namespace: e.TargetRef.Namespace, Name: e.TargetRef.Name}
		}
	}
	return out
}

// Start starts the informers once; Run calls it.
func (c *Controller) Start(stop <-chan struct{}) {
	c.startOnce.Do(func() {
		for _, inf := range c.informers {
			go inf.Run(stop)
		}
	})
}

// Poke asks for a sync; bursts collapse into one.
func (c *Controller) Poke() { c.queue.Add(syncKey) }

// AddSynced adds another cache the controller waits for before it touches
// the kernel (the CIDR detector's).
func (c *Controller) AddSynced(s cache.InformerSynced) { c.hasSynced = append(c.hasSynced, s) }

// sliceMatters filters EndpointSlice events to slices of Services we serve.
func (c *Controller) sliceMatters(obj any) bool {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = d.Obj
	}
	sl, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok {
		return false
	}
	name := sl.Labels[discoveryv1.LabelServiceName]
	if name == "" {
		return false
	}
	svc, err := c.services.Services(sl.Namespace).Get(name)
	if err != nil {
		// Unknown yet: the Service event will trigger the sync.
		return false
	}
	return c.ours(svc)
}

func (c *Controller) ours(svc *corev1.Service) bool {
	return svc.Spec.Type == corev1.ServiceTypeLoadBalancer &&
		(c.opts.Namespace == "" || svc.Namespace == c.opts.Namespace) &&
		c.opts.Owns(svc.Spec.LoadBalancerClass)
}

// Run waits for the caches, syncs until ctx ends, then shuts down: Services
// another node could serve are released at once with their addresses and
// rules removed; pinned egress Services keep lease, address and rules for
// the next process.
func (c *Controller) Run(ctx context.Context) error {
	c.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), c.hasSynced...) {
		return errors.New("caches did not sync before shutdown")
	}
	owned, err := c.addrs.Owned()
	if err != nil {
		c.log.WithError(err).Warn("cannot list addresses bound by an earlier run")
	}
	c.mem = plan.Start(owned)
	c.log.WithField("addresses", len(owned)).Info("caches synced; starting sync loop")

	c.Poke()
	if c.snat != nil {
		c.queue.AddAfter(checkKey, checkInterval)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for c.processNext(ctx) {
		}
	}()
	reported := make(chan struct{})
	go func() {
		defer close(reported)
		c.reporter.run(ctx)
	}()
	<-ctx.Done()
	c.queue.ShutDown()
	<-done
	<-reported
	c.shutdown()
	return nil
}

func (c *Controller) processNext(ctx context.Context) bool {
	key, quit := c.queue.Get()
	if quit {
		return false
	}
	defer c.queue.Done(key)
	if key == checkKey {
		c.check(ctx)
		return true
	}
	if c.snat != nil && time.Since(c.lastFull) >= c.opts.Resync {
		// The periodic full sync also repairs chains others flushed.
		c.snat.Recheck()
		c.lastFull = time.Now()
	}
	start := time.Now()
	err := c.Sync(ctx)
	if m := c.opts.Metrics; m != nil {
		m.SyncDuration.Observe(time.Since(start).Seconds())
		if err != nil {
			m.SyncErrors.Inc()
		}
	}
	if err != nil {
		c.log.WithError(err).Warn("sync failed; retrying")
		c.queue.AddRateLimited(key)
		return true
	}
	c.queue.Forget(key)
	c.ready.Store(true)
	// The periodic full sync repairs what others flushed.
	c.queue.AddAfter(key, c.opts.Resync)
	return true
}
