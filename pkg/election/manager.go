package election

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
	coordinationv1 "k8s.io/api/coordination/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"
	"k8s.io/utils/clock"

	"github.com/egressvip/egressvip/pkg/kube"
	"github.com/egressvip/egressvip/pkg/model"
)

// Config configures a Manager.
type Config struct {
	// Identity is this node's name, written as holder.
	Identity string
	// Namespace is the daemon's namespace: heartbeats, address Leases and
	// the global Lease live there.
	Namespace string
	// ServiceNamespace limits the Service Leases watched ("" for all).
	ServiceNamespace string
	Timing           Timing
	// HeartbeatClient renews the heartbeat only, so that no other write
	// can delay it behind a rate limiter.
	HeartbeatClient kube.Interface
	// Client watches Leases and writes acquisitions and releases.
	Client kube.Interface
	// Workers bounds the acquisitions and releases in flight; 0 means
	// DefaultWorkers.
	Workers int
	// Poke asks the sync loop to plan again.
	Poke func()
	// Node is what this node publishes in its heartbeat, read at every
	// renewal (nil: standing, nothing else).
	Node func() NodeInfo
	// NodeExists says whether a Node object of that name exists (known is
	// false while that cannot be told): the heartbeat of a deleted Node
	// is gone for good, a heartbeat deleted by hand comes back.
	NodeExists func(name string) (exists, known bool)
	// Wrote, when set, counts Lease writes by kind (heartbeat, acquire,
	// release, delete) and result (ok, conflict, error).
	Wrote func(kind, result string)
	// Clock is the time source (tests pass a fake); nil means real time.
	Clock clock.WithTicker
	Log   *logrus.Entry
}

// Manager keeps the election view of one node and performs its writes.
type Manager struct {
	cfg       Config
	heartbeat string // this node's heartbeat Lease name
	// daemon watches the daemon's namespace (heartbeats, address Leases,
	// the global Lease); services the Service Leases.
	daemon   cache.SharedIndexInformer
	services cache.SharedIndexInformer
	// daemonCache and serviceCache are the informers' stores with this
	// node's own writes (and reads after a conflict) laid over them until
	// the informers have caught up: client-go's mutation cache, which
	// keeps whichever copy has the newer resourceVersion.
	daemonCache  cache.MutationCache
	serviceCache cache.MutationCache

	heartbeatOK atomic.Bool

	mu sync.Mutex
	// hb is the last heartbeat written (or found at start-up).
	hb *coordinationv1.Lease
	// renewedAt is the RenewTime of the last successful renewal: taken
	// before the request, so no other node can see the heartbeat expire
	// before renewedAt + LeaseDuration. At start-up it is the previous
	// process's last renewal.
	renewedAt time.Time
	prevRenew time.Time
	// hbDuration is the leaseDurationSeconds the heartbeat is to carry
	// (at least Timing.LeaseDuration; see SetHeartbeatDuration), and
	// hbWritten what the last successful renewal wrote.
	hbDuration, hbWritten time.Duration
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
	// server and found expired, before taking its addresses over.
	checked map[string]time.Time
	// observed is, per Lease, its ownership record and when this node
	// first saw it so: a Legacy holding is valid for its duration after
	// that (client-go's rule, which compares no clocks of other nodes).
	observed map[types.NamespacedName]observation
	// tombs are Leases deleted while they named a holder: the holder
	// writes them again; until then others must not take them for free.
	tombs map[types.NamespacedName]tomb
	// legacy are Service Leases found without labels (written by the
	// release before heartbeats); the informers do not see them, so they
	// are read every retry period while they exist.
	legacy map[types.NamespacedName]*coordinationv1.Lease
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
	record   nodeRecord
	// deleted is set when the heartbeat Lease was deleted: it still
	// counts until it expires (its node writes it again at once if it
	// lives).
	deleted bool
}

func (p *peer) live(now time.Time) bool {
	return p.holder != "" && now.Before(p.seenAt.Add(p.duration))
}

// observation is a Lease's ownership record and when it was first seen.
type observation struct {
	record   string
	at       time.Time
	duration time.Duration
}

// tomb is a deleted Lease's last holder.
type tomb struct {
	holder string
	kind   model.LeaseKind
	at     time.Time
}

// tombLife bounds how long a deleted Lease is remembered.
const tombLife = 10 * time.Minute

// indexAll puts every Lease under one index key, so that the mutation
// caches can list everything.
const indexAll = "all"

// errHolderAlive stops a takeover whose holder's heartbeat turned out to be
// renewed after all (or cannot be shown to have expired).
var errHolderAlive = errors.New("holder's heartbeat was renewed")

// DefaultWorkers is how many Lease writes a node has in flight by default.
// A node taking 2,000 Services over writes two Leases for each before it
// binds; at a few hundred milliseconds per write on a busy API server, 16
// writers took 13 s after the last EndpointSlice, 64 took 5.5 s
// (bench-scale). The election client's QPS limit still bounds the rate.
const DefaultWorkers = 64

// NewManager builds a Manager; call Run to start it.
func NewManager(cfg Config) *Manager {
	if cfg.Workers <= 0 {
		cfg.Workers = DefaultWorkers
	}
	if cfg.Poke == nil {
		cfg.Poke = func() {}
	}
	if cfg.Wrote == nil {
		cfg.Wrote = func(string, string) {}
	}
	if cfg.Clock == nil {
		cfg.Clock = clock.RealClock{}
	}
	m := &Manager{
		cfg:       cfg,
		heartbeat: HeartbeatName(cfg.Identity),
		nodes:     map[string]*peer{},
		confirmed: map[types.NamespacedName]uint64{},
		pending:   map[types.NamespacedName]bool{},
		backoff:   map[types.NamespacedName]time.Time{},
		checked:   map[string]time.Time{},
		observed:  map[types.NamespacedName]observation{},
		tombs:     map[types.NamespacedName]tomb{},
		legacy:    map[types.NamespacedName]*coordinationv1.Lease{},
	}
	m.heartbeatOK.Store(true)
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
	m.daemon = kube.NewInformer(cfg.Client, cfg.Client.Leases(cfg.Namespace), &coordinationv1.Lease{}, kube.InformerOptions{
		Indexers:  all,
		Transform: strip,
		Tweak: func(o *metav1.ListOptions) {
			o.LabelSelector = LabelRole + " in (" + RoleHeartbeat + "," + RoleGlobal + "," + RoleAddress + ")"
		},
	})
	m.services = kube.NewInformer(cfg.Client, cfg.Client.Leases(cfg.ServiceNamespace), &coordinationv1.Lease{}, kube.InformerOptions{
		Indexers:  all,
		Transform: strip,
		Tweak:     func(o *metav1.ListOptions) { o.LabelSelector = LabelRole + "=" + RoleService },
	})
	mutations := func(inf cache.SharedIndexInformer) cache.MutationCache {
		return cache.NewIntegerResourceVersionMutationCacheWithOptions(klog.Background(), inf.GetStore(), cache.MutationCacheOptions{
			Indexer: inf.GetIndexer(), TTL: time.Minute, IncludeAdds: true, MaxCacheSize: 100000,
		})
	}
	m.daemonCache, m.serviceCache = mutations(m.daemon), mutations(m.services)
	for _, c := range []struct {
		inf   cache.SharedIndexInformer
		cache cache.MutationCache
	}{{m.daemon, m.daemonCache}, {m.services, m.serviceCache}} {
		_, _ = c.inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc:    func(obj any) { m.observe(c.cache, obj, false) },
			UpdateFunc: func(_, obj any) { m.observe(c.cache, obj, false) },
			DeleteFunc: func(obj any) { m.observe(c.cache, obj, true) },
		})
	}
	return m
}

func (m *Manager) now() time.Time { return m.cfg.Clock.Now() }

// Identity is the holder identity this node writes into Leases.
func (m *Manager) Identity() string { return m.cfg.Identity }

// HasSynced reports whether both Lease informers have synced.
func (m *Manager) HasSynced() bool { return m.daemon.HasSynced() && m.services.HasSynced() }

// Run starts the informers, the heartbeat and the liveness check; it
// returns at once. Everything stops when ctx ends.
func (m *Manager) Run(ctx context.Context) {
	go m.daemon.RunWithContext(ctx)
	go m.services.RunWithContext(ctx)
	go m.heartbeatLoop(ctx)
	go m.watchLiveness(ctx)
	go m.pollLegacy(ctx)
}

// observe takes an informer event: a heartbeat updates the peer it
// belongs to; an ownership Lease drops the own write it has caught up
// with, is observed (for Legacy validity and deletions) and pokes the sync
// loop.
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
			m.peerDeleted(node)
		} else {
			m.observePeer(node, l)
		}
		m.mu.Unlock()
		// Liveness changes are noticed by watchLiveness; a renewal is
		// no news.
		return
	}
	key := types.NamespacedName{Namespace: l.Namespace, Name: l.Name}
	m.mu.Lock()
	if deleted {
		delete(m.observed, key)
		if h := holderOf(l); h != "" {
			m.tombs[key] = tomb{holder: h, kind: kindOf(l), at: m.now()}
		}
	} else {
		delete(m.tombs, key)
		delete(m.legacy, key)
		m.observeRecord(key, l)
	}
	m.mu.Unlock()
	if deleted {
		mc.OnDelete(l)
	} else {
		mc.OnAddOrUpdate(l)
	}
	m.cfg.Poke()
}

// peerDeleted handles a deleted heartbeat; m.mu is held. The heartbeat of
// a Node that is gone goes (the garbage collector deletes it with its
// Node); one deleted by hand keeps counting until it expires, since its
// node writes it again at once if it lives.
func (m *Manager) peerDeleted(node string) {
	if m.cfg.NodeExists != nil {
		if exists, known := m.cfg.NodeExists(node); known && !exists {
			delete(m.nodes, node)
			return
		}
	}
	if p := m.nodes[node]; p != nil {
		p.deleted = true
	}
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
	holder := holderOf(l)
	if !renew.Equal(p.renew) || holder != p.holder || p.seenAt.IsZero() {
		p.seenAt = m.now()
	}
	p.renew, p.holder, p.deleted = renew, holder, false
	p.duration = m.cfg.Timing.LeaseDuration
	if l.Spec.LeaseDurationSeconds != nil && *l.Spec.LeaseDurationSeconds > 0 {
		// A heartbeat says how long it lasts; it never counts for less
		// than this node's own setting.
		p.duration = max(p.duration, time.Duration(*l.Spec.LeaseDurationSeconds)*time.Second)
	}
	p.draining = l.Annotations[AnnotationDraining] == "true"
	p.record = parseNodeRecord(l)
	p.addrs = p.addrs[:0]
	for _, f := range strings.Split(l.Annotations[AnnotationAddresses], ",") {
		if a, err := netip.ParseAddr(strings.TrimSpace(f)); err == nil {
			p.addrs = append(p.addrs, a.Unmap())
		}
	}
}

// observeRecord notes when this node first saw a Lease's current ownership
// record; m.mu is held.
func (m *Manager) observeRecord(key types.NamespacedName, l *coordinationv1.Lease) {
	rec := recordOf(l)
	if o, ok := m.observed[key]; ok && o.record == rec {
		return
	}
	d := m.cfg.Timing.LeaseDuration
	if l.Spec.LeaseDurationSeconds != nil && *l.Spec.LeaseDurationSeconds > 0 {
		d = max(d, time.Duration(*l.Spec.LeaseDurationSeconds)*time.Second)
	}
	m.observed[key] = observation{record: rec, at: m.now(), duration: d}
}

// recordOf is what client-go's leader election compares to tell that a
// Lease changed: holder and times.
func recordOf(l *coordinationv1.Lease) string {
	var b strings.Builder
	b.WriteString(holderOf(l))
	for _, t := range []*metav1.MicroTime{l.Spec.AcquireTime, l.Spec.RenewTime} {
		b.WriteByte('|')
		if t != nil {
			b.WriteString(t.UTC().Format(time.RFC3339Nano))
		}
	}
	if l.Spec.LeaseTransitions != nil {
		b.WriteString("|" + strconv.Itoa(int(*l.Spec.LeaseTransitions)))
	}
	return b.String()
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
// comes back, its published state changes, or this node's own renewal
// becomes overdue: a few checks a retry period, whatever the number of
// Services.
func (m *Manager) watchLiveness(ctx context.Context) {
	tick := min(max(m.cfg.Timing.RetryPeriod/4, 20*time.Millisecond), 250*time.Millisecond)
	t := m.cfg.Clock.NewTicker(tick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C():
		}
		m.mu.Lock()
		now := m.now()
		var b strings.Builder
		for _, n := range sortedNodes(m.nodes) {
			p := m.nodes[n]
			if !p.live(now) {
				continue
			}
			b.WriteString(n)
			if p.draining || !p.record.Standing {
				b.WriteString("(out)")
			}
			for _, v := range p.record.Via {
				b.WriteString(" " + v.String())
			}
			b.WriteString(" " + p.record.VTEP + ",")
		}
		if m.renewedAt.IsZero() || now.Sub(m.renewedAt) >= m.cfg.Timing.RenewDeadline {
			b.WriteString("overdue")
		}
		// Legacy holdings and remembered deletions expire by time too.
		for key, o := range m.observed {
			if now.Sub(o.at) >= o.duration {
				b.WriteString("|" + key.String())
			}
		}
		for key, t := range m.tombs {
			if now.Sub(t.at) >= tombLife {
				delete(m.tombs, key)
			}
		}
		changed := b.String() != m.signature
		m.signature = b.String()
		m.mu.Unlock()
		if changed {
			m.cfg.Poke()
		}
	}
}

func sortedNodes(nodes map[string]*peer) []string {
	out := make([]string, 0, len(nodes))
	for k := range nodes {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// Fresh says whether this node's heartbeat is established and its last
// successful renewal is younger than the renew deadline: while it is, no
// other node can see it expired for at least LeaseDuration - RenewDeadline,
// longer than an address's lifetime, so renewing the lifetimes of what it
// holds cannot make an address outlive its claim.
func (m *Manager) Fresh() bool {
	now := m.now()
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.epoch > 0 && !m.renewedAt.IsZero() && now.Sub(m.renewedAt) < m.cfg.Timing.RenewDeadline
}

// Epoch is the current epoch of this node's heartbeat: 0 before the first
// renewal, one more after every renewal that came a lease duration or more
// after the previous one (other nodes may have taken over meanwhile).
func (m *Manager) Epoch() uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.epoch
}

// View returns the election as this node sees it now.
func (m *Manager) View() model.ElectionView {
	now := m.now()
	objs, _ := m.serviceCache.ByIndex(indexAll, "")
	daemonObjs, _ := m.daemonCache.ByIndex(indexAll, "")
	objs = append(objs, daemonObjs...)
	v := model.ElectionView{Self: m.cfg.Identity, Now: now, Leases: make(map[types.NamespacedName]model.Lease, len(objs))}

	m.mu.Lock()
	defer m.mu.Unlock()
	v.Established = m.epoch > 0
	v.Overdue = m.renewedAt.IsZero() || now.Sub(m.renewedAt) >= m.cfg.Timing.RenewDeadline
	v.Draining = m.draining
	v.Peers = make(map[string]model.Peer, len(m.nodes))
	for n, p := range m.nodes {
		live := p.live(now)
		mp := model.Peer{
			Version:   p.record.Version,
			Live:      live,
			Candidate: live && !p.draining && p.record.Standing,
			Via:       p.record.Via,
			Addresses: p.addrs,
		}
		if mac, under, ok := strings.Cut(p.record.VTEP, "@"); ok {
			if a, err := netip.ParseAddr(under); err == nil {
				mp.VTEPMAC, mp.VTEPUnderlay = mac, a
			}
		}
		v.Peers[n] = mp
	}
	for _, obj := range objs {
		l, ok := obj.(*coordinationv1.Lease)
		if !ok || l.Labels[LabelRole] == RoleHeartbeat {
			continue
		}
		key := types.NamespacedName{Namespace: l.Namespace, Name: l.Name}
		v.Leases[key] = m.leaseView(v, key, l, now)
	}
	for key, l := range m.legacy {
		if _, ok := v.Leases[key]; !ok {
			v.Leases[key] = m.leaseView(v, key, l, now)
		}
	}
	for key, t := range m.tombs {
		if _, ok := v.Leases[key]; ok {
			continue
		}
		lv := model.Lease{Kind: t.kind, Holder: t.holder, Deleted: true}
		m.judge(v, key, &lv, now)
		if lv.Valid {
			v.Leases[key] = lv
		}
	}
	for key := range m.pending {
		if lv, ok := v.Leases[key]; ok {
			lv.Pending = true
			v.Leases[key] = lv
		} else {
			v.Leases[key] = model.Lease{Kind: kindOfName(key.Name), Pending: true}
		}
	}
	for key, until := range m.backoff {
		if !now.Before(until) {
			delete(m.backoff, key)
			continue
		}
		if lv, ok := v.Leases[key]; ok {
			lv.Pending = true
			v.Leases[key] = lv
		} else {
			v.Leases[key] = model.Lease{Kind: kindOfName(key.Name), Pending: true}
		}
	}
	return v
}

// leaseView summarises one Lease object; m.mu is held.
func (m *Manager) leaseView(v model.ElectionView, key types.NamespacedName, l *coordinationv1.Lease, now time.Time) model.Lease {
	out := model.Lease{Kind: kindOf(l), Holder: holderOf(l)}
	for _, o := range l.OwnerReferences {
		if o.Kind == "Service" {
			out.Owners = append(out.Owners, o.UID)
		}
	}
	out.ClaimedBy = l.Annotations[AnnotationClaimedBy]
	if _, ok := m.observed[key]; !ok {
		m.observeRecord(key, l)
	}
	m.judge(v, key, &out, now)
	return out
}

// judgeOne is the view of one Lease object (nil: none), without building
// the whole view.
func (m *Manager) judgeOne(key types.NamespacedName, l *coordinationv1.Lease) model.Lease {
	now := m.now()
	m.mu.Lock()
	defer m.mu.Unlock()
	v := model.ElectionView{Self: m.cfg.Identity, Established: m.epoch > 0,
		Overdue: m.renewedAt.IsZero() || now.Sub(m.renewedAt) >= m.cfg.Timing.RenewDeadline}
	if l == nil {
		return model.Lease{}
	}
	return m.leaseView(v, key, l, now)
}

// judge sets a Lease's Writer, Valid and Current; m.mu is held.
func (m *Manager) judge(v model.ElectionView, key types.NamespacedName, out *model.Lease, now time.Time) {
	switch {
	case out.Holder == "":
		return
	case out.Holder == m.cfg.Identity:
		out.Writer = model.Current
		out.Valid = v.Established && !v.Overdue
		if m.epoch > 0 {
			out.Current = m.confirmed[key] == m.epoch || (m.adopted && m.epoch == 1)
		}
		return
	}
	p := m.nodes[out.Holder]
	switch {
	case p != nil && p.record.Version >= ProtocolVersion:
		out.Writer = model.Current
		out.Valid = p.live(now)
	case p != nil:
		out.Writer = model.Heartbeat
		out.Valid = p.live(now)
	default:
		// No heartbeat: the release before heartbeats, valid while it
		// renews (client-go's rule) — unless its Node is gone.
		out.Writer = model.Legacy
		if m.cfg.NodeExists != nil {
			if exists, known := m.cfg.NodeExists(out.Holder); known && !exists {
				return
			}
		}
		if o, ok := m.observed[key]; ok {
			out.Valid = now.Sub(o.at) < o.duration
		}
	}
}

func kindOf(l *coordinationv1.Lease) model.LeaseKind {
	switch l.Labels[LabelRole] {
	case RoleAddress:
		return model.AddressLease
	case RoleGlobal:
		return model.GlobalLease
	case RoleService:
		return model.ServiceLease
	}
	return kindOfName(l.Name)
}

func kindOfName(name string) model.LeaseKind {
	switch {
	case strings.HasPrefix(name, AddressPrefix):
		return model.AddressLease
	case strings.HasPrefix(name, LeasePrefix):
		return model.ServiceLease
	}
	return model.GlobalLease
}

// current returns the newest copy of a Lease this node knows, or nil.
func (m *Manager) current(key types.NamespacedName) *coordinationv1.Lease {
	for _, mc := range []cache.MutationCache{m.serviceCache, m.daemonCache} {
		if obj, ok, err := mc.GetByKey(key.String()); err == nil && ok {
			if l, ok := obj.(*coordinationv1.Lease); ok {
				return l.DeepCopy()
			}
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if l := m.legacy[key]; l != nil {
		return l.DeepCopy()
	}
	return nil
}

// remember lays a Lease this node wrote or read over the informer's copy
// until the informer has caught up. An unlabelled Service Lease (the
// release before heartbeats) is one no informer sees: it is remembered
// and read again every retry period while it exists.
func (m *Manager) remember(l *coordinationv1.Lease) {
	key := types.NamespacedName{Namespace: l.Namespace, Name: l.Name}
	m.mu.Lock()
	delete(m.tombs, key)
	m.observeRecord(key, l)
	if l.Labels[LabelRole] == "" {
		m.legacy[key] = l.DeepCopy()
		m.mu.Unlock()
		return
	}
	delete(m.legacy, key)
	m.mu.Unlock()
	if l.Namespace == m.cfg.Namespace && l.Labels[LabelRole] != RoleService {
		m.daemonCache.Mutation(l)
		return
	}
	m.serviceCache.Mutation(l)
}

// pollLegacy reads the unlabelled Service Leases this node knows every
// retry period: their holders renew them, and their validity is judged by
// when this node saw them change. They exist only while daemons of the
// release before heartbeats run (a rolling upgrade or rollback).
func (m *Manager) pollLegacy(ctx context.Context) {
	t := m.cfg.Clock.NewTicker(m.cfg.Timing.RetryPeriod)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C():
		}
		m.mu.Lock()
		keys := make([]types.NamespacedName, 0, len(m.legacy))
		for k := range m.legacy {
			keys = append(keys, k)
		}
		m.mu.Unlock()
		for _, key := range keys {
			rctx, cancel := context.WithTimeout(ctx, m.cfg.Timing.RetryPeriod)
			l, err := m.cfg.Client.Leases(key.Namespace).Get(rctx, key.Name, metav1.GetOptions{})
			cancel()
			m.mu.Lock()
			switch {
			case err == nil:
				before := m.observed[key]
				m.observeRecord(key, l)
				if l.Labels[LabelRole] == "" {
					m.legacy[key] = l
				} else {
					delete(m.legacy, key)
				}
				changed := before.record != m.observed[key].record
				m.mu.Unlock()
				if changed {
					m.cfg.Poke()
				}
				continue
			case isNotFound(err):
				delete(m.legacy, key)
				delete(m.observed, key)
			}
			m.mu.Unlock()
		}
	}
}

func holderOf(l *coordinationv1.Lease) string {
	if l == nil || l.Spec.HolderIdentity == nil {
		return ""
	}
	return *l.Spec.HolderIdentity
}
