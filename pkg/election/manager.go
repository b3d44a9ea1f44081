package election

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
	coordinationv1 "k8s.io/api/coordination/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"

	"github.com/egressvip/egressvip/pkg/kube"
)

// Config configures a Manager.
type Config struct {
	// Identity is this node's name, written as holder.
	Identity string
	// Namespace is the daemon's namespace: heartbeats and the global
	// Lease live there.
	Namespace string
	// ServiceNamespace limits the Service Leases watched ("" for all).
	ServiceNamespace string
	Timing           Timing
	// HeartbeatClient renews the heartbeat only, so that no other write
	// can delay it behind a rate limiter.
	HeartbeatClient kube.Interface
	// Client watches Leases and writes acquisitions and releases.
	Client kube.Interface
	// Workers bounds the acquisitions and releases in flight.
	Workers int
	// Poke asks the sync loop to plan again.
	Poke func()
	// HostAddresses, when set, are this node's own addresses on its
	// serviceInterface, published in the heartbeat.
	HostAddresses func() []netip.Addr
	// Wrote, when set, counts Lease writes by kind (heartbeat, acquire,
	// release) and result (ok, conflict, error).
	Wrote func(kind, result string)
	Log   *logrus.Entry
}

// Manager keeps the election view of one node and performs its writes.
type Manager struct {
	cfg       Config
	heartbeat string // this node's heartbeat Lease name
	peers     cache.SharedIndexInformer
	leases    cache.SharedIndexInformer
	// peerCache and leaseCache are the informers' stores with this
	// node's own writes (and reads after a conflict) laid over them
	// until the informers have caught up: client-go's mutation cache,
	// which keeps whichever copy has the newer resourceVersion.
	peerCache  cache.MutationCache
	leaseCache cache.MutationCache
	now        func() time.Time

	mu sync.Mutex
	// hb is the last heartbeat written (or found at start-up).
	hb *coordinationv1.Lease
	// renewedAt is the RenewTime of the last successful renewal: taken
	// before the request, so no other node can see the heartbeat expire
	// before renewedAt + LeaseDuration. At start-up it is the previous
	// process's last renewal.
	renewedAt time.Time
	prevRenew time.Time
	// epoch counts the stretches of time this node's heartbeat stayed
	// valid without a gap: 0 before the first renewal, then 1, and one
	// more after every renewal that came a lease duration or more after
	// the previous one. A holding is current only if written in the
	// current epoch (or adopted from the previous process in epoch 1).
	epoch    uint64
	adopted  bool
	draining bool
	// nodes is what the heartbeat informer showed of every other node.
	nodes     map[string]*peer
	confirmed map[types.NamespacedName]uint64
	pending   map[types.NamespacedName]bool
	backoff   map[types.NamespacedName]time.Time
	// checked is when a holder's heartbeat was last read from the API
	// server and found expired, before taking its Services over.
	checked map[string]time.Time
	// jobs are the queued writes; workers run them.
	jobs    []job
	workers int
	// signature is the last liveness summary; a change pokes the loop.
	signature string
}

// peer is another node's heartbeat as seen by this node. seenAt is this
// node's clock when the renewal was first seen, as in client-go: clocks of
// different nodes are never compared.
type peer struct {
	addrs    []netip.Addr
	renew    time.Time
	holder   string
	seenAt   time.Time
	duration time.Duration
	draining bool
}

func (p *peer) live(now time.Time) bool {
	return p.holder != "" && now.Before(p.seenAt.Add(p.duration))
}

// indexAll puts every Lease under one index key, so that the mutation
// caches can list everything.
const indexAll = "all"

// errHolderAlive stops a takeover whose holder's heartbeat turned out to be
// renewed after all.
var errHolderAlive = errors.New("holder's heartbeat was renewed")

// NewManager builds a Manager; call Run to start it.
func NewManager(cfg Config) *Manager {
	if cfg.Workers <= 0 {
		cfg.Workers = 16
	}
	if cfg.Poke == nil {
		cfg.Poke = func() {}
	}
	if cfg.Wrote == nil {
		cfg.Wrote = func(string, string) {}
	}
	m := &Manager{
		cfg:       cfg,
		heartbeat: HeartbeatName(cfg.Identity),
		now:       time.Now,
		nodes:     map[string]*peer{},
		confirmed: map[types.NamespacedName]uint64{},
		pending:   map[types.NamespacedName]bool{},
		backoff:   map[types.NamespacedName]time.Time{},
		checked:   map[string]time.Time{},
	}
	// The caches keep no managedFields. The Lease is copied rather than
	// changed in place, since the object may be shared with whoever
	// delivered it; a shallow copy, since nothing else of it changes.
	strip := func(obj any) (any, error) {
		if l, ok := obj.(*coordinationv1.Lease); ok && len(l.ManagedFields) > 0 {
			c := *l
			c.ManagedFields = nil
			return &c, nil
		}
		return obj, nil
	}
	all := cache.Indexers{indexAll: func(any) ([]string, error) { return []string{""}, nil }}
	m.peers = kube.NewInformer(cfg.Client, cfg.Client.Leases(cfg.Namespace), &coordinationv1.Lease{}, kube.InformerOptions{
		Indexers:  all,
		Transform: strip,
		Tweak: func(o *metav1.ListOptions) {
			o.LabelSelector = LabelRole + " in (" + RoleHeartbeat + "," + RoleGlobal + ")"
		},
	})
	m.leases = kube.NewInformer(cfg.Client, cfg.Client.Leases(cfg.ServiceNamespace), &coordinationv1.Lease{}, kube.InformerOptions{
		Indexers:  all,
		Transform: strip,
		Tweak:     func(o *metav1.ListOptions) { o.LabelSelector = LabelRole + "=" + RoleService },
	})
	mutations := func(inf cache.SharedIndexInformer) cache.MutationCache {
		return cache.NewIntegerResourceVersionMutationCacheWithOptions(klog.Background(), inf.GetStore(), cache.MutationCacheOptions{
			Indexer: inf.GetIndexer(), TTL: time.Minute, IncludeAdds: true, MaxCacheSize: 100000,
		})
	}
	m.peerCache, m.leaseCache = mutations(m.peers), mutations(m.leases)
	for _, c := range []struct {
		inf   cache.SharedIndexInformer
		cache cache.MutationCache
	}{{m.peers, m.peerCache}, {m.leases, m.leaseCache}} {
		_, _ = c.inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc:    func(obj any) { m.observe(c.cache, obj, false) },
			UpdateFunc: func(_, obj any) { m.observe(c.cache, obj, false) },
			DeleteFunc: func(obj any) { m.observe(c.cache, obj, true) },
		})
	}
	return m
}

// Identity is the holder identity this node writes into Leases.
func (m *Manager) Identity() string { return m.cfg.Identity }

// HasSynced reports whether both Lease informers have synced.
func (m *Manager) HasSynced() bool { return m.peers.HasSynced() && m.leases.HasSynced() }

// Run starts the informers, the heartbeat and the liveness check; it
// returns at once. Everything stops when ctx ends.
func (m *Manager) Run(ctx context.Context) {
	go m.peers.RunWithContext(ctx)
	go m.leases.RunWithContext(ctx)
	go m.heartbeatLoop(ctx)
	go m.watchLiveness(ctx)
}

// observe takes an informer event: a heartbeat updates the peer it
// belongs to; an ownership Lease drops the own write it has caught up
// with and pokes the sync loop.
func (m *Manager) observe(mc cache.MutationCache, obj any, deleted bool) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = d.Obj
	}
	l, ok := obj.(*coordinationv1.Lease)
	if !ok {
		return
	}
	if l.Labels[LabelRole] == RoleHeartbeat {
		node, ok := strings.CutPrefix(l.Name, HeartbeatPrefix)
		if !ok || node == m.cfg.Identity {
			return
		}
		m.mu.Lock()
		if deleted {
			delete(m.nodes, node)
		} else {
			m.observePeer(node, l)
		}
		m.mu.Unlock()
		// Liveness changes are noticed by watchLiveness; a renewal is
		// no news.
		return
	}
	if deleted {
		mc.OnDelete(l)
	} else {
		mc.OnAddOrUpdate(l)
	}
	m.cfg.Poke()
}

// observePeer records a heartbeat; m.mu is held.
func (m *Manager) observePeer(node string, l *coordinationv1.Lease) {
	p := m.nodes[node]
	if p == nil {
		p = &peer{}
		m.nodes[node] = p
	}
	var renew time.Time
	if l.Spec.RenewTime != nil {
		renew = l.Spec.RenewTime.Time
	}
	holder := ""
	if l.Spec.HolderIdentity != nil {
		holder = *l.Spec.HolderIdentity
	}
	if !renew.Equal(p.renew) || holder != p.holder || p.seenAt.IsZero() {
		p.seenAt = m.now()
	}
	p.renew, p.holder = renew, holder
	p.duration = m.cfg.Timing.LeaseDuration
	if l.Spec.LeaseDurationSeconds != nil && *l.Spec.LeaseDurationSeconds > 0 {
		// A heartbeat says how long it lasts; it never counts for less
		// than this node's own setting.
		p.duration = max(p.duration, time.Duration(*l.Spec.LeaseDurationSeconds)*time.Second)
	}
	p.draining = l.Annotations[AnnotationDraining] == "true"
	p.addrs = p.addrs[:0]
	for _, f := range strings.Split(l.Annotations[AnnotationAddresses], ",") {
		if a, err := netip.ParseAddr(strings.TrimSpace(f)); err == nil {
			p.addrs = append(p.addrs, a.Unmap())
		}
	}
}

// PeerAddresses are the serviceInterface addresses other nodes publish in
// their heartbeats (expired ones included: a node that stopped renewing
// still has its addresses).
func (m *Manager) PeerAddresses() map[netip.Addr]bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := map[netip.Addr]bool{}
	for _, p := range m.nodes {
		for _, a := range p.addrs {
			out[a] = true
		}
	}
	return out
}

// watchLiveness pokes the sync loop whenever a node's heartbeat expires or
// comes back, or this node's own renewal becomes overdue: a few checks a
// retry period, whatever the number of Services.
func (m *Manager) watchLiveness(ctx context.Context) {
	tick := min(max(m.cfg.Timing.RetryPeriod/4, 20*time.Millisecond), 250*time.Millisecond)
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		m.mu.Lock()
		v := m.liveness(m.now())
		var b strings.Builder
		for _, n := range sortedKeys(v.Live) {
			b.WriteString(n)
			if !v.Candidates[n] {
				b.WriteString("(draining)")
			}
			b.WriteByte(',')
		}
		if v.Overdue {
			b.WriteString("overdue")
		}
		changed := b.String() != m.signature
		m.signature = b.String()
		m.mu.Unlock()
		if changed {
			m.cfg.Poke()
		}
	}
}

func sortedKeys(set map[string]bool) []string {
	out := make([]string, 0, len(set))
	for k, ok := range set {
		if ok {
			out = append(out, k)
		}
	}
	slices.Sort(out)
	return out
}

// View returns the election as this node sees it now.
func (m *Manager) View() View {
	now := m.now()
	objs, _ := m.leaseCache.ByIndex(indexAll, "")
	peers, _ := m.peerCache.ByIndex(indexAll, "")
	objs = append(objs, peers...)
	v := View{Self: m.cfg.Identity, Now: now, Leases: make(map[types.NamespacedName]Lease, len(objs))}

	m.mu.Lock()
	defer m.mu.Unlock()
	live := m.liveness(now)
	v.Established, v.Overdue, v.Draining, v.Live, v.Candidates = live.Established, live.Overdue, live.Draining, live.Live, live.Candidates
	for _, obj := range objs {
		l, ok := obj.(*coordinationv1.Lease)
		if !ok || l.Labels[LabelRole] == RoleHeartbeat {
			continue
		}
		key := types.NamespacedName{Namespace: l.Namespace, Name: l.Name}
		v.Leases[key] = m.leaseView(key, l, now)
	}
	for key := range m.pending {
		if _, ok := v.Leases[key]; !ok {
			v.Leases[key] = Lease{Pending: true}
		}
	}
	for key, until := range m.backoff {
		if now.Before(until) {
			if _, ok := v.Leases[key]; !ok {
				v.Leases[key] = Lease{Pending: true}
			}
		} else {
			delete(m.backoff, key)
		}
	}
	return v
}

// liveness is the View without its Leases; m.mu is held.
func (m *Manager) liveness(now time.Time) View {
	v := View{
		Self:        m.cfg.Identity,
		Now:         now,
		Established: m.epoch > 0,
		Overdue:     m.renewedAt.IsZero() || now.Sub(m.renewedAt) >= m.cfg.Timing.RenewDeadline,
		Draining:    m.draining,
		Live:        map[string]bool{},
		Candidates:  map[string]bool{},
	}
	for n, p := range m.nodes {
		if p.live(now) {
			v.Live[n] = true
			if !p.draining {
				v.Candidates[n] = true
			}
		}
	}
	if v.Established && !v.Overdue {
		v.Live[m.cfg.Identity] = true
		if !m.draining {
			v.Candidates[m.cfg.Identity] = true
		}
	}
	return v
}

// leaseView summarises one Lease object; m.mu is held.
func (m *Manager) leaseView(key types.NamespacedName, l *coordinationv1.Lease, now time.Time) Lease {
	var out Lease
	if l != nil {
		if l.Spec.HolderIdentity != nil {
			out.Holder = *l.Spec.HolderIdentity
		}
		out.Legacy = l.Labels[LabelRole] == ""
		for _, o := range l.OwnerReferences {
			if o.Kind == "Service" {
				out.OwnerUID = o.UID
			}
		}
	}
	if out.Holder == m.cfg.Identity && !out.Legacy && m.epoch > 0 {
		out.Current = m.confirmed[key] == m.epoch || (m.adopted && m.epoch == 1)
	}
	out.Pending = m.pending[key] || now.Before(m.backoff[key])
	return out
}

// current returns the newest copy of a Lease this node knows, or nil.
func (m *Manager) current(key types.NamespacedName) *coordinationv1.Lease {
	for _, mc := range []cache.MutationCache{m.leaseCache, m.peerCache} {
		if obj, ok, err := mc.GetByKey(key.String()); err == nil && ok {
			if l, ok := obj.(*coordinationv1.Lease); ok {
				return l.DeepCopy()
			}
		}
	}
	return nil
}

// remember lays a Lease this node wrote or read over the informer's copy
// until the informer has caught up.
func (m *Manager) remember(l *coordinationv1.Lease) {
	if l.Labels[LabelRole] == RoleGlobal {
		m.peerCache.Mutation(l)
		return
	}
	m.leaseCache.Mutation(l)
}
