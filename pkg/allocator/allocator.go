package allocator

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/utils/clock"

	"github.com/egressvip/egressvip/pkg/kube"
)

// What the allocator writes on a Service, as kube-vip-cloud-provider does.
const (
	AnnotationLoadBalancerIPs  = "kube-vip.io/loadbalancerIPs"
	AnnotationServiceInterface = "kube-vip.io/serviceInterface"
	// LabelImplementation=kube-vip is how kube-vip-cloud-provider finds
	// the Services whose addresses are in use: written so that it sees
	// ours after a move back.
	LabelImplementation = "implementation"
	ImplementationValue = "kube-vip"
)

// Event reasons.
const (
	ReasonAllocated     = "AddressAllocated"
	ReasonFailed        = "AllocationFailed"
	ReasonInvalidConfig = "InvalidAddressPool"
)

// Defaults of Config's timing.
const (
	DefaultWriteTimeout = 10 * time.Second
	DefaultClaimGrace   = 2 * time.Minute
	DefaultGCInterval   = 30 * time.Second
	DefaultWorkers      = 32
)

// Client is what the allocator asks of the API server: kube.Interface for
// Services (list, watch, merge patch), Leases (claims; list, watch, create,
// update, delete) and informers, and the ConfigMaps of one namespace.
type Client interface {
	kube.Interface
	ConfigMaps(namespace string) kube.ListWatcher[*corev1.ConfigMapList]
}

// leaseDeleter is the Delete of client-go's typed Lease client, which
// kube.LeaseClient does not list (yet).
type leaseDeleter interface {
	Delete(ctx context.Context, name string, opts metav1.DeleteOptions) error
}

// Config configures an Allocator.
type Config struct {
	Client Client
	// ConfigMapNamespace and ConfigMapName locate kube-vip-cloud-provider's
	// ConfigMap; "kube-system" and "kubevip" when empty.
	ConfigMapNamespace, ConfigMapName string
	// ClaimNamespace is where claim Leases live: the daemon's namespace,
	// which namespace admins cannot write.
	ClaimNamespace string
	// Ours tells whether a Service is served by us (type LoadBalancer, our
	// class); only those get addresses. It sees a cut-down copy: metadata,
	// type, class, ports, ipFamilies, ipFamilyPolicy, loadBalancerIP and
	// status. nil means every Service of type LoadBalancer.
	Ours func(*corev1.Service) bool
	// Refuse says why an address must not be handed out ("" if it may).
	Refuse func(netip.Addr) string
	// Recorder records Events on Services and on the ConfigMap.
	Recorder record.EventRecorder
	Log      *logrus.Entry
	Clock    clock.Clock
	// WriteTimeout bounds one Service's claim and patch together;
	// ClaimGrace must exceed it and the API server's request timeout (a
	// write may land until then): a claim is freed only after it has not
	// changed for that long. GCInterval is how often orphaned claims are
	// looked for. Workers bounds concurrent Services being written.
	WriteTimeout, ClaimGrace, GCInterval time.Duration
	Workers                              int
}

// Allocator hands out addresses from kube-vip-cloud-provider's pools to
// Services of ours that have none. See the package documentation.
type Allocator struct {
	cfg         Config
	log         *logrus.Entry
	poolGauge   *prometheus.GaugeVec
	allocations *prometheus.CounterVec
}

// New returns an Allocator; Run starts it.
func New(cfg Config) *Allocator {
	if cfg.ConfigMapNamespace == "" {
		cfg.ConfigMapNamespace = "kube-system"
	}
	if cfg.ConfigMapName == "" {
		cfg.ConfigMapName = "kubevip"
	}
	if cfg.Ours == nil {
		cfg.Ours = func(s *corev1.Service) bool { return s.Spec.Type == corev1.ServiceTypeLoadBalancer }
	}
	if cfg.Recorder == nil {
		cfg.Recorder = nopRecorder{}
	}
	if cfg.Log == nil {
		cfg.Log = logrus.NewEntry(logrus.StandardLogger())
	}
	if cfg.Clock == nil {
		cfg.Clock = clock.RealClock{}
	}
	if cfg.WriteTimeout <= 0 {
		cfg.WriteTimeout = DefaultWriteTimeout
	}
	if cfg.ClaimGrace <= 0 {
		cfg.ClaimGrace = DefaultClaimGrace
	}
	if cfg.GCInterval <= 0 {
		cfg.GCInterval = DefaultGCInterval
	}
	if cfg.Workers <= 0 {
		cfg.Workers = DefaultWorkers
	}
	return &Allocator{
		cfg: cfg,
		log: cfg.Log.WithField("component", "allocator"),
		poolGauge: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "egressvip_pool_addresses",
			Help: "Addresses of each address pool (ConfigMap key) by family and state (used: carried by a Service or claimed; free: the rest, refused ones included). Only the elected allocator reports."},
			[]string{"pool", "family", "state"}),
		allocations: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "egressvip_allocations_total",
			Help: "Address allocations by result: allocated, shared, conflict (lost a race; planned again), error (API error; retried), and once per Service and reason exhausted (no free address) and no_pool (none or an invalid one)."},
			[]string{"result"}),
	}
}

// Collectors are the allocator's metrics, to register.
func (a *Allocator) Collectors() []prometheus.Collector {
	return []prometheus.Collector{a.poolGauge, a.allocations}
}

// Run allocates until ctx ends. Call it only on the node elected to
// allocate, and cancel ctx when that node loses the election; Run may be
// called again afterwards. A moment of two allocators is safe (see the
// package documentation).
func (a *Allocator) Run(ctx context.Context) error {
	r := newRun(a)
	defer r.stop()
	return r.loop(ctx)
}

// run is one term of the allocator: its caches and memory.
type run struct {
	a   *Allocator
	cfg Config
	log *logrus.Entry

	services, claims, configMaps cache.SharedIndexInformer
	poke                         chan struct{}

	// wrote is our Service writes the cache does not show yet, by UID.
	wrote map[types.UID]wrote
	// overlay is our claim writes (and claims found to exist) the cache
	// does not show yet.
	overlay map[netip.Addr]overlayClaim
	// failing is, per Service, the failure last reported (Event once).
	failing map[types.UID]string
	// badKeys are the ConfigMap errors reported, by key and value.
	badKeys map[string]bool
	// orphans is, per claim, since when it has been seen orphaned at
	// one resourceVersion.
	orphans map[string]orphan
	// poolLabels are the pool gauge's label sets last written.
	poolLabels map[[3]string]bool
	backoff    time.Duration
}

type wrote struct {
	preRV string
	svc   *corev1.Service
	at    time.Time
}

type overlayClaim struct {
	c  *claim // nil: exists, not read yet
	at time.Time
}

type orphan struct {
	rv string
	at time.Time
}

// overlayTTL bounds how long a write of ours not yet seen in the cache is
// assumed; after it the cache is trusted again.
const overlayTTL = 30 * time.Second

func newRun(a *Allocator) *run {
	cfg := a.cfg
	r := &run{a: a, cfg: cfg, log: a.log, poke: make(chan struct{}, 1),
		wrote: map[types.UID]wrote{}, overlay: map[netip.Addr]overlayClaim{}, failing: map[types.UID]string{},
		badKeys: map[string]bool{}, orphans: map[string]orphan{}, poolLabels: map[[3]string]bool{}}
	r.services = kube.NewInformer(cfg.Client, cfg.Client.Services(""), &corev1.Service{}, kube.InformerOptions{Transform: slimService})
	r.claims = kube.NewInformer(cfg.Client, cfg.Client.Leases(cfg.ClaimNamespace), &coordinationv1.Lease{}, kube.InformerOptions{
		Tweak: func(o *metav1.ListOptions) { o.LabelSelector = LabelRole + "=" + RoleAllocation },
		Transform: func(obj any) (any, error) {
			if l, ok := obj.(*coordinationv1.Lease); ok && len(l.ManagedFields) > 0 {
				c := *l
				c.ManagedFields = nil
				return &c, nil
			}
			return obj, nil
		},
	})
	r.configMaps = kube.NewInformer(cfg.Client, cfg.Client.ConfigMaps(cfg.ConfigMapNamespace), &corev1.ConfigMap{}, kube.InformerOptions{
		Tweak: func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", cfg.ConfigMapName).String()
		},
	})
	handler := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { r.wake() },
		UpdateFunc: func(any, any) { r.wake() },
		DeleteFunc: func(any) { r.wake() },
	}
	for _, inf := range []cache.SharedIndexInformer{r.services, r.claims, r.configMaps} {
		_, _ = inf.AddEventHandler(handler)
	}
	return r
}

func (r *run) wake() {
	select {
	case r.poke <- struct{}{}:
	default:
	}
}

// stop withdraws what only the elected allocator reports.
func (r *run) stop() {
	for l := range r.poolLabels {
		r.a.poolGauge.DeleteLabelValues(l[0], l[1], l[2])
	}
}

func (r *run) loop(ctx context.Context) error {
	for _, inf := range []cache.SharedIndexInformer{r.services, r.claims, r.configMaps} {
		go inf.RunWithContext(ctx)
	}
	if !cache.WaitForCacheSync(ctx.Done(), r.services.HasSynced, r.claims.HasSynced, r.configMaps.HasSynced) {
		return ctx.Err()
	}
	r.log.Info("allocating addresses from kube-vip-cloud-provider's pools")
	gc := r.cfg.Clock.NewTimer(r.cfg.GCInterval)
	defer gc.Stop()
	var retry clock.Timer
	var retryC <-chan time.Time
	defer func() {
		if retry != nil {
			retry.Stop()
		}
	}()
	r.wake()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-r.poke:
		case <-retryC:
			retryC = nil
		case <-gc.C():
			r.collect(ctx)
			gc.Reset(r.cfg.GCInterval)
			continue
		}
		again, retryIn := r.pass(ctx)
		if again {
			r.wake()
		}
		if retryIn > 0 && retryC == nil {
			retry = r.cfg.Clock.NewTimer(retryIn)
			retryC = retry.C()
		}
	}
}

// job is one Service's planned allocation.
type job struct {
	svc    *corev1.Service
	pool   Pool
	choice Choice
}

type outcome int

const (
	done outcome = iota
	conflict
	failure
)

type result struct {
	job
	outcome outcome
	err     error
	// after is the Service as written; claims the claims written.
	after  *corev1.Service
	claims []*claim
	// taken are addresses whose claim turned out to exist; stale those
	// whose claim changed since it was read.
	taken, stale []netip.Addr
}

// pass plans every Service waiting for an address and writes the plans
// concurrently. again: plan again at once (a claim turned out taken, or a
// share waits for this pass's claim); retryIn: plan again then even if no
// event comes (a race lost to a stale cache: its event is on the way; an
// API error: back off).
func (r *run) pass(ctx context.Context) (again bool, retryIn time.Duration) {
	now := r.cfg.Clock.Now()
	settings := r.settings()
	services := r.view(now)
	claims := r.claimView(now)
	usage := NewUsage(services, claims)
	for a, o := range r.overlay {
		if o.c == nil {
			usage.get(a).taken = true
		}
	}
	pl := NewPlanner(usage, r.cfg.Refuse)

	var pending []*corev1.Service
	alive := map[types.UID]bool{}
	for _, svc := range services {
		if r.cfg.Ours(svc) && Pending(svc) {
			pending = append(pending, svc)
			alive[svc.UID] = true
		}
	}
	for uid := range r.failing {
		if !alive[uid] {
			delete(r.failing, uid)
		}
	}
	sortPending(pending)
	var jobs []job
	for _, svc := range pending {
		pool, err := settings.PoolFor(svc.Namespace)
		if err != nil {
			r.fail(svc, "no_pool", err.Error())
			continue
		}
		c, why := pl.Choose(svc, pool)
		if why != "" {
			r.fail(svc, "exhausted", why)
			continue
		}
		if len(c.Addrs) == 0 {
			again = true
			continue
		}
		jobs = append(jobs, job{svc: svc, pool: pool, choice: c})
	}
	r.report(settings, usage)
	if len(jobs) == 0 {
		r.backoff = 0
		return again, 0
	}

	results := make([]result, 0, len(jobs))
	var mu sync.Mutex
	sem := make(chan struct{}, r.cfg.Workers)
	var wg sync.WaitGroup
	for _, j := range jobs {
		sem <- struct{}{}
		if ctx.Err() != nil {
			// The election is lost: start nothing new.
			break
		}
		wg.Go(func() {
			defer func() { <-sem }()
			res := r.write(ctx, j)
			mu.Lock()
			results = append(results, res)
			mu.Unlock()
		})
	}
	wg.Wait()

	now = r.cfg.Clock.Now()
	failed := false
	for _, res := range results {
		for _, c := range res.claims {
			r.overlay[c.addr] = overlayClaim{c: c, at: now}
		}
		for _, a := range res.taken {
			r.overlay[a] = overlayClaim{at: now}
		}
		for _, a := range res.stale {
			delete(r.overlay, a)
		}
		svc := res.svc
		log := r.log.WithFields(logrus.Fields{"service": svc.Namespace + "/" + svc.Name, "pool": res.pool.Key})
		switch res.outcome {
		case done:
			r.wrote[svc.UID] = wrote{preRV: svc.ResourceVersion, svc: res.after, at: now}
			delete(r.failing, svc.UID)
			kind := "allocated"
			if slices.Contains(res.choice.Shared, true) {
				kind = "shared"
			}
			r.a.allocations.WithLabelValues(kind).Inc()
			ips := joinAddrs(res.choice.Addrs)
			log.WithField("ip", ips).Info("address allocated")
			r.cfg.Recorder.Eventf(svc, corev1.EventTypeNormal, ReasonAllocated, "Allocated %s from pool %s", ips, res.pool.Key)
		case conflict:
			r.a.allocations.WithLabelValues("conflict").Inc()
			log.WithError(res.err).Debug("lost an allocation race; planning again")
			if len(res.taken) > 0 {
				// The overlay now marks the address: plan again at once.
				again = true
			} else if retryIn == 0 {
				retryIn = time.Second
			}
		case failure:
			r.a.allocations.WithLabelValues("error").Inc()
			log.WithError(res.err).Warn("allocation failed; retrying")
			failed = true
		}
	}
	if failed {
		r.backoff = min(max(2*r.backoff, time.Second), 30*time.Second)
		retryIn = r.backoff
	} else {
		r.backoff = 0
	}
	return again, retryIn
}

// fail reports that a Service gets no address: a log line and a Warning
// Event when the reason is new, debug after that.
func (r *run) fail(svc *corev1.Service, result, why string) {
	log := r.log.WithField("service", svc.Namespace+"/"+svc.Name)
	if r.failing[svc.UID] == why {
		log.WithField("reason", why).Debug("still no address")
		return
	}
	r.failing[svc.UID] = why
	r.a.allocations.WithLabelValues(result).Inc()
	log.WithField("reason", why).Warn("no address allocated")
	r.cfg.Recorder.Event(svc, corev1.EventTypeWarning, ReasonFailed, "No address allocated: "+why)
}

// write claims the chosen addresses, then writes them on the Service with
// its resourceVersion as precondition. A claim is undone only when the
// Service write certainly did not land.
func (r *run) write(ctx context.Context, j job) (res result) {
	res.job = j
	// A write once started is finished, also when the election is lost
	// meanwhile: cut off, it would leave claims whose Service write may or
	// may not have landed, which only the collector can free, after
	// ClaimGrace. Finishing costs at most WriteTimeout of a second
	// allocator, which claims make safe.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.cfg.WriteTimeout)
	defer cancel()
	leases := r.cfg.Client.Leases(r.cfg.ClaimNamespace)
	var created []*claim
	undo := func() {
		for _, c := range created {
			if err := r.deleteClaim(ctx, c); err != nil {
				// The collector frees it after ClaimGrace.
				r.log.WithError(err).WithField("ip", c.addr).Debug("claim not released")
			}
		}
		res.claims = nil
	}
	for i, a := range j.choice.Addrs {
		now := r.cfg.Clock.Now()
		var l *coordinationv1.Lease
		var err error
		if c := j.choice.Join[i]; c != nil {
			l, err = leases.Update(ctx, touched(c, j.choice.Members[i], now), metav1.UpdateOptions{})
		} else {
			l, err = leases.Create(ctx, newClaim(r.cfg.ClaimNamespace, a, j.svc.Namespace, j.choice.Members[i], now), metav1.CreateOptions{})
		}
		if err != nil {
			undo()
			res.err = fmt.Errorf("claim %s: %w", a, err)
			switch {
			case apierrors.IsAlreadyExists(err):
				res.taken = append(res.taken, a)
				res.outcome = conflict
			case apierrors.IsConflict(err), apierrors.IsNotFound(err):
				// Our copy of the claim is stale.
				res.stale = append(res.stale, a)
				res.outcome = conflict
			default:
				res.outcome = failure
			}
			return res
		}
		c, ok := claimOf(l)
		if !ok {
			// Left to the collector: it was written, somehow.
			undo()
			res.err, res.outcome = fmt.Errorf("claim %s: the API server answered with no claim", a), failure
			return res
		}
		res.claims = append(res.claims, c)
		if j.choice.Join[i] == nil {
			created = append(created, c)
		}
	}
	after, err := r.patch(ctx, j)
	if err == nil {
		res.after = after
		return res
	}
	res.err = fmt.Errorf("write %s on Service %s/%s: %w", joinAddrs(j.choice.Addrs), j.svc.Namespace, j.svc.Name, err)
	if apierrors.IsConflict(err) || apierrors.IsNotFound(err) {
		// It did not land: the claims we created serve nobody.
		undo()
		res.outcome = conflict
		return res
	}
	// It may have landed: the claims stay, the collector decides.
	res.outcome = failure
	return res
}

// patch writes the addresses with a JSON merge patch that carries the
// cached resourceVersion: the API server refuses it if the Service changed
// since, so of two allocators racing on one Service only one writes.
func (r *run) patch(ctx context.Context, j job) (*corev1.Service, error) {
	annotations := map[string]string{AnnotationLoadBalancerIPs: joinAddrs(j.choice.Addrs)}
	if j.pool.Interface != "" {
		annotations[AnnotationServiceInterface] = j.pool.Interface
	}
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{
		"resourceVersion": j.svc.ResourceVersion,
		"labels":          map[string]string{LabelImplementation: ImplementationValue},
		"annotations":     annotations,
	}})
	if err != nil {
		return nil, err
	}
	out, err := r.cfg.Client.Services(j.svc.Namespace).Patch(ctx, j.svc.Name, types.MergePatchType, patch, metav1.PatchOptions{})
	if err != nil {
		return nil, err
	}
	after := j.svc.DeepCopy()
	if after.Annotations == nil {
		after.Annotations = map[string]string{}
	}
	for k, v := range annotations {
		after.Annotations[k] = v
	}
	if out != nil {
		after.ResourceVersion = out.ResourceVersion
	}
	return after, nil
}

// deleteClaim deletes a claim unless anyone wrote it since c was read:
// the preconditions make the API server refuse it then.
func (r *run) deleteClaim(ctx context.Context, c *claim) error {
	d, ok := r.cfg.Client.Leases(r.cfg.ClaimNamespace).(leaseDeleter)
	if !ok {
		return fmt.Errorf("the Lease client cannot delete")
	}
	uid, rv := c.uid, c.resourceVersion
	err := d.Delete(ctx, c.name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &uid, ResourceVersion: &rv}})
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}

// settings parses the ConfigMap and reports its bad values once each.
func (r *run) settings() Settings {
	var cm *corev1.ConfigMap
	obj, ok, _ := r.configMaps.GetStore().GetByKey(r.cfg.ConfigMapNamespace + "/" + r.cfg.ConfigMapName)
	if ok {
		cm, _ = obj.(*corev1.ConfigMap)
	}
	var data map[string]string
	if cm != nil {
		data = cm.Data
	}
	s, errs := ParseConfig(data)
	seen := map[string]bool{}
	for _, e := range errs {
		k := e.Key + "\x00" + e.Value
		seen[k] = true
		if r.badKeys[k] {
			continue
		}
		r.badKeys[k] = true
		r.log.WithFields(logrus.Fields{"key": e.Key, "value": e.Value}).WithError(e.Err).
			Errorf("ConfigMap %s/%s: invalid value; Services of this pool get no address", r.cfg.ConfigMapNamespace, r.cfg.ConfigMapName)
		if cm != nil {
			r.cfg.Recorder.Eventf(cm, corev1.EventTypeWarning, ReasonInvalidConfig, "Invalid value: %v", e)
		}
	}
	for k := range r.badKeys {
		if !seen[k] {
			delete(r.badKeys, k)
		}
	}
	return s
}

// view is every cached Service, with our writes the cache does not show
// yet.
func (r *run) view(now time.Time) []*corev1.Service {
	objs := r.services.GetStore().List()
	out := make([]*corev1.Service, 0, len(objs))
	present := make(map[types.UID]bool, len(objs))
	for _, o := range objs {
		svc, ok := o.(*corev1.Service)
		if !ok {
			continue
		}
		present[svc.UID] = true
		if w, ok := r.wrote[svc.UID]; ok {
			if svc.ResourceVersion == w.preRV && now.Sub(w.at) < overlayTTL {
				svc = w.svc
			} else {
				delete(r.wrote, svc.UID)
			}
		}
		out = append(out, svc)
	}
	for uid := range r.wrote {
		if !present[uid] {
			delete(r.wrote, uid)
		}
	}
	return out
}

// claimView is every cached claim, with our writes the cache does not
// show yet.
func (r *run) claimView(now time.Time) []*claim {
	objs := r.claims.GetStore().List()
	byAddr := make(map[netip.Addr]*claim, len(objs))
	for _, o := range objs {
		if c, ok := claimOf(o.(*coordinationv1.Lease)); ok && c.lease.Namespace == r.cfg.ClaimNamespace {
			byAddr[c.addr] = c
		}
	}
	for a, o := range r.overlay {
		cached := byAddr[a]
		switch {
		case now.Sub(o.at) >= overlayTTL,
			o.c == nil && cached != nil,
			o.c != nil && cached != nil && cached.resourceVersion == o.c.resourceVersion:
			delete(r.overlay, a)
		case o.c != nil:
			byAddr[a] = o.c
		}
	}
	out := make([]*claim, 0, len(byAddr))
	for _, c := range byAddr {
		out = append(out, c)
	}
	return out
}

// collect frees claims that serve nobody: a claim seen orphaned (no
// Service of its namespace carries its address) and unchanged for
// ClaimGrace is checked against a fresh list of its namespace's Services
// and deleted with its resourceVersion as precondition.
func (r *run) collect(ctx context.Context) {
	now := r.cfg.Clock.Now()
	services := r.view(now)
	claims := r.claimView(now)
	carriedBy := map[string]bool{}
	for _, svc := range services {
		for _, a := range carried(svc, nil) {
			carriedBy[svc.Namespace+"/"+a.String()] = true
		}
	}
	due := map[string][]*claim{}
	live := map[string]bool{}
	for _, c := range claims {
		live[c.name] = true
		if carriedBy[c.namespace+"/"+c.addr.String()] {
			delete(r.orphans, c.name)
			continue
		}
		o, ok := r.orphans[c.name]
		if !ok || o.rv != c.resourceVersion {
			r.orphans[c.name] = orphan{rv: c.resourceVersion, at: now}
			continue
		}
		if now.Sub(o.at) >= r.cfg.ClaimGrace {
			due[c.namespace] = append(due[c.namespace], c)
		}
	}
	for name := range r.orphans {
		if !live[name] {
			delete(r.orphans, name)
		}
	}
	for ns, cs := range due {
		lctx, cancel := context.WithTimeout(ctx, r.cfg.WriteTimeout)
		// An empty resourceVersion asks for a consistent read.
		list, err := r.cfg.Client.Services(ns).List(lctx, metav1.ListOptions{})
		cancel()
		if err != nil {
			r.log.WithError(err).WithField("namespace", ns).Warn("cannot check orphaned address claims")
			continue
		}
		fresh := map[netip.Addr]bool{}
		for i := range list.Items {
			for _, a := range carried(&list.Items[i], nil) {
				fresh[a] = true
			}
		}
		for _, c := range cs {
			if fresh[c.addr] {
				delete(r.orphans, c.name)
				continue
			}
			dctx, cancel := context.WithTimeout(ctx, r.cfg.WriteTimeout)
			err := r.deleteClaim(dctx, c)
			cancel()
			log := r.log.WithFields(logrus.Fields{"ip": c.addr, "namespace": c.namespace})
			if err != nil {
				log.WithError(err).Debug("orphaned address claim not released; checking again later")
				continue
			}
			delete(r.overlay, c.addr)
			delete(r.orphans, c.name)
			log.Info("address claim released: no Service of its namespace carries the address")
		}
	}
	r.wake()
}

// report sets the pool gauges.
func (r *run) report(s Settings, u *Usage) {
	next := map[[3]string]bool{}
	for _, p := range s.Pools() {
		var used [2]float64
		for a := range u.addrs {
			if p.contains(a) {
				used[familyOf(a)]++
			}
		}
		for _, f := range []Family{IPv4, IPv6} {
			rs := p.rangesOf(f)
			if len(rs) == 0 {
				continue
			}
			size := 0.0
			for _, rg := range rs {
				size += rangeSize(rg)
			}
			for state, v := range map[string]float64{"used": used[f], "free": max(size-used[f], 0)} {
				l := [3]string{p.Key, f.String(), state}
				next[l] = true
				r.a.poolGauge.WithLabelValues(l[:]...).Set(v)
			}
		}
	}
	for l := range r.poolLabels {
		if !next[l] {
			r.a.poolGauge.DeleteLabelValues(l[:]...)
		}
	}
	r.poolLabels = next
}

// rangeSize counts the addresses of r that can be handed out (IPv4: not
// x.x.x.0 or x.x.x.255).
func rangeSize(r Range) float64 {
	if r.From.Is4() {
		a, b := r.From.As4(), r.To.As4()
		x := uint64(a[0])<<24 | uint64(a[1])<<16 | uint64(a[2])<<8 | uint64(a[3])
		y := uint64(b[0])<<24 | uint64(b[1])<<16 | uint64(b[2])<<8 | uint64(b[3])
		// Addresses ending in .0 and in .255 within [x, y].
		zeros := y/256 - (x+255)/256 + 1
		ones := (y+1)/256 - (x+1+255)/256 + 1
		return float64(y-x+1) - float64(zeros) - float64(ones)
	}
	a, b := r.From.As16(), r.To.As16()
	var hiA, loA, hiB, loB uint64
	for i := range 8 {
		hiA, hiB = hiA<<8|uint64(a[i]), hiB<<8|uint64(b[i])
		loA, loB = loA<<8|uint64(a[8+i]), loB<<8|uint64(b[8+i])
	}
	lo := loB - loA
	hi := hiB - hiA
	if loB < loA {
		hi--
	}
	return float64(hi)*(1<<64) + float64(lo) + 1
}

func joinAddrs(as []netip.Addr) string {
	s := make([]string, len(as))
	for i, a := range as {
		s[i] = a.String()
	}
	return strings.Join(s, ",")
}

// slimService keeps what the allocator reads of a Service.
func slimService(obj any) (any, error) {
	s, ok := obj.(*corev1.Service)
	if !ok {
		return obj, nil
	}
	out := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: s.Namespace, Name: s.Name, UID: s.UID, ResourceVersion: s.ResourceVersion,
			CreationTimestamp: s.CreationTimestamp, DeletionTimestamp: s.DeletionTimestamp},
		Spec: corev1.ServiceSpec{Type: s.Spec.Type, LoadBalancerClass: s.Spec.LoadBalancerClass, LoadBalancerIP: s.Spec.LoadBalancerIP,
			IPFamilies: s.Spec.IPFamilies, IPFamilyPolicy: s.Spec.IPFamilyPolicy},
		Status: corev1.ServiceStatus{LoadBalancer: s.Status.LoadBalancer},
	}
	if v, ok := s.Annotations[AnnotationLoadBalancerIPs]; ok {
		out.Annotations = map[string]string{AnnotationLoadBalancerIPs: v}
	}
	if len(s.Spec.Ports) > 0 {
		out.Spec.Ports = make([]corev1.ServicePort, len(s.Spec.Ports))
		for i, p := range s.Spec.Ports {
			out.Spec.Ports[i] = corev1.ServicePort{Port: p.Port, Protocol: p.Protocol}
		}
	}
	return out, nil
}

type nopRecorder struct{}

func (nopRecorder) Event(runtime.Object, string, string, string)          {}
func (nopRecorder) Eventf(runtime.Object, string, string, string, ...any) {}
func (nopRecorder) AnnotatedEventf(runtime.Object, map[string]string, string, string, string, ...any) {
}
