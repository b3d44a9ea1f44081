// Package node is the daemon's sync loop: informers record what changed and
// poke one coalescing queue; each sync analyses every Service (pkg/desired),
// plans the whole node state (pkg/plan) and hands it to the address, SNAT
// and routing appliers, then writes what the holder reports on its
// Services. The loop also refreshes the lifetime of the addresses it holds
// every half second: if it stops, the kernel drops them.
package node

import (
	"context"
	"errors"
	"fmt"
	"net"
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
	"k8s.io/utils/clock"

	"github.com/egressvip/egressvip/pkg/election"
	"github.com/egressvip/egressvip/pkg/kube"
	"github.com/egressvip/egressvip/pkg/metrics"
	"github.com/egressvip/egressvip/pkg/model"
	"github.com/egressvip/egressvip/pkg/netif"
	"github.com/egressvip/egressvip/pkg/plan"
)

// Addresses binds LoadBalancer IPs on the serviceInterface (pkg/netif).
type Addresses interface {
	Sync(ctx context.Context, want []model.Binding) (netif.Result, error)
	// Refresh renews the lifetime of the addresses the last Sync wanted,
	// in slices, while while says so (nil: the whole round).
	Refresh(ctx context.Context, while func() bool) error
	Owned() ([]netip.Addr, error)
	// Host is the node's own addresses, subnets and gateways there, and
	// whether the interface is up.
	Host() (netif.Host, error)
	// Probe asks the wire whether another host answers for addrs.
	Probe(ctx context.Context, addrs []netip.Addr, wait time.Duration) (map[netip.Addr]net.HardwareAddr, error)
	// Persist makes addresses' lifetime unlimited (graceful shutdown).
	Persist(ctx context.Context, addrs []netip.Addr) error
}

// SNAT writes the egress firewall rules (pkg/snat).
type SNAT interface {
	Apply(ctx context.Context, d model.Datapath) (map[string]error, error)
	// Recheck makes the next Apply compare the rules with the kernel.
	Recheck()
}

// Routes writes the steering routes (pkg/steer).
type Routes interface {
	Apply(ctx context.Context, r model.Routes) (map[string]error, error)
}

// Elections is the election (pkg/election): a view to plan with, and the
// writes the plan asks for.
type Elections interface {
	View() model.ElectionView
	Acquire(c model.Claim)
	Release(lease types.NamespacedName)
	Delete(lease types.NamespacedName)
	// Drain marks this node as leaving; ReleaseNow releases and waits.
	Drain(ctx context.Context)
	ReleaseNow(ctx context.Context, leases []types.NamespacedName)
	// PeerAddresses are other nodes' serviceInterface addresses, from
	// their heartbeats.
	PeerAddresses() map[netip.Addr]bool
	// Fresh says this node's heartbeat renewal is younger than the renew
	// deadline: address lifetimes may be renewed outside the sync loop.
	Fresh() bool
	// Epoch counts the heartbeat's stretches without a gap of a lease
	// duration: a plan made in an earlier epoch binds nothing new.
	Epoch() uint64
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
	// Node is one Node (slimmed), for its UID, addresses and pod ranges.
	Node(name string) (*corev1.Node, bool)
}

// Options configure a Controller.
type Options struct {
	Node string
	// Namespace limits the Services served ("" for all).
	Namespace string
	// DaemonNamespace holds heartbeats, address Leases, the global Lease.
	DaemonNamespace string
	// Owns says whether a Service with that spec.loadBalancerClass is ours.
	Owns func(class *string) bool
	// Global is the single Lease used when svc_election=false (nil: per
	// address election).
	Global *types.NamespacedName
	// Singletons are further Leases that elect one node for a task (the
	// address allocator); Elected is told after every sync which of them
	// this node holds (nil: nobody asks).
	Singletons []types.NamespacedName
	Elected    func(map[types.NamespacedName]bool)
	// SNATUnavailable, when set, is why egress cannot be programmed on
	// this node (the firewall backend is missing); SNAT is then nil.
	SNATUnavailable string
	// EgressBlocked, when set, says why egress cannot work on this node
	// now (a neighbour's datapath bypasses the firewall: pkg/compat), or
	// "": while it says so, egress is not programmed here and egress
	// Services get a Warning.
	EgressBlocked func() string
	// Resync is the longest time between two full syncs.
	Resync time.Duration
	// RetryPeriod separates candidates' turns; RenewDeadline bounds the
	// Lease releases at shutdown.
	RetryPeriod   time.Duration
	RenewDeadline time.Duration
	// Grace is how long the SNAT rules of pods steered here stay after
	// an address was given up (the fence drops their traffic).
	Grace time.Duration
	// Allowed, when not empty, are the only ranges LoadBalancer IPs may
	// come from (egressvip_allowed_cidrs).
	Allowed []netip.Prefix
	// ExcludeNodes adds every Node's addresses and the API server's
	// endpoints to the destinations never SNATed (default true; false is
	// kube-vip's behaviour).
	ExcludeNodes bool
	// Tunnel, when set, is the VXLAN configuration (peers filled in
	// from the heartbeats).
	Tunnel *model.Tunnel
	// ProbeWait is how long to wait for answers to address probes.
	ProbeWait time.Duration
	// Metrics, when set, receives sync figures.
	Metrics *metrics.Metrics
	// Clock is the time source (tests pass a fake).
	Clock clock.WithTicker
}

// Controller is the node's sync loop.
type Controller struct {
	opts      Options
	log       *logrus.Entry
	addrs     Addresses
	snat      SNAT
	routes    Routes
	elections Elections
	cluster   Cluster
	recorder  record.EventRecorder
	reporter  *reporter
	verifier  *verifier

	services   corelisters.ServiceLister
	sliceIndex cache.Indexer
	pods       cache.Indexer
	informers  []cache.SharedIndexInformer
	startOnce  sync.Once
	hasSynced  []cache.InformerSynced
	queue      workqueue.TypedRateLimitingInterface[string]

	// conflicts are frames from other hosts claiming held addresses,
	// collected between syncs by the listener.
	conflictsMu sync.Mutex
	conflicts   []plan.Conflict

	// host is the serviceInterface as the last sync saw it (heartbeat).
	host atomic.Pointer[netif.Host]

	// The fields below belong to the sync loop's goroutine (and to
	// shutdown, which runs after it has stopped).

	// mem is what the last plan left for the next one.
	mem plan.Memory
	// interfaceErr is why the last address sync could not use the
	// serviceInterface.
	interfaceErr string
	settle       time.Duration
	// lastFull is when the kernel state was last read back in full.
	lastFull time.Time
	// ready is set after the first successful sync; looped is when the
	// loop last finished an item.
	ready  atomic.Bool
	looped atomic.Int64
}

const (
	syncKey  = "sync"
	checkKey = "check"
)

// checkInterval is how often the firewall state egressvip owns is compared
// with what it wrote, and the lifetime of the held addresses refreshed:
// CNIs, kube-proxy and admins change the same tables, and what egressvip
// owns must come back within a second; and an address must outlive a
// living sync loop.
const checkInterval = 500 * time.Millisecond

// Checker is the SNAT writer's cheap comparison of the kernel with what it
// last wrote (pkg/snat).
type Checker interface {
	Check(ctx context.Context) (bool, error)
}

// transientSettle is how long a problem that may clear by itself must last
// before it becomes an Event.
const transientSettle = 5 * time.Second

// New builds a Controller and its informers; Run starts them.
func New(opts Options, client, reportClient kube.Interface, addrs Addresses, snatw SNAT, routes Routes,
	elections Elections, cluster Cluster, recorder record.EventRecorder, log *logrus.Entry,
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
	if opts.Grace <= 0 {
		opts.Grace = 5 * time.Second
	}
	if opts.ProbeWait <= 0 {
		opts.ProbeWait = 50 * time.Millisecond
	}
	if opts.Clock == nil {
		opts.Clock = clock.RealClock{}
	}
	c := &Controller{
		opts: opts, log: log, addrs: addrs, snat: snatw, routes: routes, elections: elections,
		cluster: cluster, recorder: recorder,
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedItemExponentialFailureRateLimiter[string](200*time.Millisecond, 30*time.Second),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "egressvip", Clock: opts.Clock}),
		mem:    plan.Start(nil),
		settle: transientSettle,
	}
	c.looped.Store(opts.Clock.Now().UnixNano())
	c.verifier = newVerifier(client, c.Poke, log)
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
			if podChanged(o, n) {
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
		Spec: corev1.ServiceSpec{Type: s.Spec.Type, LoadBalancerClass: s.Spec.LoadBalancerClass, Selector: s.Spec.Selector,
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
// the kernel (the CIDR detector's, the election's).
func (c *Controller) AddSynced(s cache.InformerSynced) { c.hasSynced = append(c.hasSynced, s) }

// Conflict records a frame from another host that claimed or probed an
// address this node holds (pkg/netif's listener calls it).
func (c *Controller) Conflict(cf plan.Conflict) {
	c.conflictsMu.Lock()
	c.conflicts = append(c.conflicts, cf)
	c.conflictsMu.Unlock()
	if m := c.opts.Metrics; m != nil {
		m.Conflicts.Inc()
	}
	c.Poke()
}

func (c *Controller) takeConflicts() []plan.Conflict {
	c.conflictsMu.Lock()
	defer c.conflictsMu.Unlock()
	out := c.conflicts
	c.conflicts = nil
	return out
}

// sliceMatters filters EndpointSlice events to slices of Services we serve
// and of the kubernetes Service (the API server's endpoints are never
// SNATed).
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
	if sl.Namespace == metav1.NamespaceDefault && name == "kubernetes" {
		return c.opts.ExcludeNodes
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
		c.opts.Owns(svc.Spec.LoadBalancerClass) && !ignored(svc)
}

// Ready reports why the daemon is not ready (nil when it is): the caches
// have not synced or no sync succeeded yet.
func (c *Controller) Ready() error {
	if !c.ready.Load() {
		return errors.New("not ready: waiting for caches and the first sync")
	}
	return nil
}

// Alive reports why the daemon should be restarted (nil when it is alive):
// its sync loop has not finished anything for three resync periods.
func (c *Controller) Alive() error {
	last := time.Unix(0, c.looped.Load())
	if stale := c.opts.Clock.Since(last); stale > 3*c.opts.Resync {
		return fmt.Errorf("the sync loop has not finished anything for %s", stale.Round(time.Second))
	}
	return nil
}

// Run waits for the caches, syncs until ctx ends, then shuts down: what
// another node could serve is released at once with its addresses and
// rules removed; pinned egress keeps Lease, address and rules for the
// next process.
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

	go c.verifier.run(ctx, 4)
	go c.renewLifetimes(ctx)
	c.Poke()
	c.queue.AddAfter(checkKey, checkInterval)
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
	defer func() { c.looped.Store(c.opts.Clock.Now().UnixNano()) }()
	if key == checkKey {
		c.check(ctx)
		return true
	}
	if c.snat != nil && c.opts.Clock.Since(c.lastFull) >= c.opts.Resync {
		// The periodic full sync also repairs chains others flushed.
		c.snat.Recheck()
		c.lastFull = c.opts.Clock.Now()
	}
	start := c.opts.Clock.Now()
	err := c.Sync(ctx)
	if m := c.opts.Metrics; m != nil {
		m.SyncDuration.Observe(c.opts.Clock.Since(start).Seconds())
		if err != nil && ctx.Err() == nil {
			m.SyncErrors.Inc()
		}
	}
	if err != nil && ctx.Err() != nil {
		// Stopping (SIGTERM): shutdown applies the drain plan next.
		c.log.WithError(err).Debug("sync cut short by the shutdown")
		return true
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

// renewLifetimes renews the lifetime of the held addresses every
// checkInterval while this node's heartbeat is fresh, on a goroutine of
// its own: a sync that takes long (thousands of Services changing at once)
// must not let them expire. A dead or frozen process renews nothing; a
// node cut off from the API stops within the renew deadline, before any
// other node may take its addresses over. What the planner keeps through
// an outage (no other node could take it) the sync loop's check renews.
//
// When renewals get expensive (see lifetime.go) it lengthens the lifetime,
// the heartbeat first.
func (c *Controller) renewLifetimes(ctx context.Context) {
	t := time.NewTicker(checkInterval)
	defer t.Stop()
	lt, _ := c.addrs.(Lifetimes)
	hb, _ := c.elections.(HeartbeatDurations)
	var state *lifetimeState
	if lt != nil && hb != nil && lt.Lifetime() > 0 {
		state = &lifetimeState{base: lt.Lifetime(), margin: max(c.opts.Grace-lt.Lifetime(), 0)}
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if state != nil {
			per, at, held := lt.RenewCost()
			cur := lt.Lifetime()
			step := state.adapt(c.opts.Clock.Now(), per, at, held, cur, hb.HeartbeatDuration())
			if step.heartbeat > 0 {
				hb.SetHeartbeatDuration(step.heartbeat)
			}
			if step.lifetime > 0 && step.lifetime != cur {
				if err := lt.SetLifetime(step.lifetime); err == nil {
					c.log.WithFields(map[string]any{"addresses": held, "renewal": per.String(), "lifetime": step.lifetime.String(),
						"heartbeat": (step.lifetime + state.margin).String()}).Info("address lifetime changed with the cost of renewing it")
				}
			}
		}
		if !c.elections.Fresh() {
			continue
		}
		// A round that takes long stops when the heartbeat is no
		// longer fresh.
		if err := c.addrs.Refresh(ctx, c.elections.Fresh); err != nil && !errors.Is(err, netif.ErrInterfaceNotFound) && ctx.Err() == nil {
			c.log.WithError(err).Debug("cannot renew the lifetime of the held addresses")
		}
	}
}

// check runs on the sync loop's goroutine, so it never interleaves with
// an apply: while the heartbeat is overdue it renews the lifetime of the
// held addresses (so that what the planner keeps then expires if this loop
// stops; otherwise renewLifetimes does it, without holding up the loop for
// a round of renewals), and a difference in the firewall makes the next
// sync rewrite everything.
func (c *Controller) check(ctx context.Context) {
	defer c.queue.AddAfter(checkKey, checkInterval)
	if !c.elections.Fresh() {
		if err := c.addrs.Refresh(ctx, nil); err != nil && !errors.Is(err, netif.ErrInterfaceNotFound) {
			c.log.WithError(err).Warn("cannot renew the lifetime of the held addresses")
		}
	}
	ch, ok := c.snat.(Checker)
	if !ok || !c.ready.Load() {
		return
	}
	intact, err := ch.Check(ctx)
	if errors.Is(err, model.ErrUnverified) {
		// Not a change by someone else, nor a repair: the next write
		// replaces what it cannot verify, which takes the reference the
		// next check compares with. Nothing needs reading back.
		c.log.WithError(err).Debug("rewriting the egress rules to verify them")
		c.Poke()
		return
	}
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

// NodeInfo is what this node publishes in its heartbeat.
func (c *Controller) NodeInfo() election.NodeInfo {
	info := election.NodeInfo{Standing: true}
	if h := c.host.Load(); h != nil {
		info.Standing = h.Up
		info.Addresses = h.Own
	}
	if n, ok := c.cluster.Node(c.opts.Node); ok {
		info.UID = n.UID
		for _, a := range n.Status.Addresses {
			if a.Type != corev1.NodeInternalIP {
				continue
			}
			if ip, err := netip.ParseAddr(a.Address); err == nil {
				info.Via = append(info.Via, ip.Unmap())
			}
		}
	}
	info.Via = append(info.Via, info.Addresses...)
	if t := c.tunnel(); t != nil && t.Local.IsValid() {
		info.VTEPUnderlay = t.Local
		if v, ok := c.routes.(interface{ TunnelMAC() net.HardwareAddr }); ok {
			info.VTEPMAC = v.TunnelMAC().String()
		}
	}
	return info
}

// tunnel is the VXLAN configuration with this node's underlay address (its
// first InternalIP, IPv4 first) filled in; nil without VXLAN mode.
func (c *Controller) tunnel() *model.Tunnel {
	if c.opts.Tunnel == nil {
		return nil
	}
	t := *c.opts.Tunnel
	if t.Local.IsValid() {
		return &t
	}
	if n, ok := c.cluster.Node(c.opts.Node); ok {
		var v6 netip.Addr
		for _, a := range n.Status.Addresses {
			ip, err := netip.ParseAddr(a.Address)
			if a.Type != corev1.NodeInternalIP || err != nil {
				continue
			}
			if ip.Unmap().Is4() {
				t.Local = ip.Unmap()
				break
			}
			if !v6.IsValid() {
				v6 = ip
			}
		}
		if !t.Local.IsValid() {
			t.Local = v6
		}
	}
	return &t
}
