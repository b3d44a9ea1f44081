package election

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"

	"github.com/egressvip/egressvip/pkg/model"
)

func isNotFound(err error) bool { return apierrors.IsNotFound(err) }

// Acquire writes the Lease naming this node, in the background. The write
// carries the resourceVersion this node last saw, so of two nodes acquiring
// at once one fails and reads the winner. A holder is taken over only once
// its holding is invalid: for a current or heartbeat-release holder its
// heartbeat, read from the API server, must have expired too; a holder of
// the release before heartbeats must not have renewed for its duration. A
// Lease already held by this node is written again, which confirms a
// holding left from before a heartbeat gap, or re-creates one deleted by
// hand. It is a no-op while a write for the Lease is in flight.
func (m *Manager) Acquire(c model.Claim) {
	m.start(c.Lease, "acquire", func(ctx context.Context) error { return m.acquire(ctx, c) })
}

// Release writes the Lease without a holder, in the background, if this
// node holds it. Call it only once the kernel no longer holds what the
// Lease guards.
func (m *Manager) Release(lease types.NamespacedName) {
	m.start(lease, "release", func(ctx context.Context) error { return m.release(ctx, lease) })
}

// Delete removes an address Lease nobody holds and no Service claims, in
// the background (address Leases have no owner the garbage collector
// follows: they live in the daemon's namespace).
func (m *Manager) Delete(lease types.NamespacedName) {
	m.start(lease, "delete", func(ctx context.Context) error { return m.remove(ctx, lease) })
}

// ReleaseNow releases leases and waits, at most until ctx ends: shutdown.
func (m *Manager) ReleaseNow(ctx context.Context, leases []types.NamespacedName) {
	work := make(chan types.NamespacedName)
	var wg sync.WaitGroup
	for range min(m.cfg.Workers, len(leases)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for key := range work {
				if err := m.release(ctx, key); err != nil {
					m.cfg.Log.WithError(err).WithField("lease", key.String()).Warn("release failed")
				}
			}
		}()
	}
feed:
	for _, key := range leases {
		select {
		case work <- key:
		case <-ctx.Done():
			break feed
		}
	}
	close(work)
	wg.Wait()
}

// job is one queued write.
type job struct {
	key   types.NamespacedName
	kind  string
	write func(context.Context) error
}

// start queues one write for key unless one is already pending for it. At
// most Workers writes run at once, from as many goroutines: a node that
// takes 2,000 addresses over queues 4,000 writes, not 4,000 goroutines. A
// failure backs the key off for a retry period; any end pokes the loop.
func (m *Manager) start(key types.NamespacedName, kind string, write func(context.Context) error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.pending[key] || m.now().Before(m.backoff[key]) {
		return
	}
	m.pending[key] = true
	m.jobs = append(m.jobs, job{key: key, kind: kind, write: write})
	if m.workers < m.cfg.Workers {
		m.workers++
		go m.work()
	}
}

// work runs queued writes until the queue is empty.
func (m *Manager) work() {
	for {
		m.mu.Lock()
		if len(m.jobs) == 0 {
			m.workers--
			m.jobs = nil
			m.mu.Unlock()
			return
		}
		j := m.jobs[0]
		m.jobs = m.jobs[1:]
		m.mu.Unlock()

		ctx, cancel := context.WithTimeout(context.Background(), m.cfg.Timing.RenewDeadline)
		err := j.write(ctx)
		cancel()
		m.mu.Lock()
		delete(m.pending, j.key)
		if err != nil {
			m.backoff[j.key] = m.now().Add(m.cfg.Timing.RetryPeriod)
		}
		m.mu.Unlock()
		if err != nil {
			if !errors.Is(err, errHolderAlive) {
				m.cfg.Log.WithError(err).WithField("lease", j.key.String()).Warnf("%s failed; retrying", j.kind)
			}
			go func() {
				<-m.cfg.Clock.After(m.cfg.Timing.RetryPeriod)
				m.cfg.Poke()
			}()
		}
		m.cfg.Poke()
	}
}

// takeable says whether this node may write over cur's holder now; it may
// read the holder's heartbeat from the API server.
func (m *Manager) takeable(ctx context.Context, key types.NamespacedName, cur *coordinationv1.Lease) error {
	prev := holderOf(cur)
	if prev == "" || prev == m.cfg.Identity {
		return nil
	}
	lv := m.judgeOne(key, cur)
	if lv.Valid {
		return errHolderAlive
	}
	if lv.Writer == model.Legacy {
		// client-go's rule: not renewed for its duration, as this node
		// saw it. The Update carries the resourceVersion read, so a
		// renewal since makes it fail.
		return nil
	}
	return m.confirmExpired(ctx, prev)
}

func (m *Manager) acquire(ctx context.Context, c model.Claim) error {
	cur := m.current(c.Lease)
	if err := m.takeable(ctx, c.Lease, cur); err != nil {
		return err
	}
	m.mu.Lock()
	epoch := m.epoch
	m.mu.Unlock()
	if epoch == 0 {
		return errors.New("no heartbeat yet")
	}
	prev := holderOf(cur)
	now := metav1.NewMicroTime(m.now())
	l := cur
	if l == nil {
		l = &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: c.Lease.Namespace, Name: c.Lease.Name}}
	}
	if l.Labels == nil {
		l.Labels = map[string]string{}
	}
	l.Labels[LabelManagedBy] = ManagedBy
	if l.Annotations == nil {
		l.Annotations = map[string]string{}
	}
	l.Annotations[AnnotationValidWhile] = "Lease " + m.cfg.Namespace + "/" + m.heartbeat + " is valid"
	// The holding is valid while the heartbeat is; a duration on an
	// address Lease would make other tools read a Lease that is never
	// renewed as expired.
	l.Spec.LeaseDurationSeconds = nil
	switch c.Kind {
	case model.AddressLease:
		l.Labels[LabelRole] = RoleAddress
		l.Annotations[AnnotationAddress] = c.Address.String()
		if c.ClaimedBy != "" {
			l.Annotations[AnnotationClaimedBy] = c.ClaimedBy
		}
	case model.GlobalLease:
		l.Labels[LabelRole] = RoleGlobal
	default:
		l.Labels[LabelRole] = RoleService
		l.Annotations[AnnotationAddressLeases] = strings.Join(c.AddressLeases, ",")
		refs := make([]metav1.OwnerReference, 0, len(c.Owners))
		for _, o := range c.Owners {
			refs = append(refs, metav1.OwnerReference{APIVersion: "v1", Kind: "Service", Name: o.Name, UID: o.UID})
		}
		l.OwnerReferences = refs
		// Daemons of the release before heartbeats take a Lease over
		// once it has not changed for this long (see LegacyHoldSeconds).
		hold := int32(LegacyHoldSeconds)
		l.Spec.LeaseDurationSeconds = &hold
	}
	self := m.cfg.Identity
	if prev != self {
		l.Spec.AcquireTime = &now
		if cur != nil {
			t := int32(0)
			if l.Spec.LeaseTransitions != nil {
				t = *l.Spec.LeaseTransitions
			}
			t++
			l.Spec.LeaseTransitions = &t
		}
	}
	l.Spec.HolderIdentity = &self
	l.Spec.RenewTime = &now

	leases := m.cfg.Client.Leases(c.Lease.Namespace)
	var out *coordinationv1.Lease
	var err error
	if cur == nil || l.ResourceVersion == "" {
		l.ResourceVersion = ""
		out, err = leases.Create(ctx, l, metav1.CreateOptions{})
	} else {
		out, err = leases.Update(ctx, l, metav1.UpdateOptions{})
	}
	if err != nil {
		return m.lost(ctx, c.Lease, "acquire", err)
	}
	m.cfg.Wrote("acquire", "ok")
	m.remember(out)
	m.mu.Lock()
	m.confirmed[c.Lease] = epoch
	m.mu.Unlock()
	return nil
}

func (m *Manager) release(ctx context.Context, key types.NamespacedName) error {
	cur := m.current(key)
	if holderOf(cur) != m.cfg.Identity {
		m.mu.Lock()
		delete(m.confirmed, key)
		if t, ok := m.tombs[key]; ok && t.holder == m.cfg.Identity {
			delete(m.tombs, key)
		}
		m.mu.Unlock()
		return nil
	}
	cur.Spec.HolderIdentity = nil
	cur.Spec.AcquireTime = nil
	cur.Spec.RenewTime = nil
	out, err := m.cfg.Client.Leases(key.Namespace).Update(ctx, cur, metav1.UpdateOptions{})
	if err != nil {
		return m.lost(ctx, key, "release", err)
	}
	m.cfg.Wrote("release", "ok")
	m.remember(out)
	m.mu.Lock()
	delete(m.confirmed, key)
	m.mu.Unlock()
	return nil
}

func (m *Manager) remove(ctx context.Context, key types.NamespacedName) error {
	cur := m.current(key)
	if cur == nil {
		return nil
	}
	if h := holderOf(cur); h != "" && h != m.cfg.Identity {
		return nil
	}
	rv := cur.ResourceVersion
	err := m.cfg.Client.Leases(key.Namespace).Delete(ctx, key.Name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{ResourceVersion: &rv}})
	switch {
	case err == nil || apierrors.IsNotFound(err):
		m.cfg.Wrote("delete", "ok")
		m.mu.Lock()
		delete(m.confirmed, key)
		delete(m.tombs, key)
		m.mu.Unlock()
		return nil
	case apierrors.IsConflict(err):
		m.cfg.Wrote("delete", "conflict")
		return m.lost(ctx, key, "delete", err)
	}
	m.cfg.Wrote("delete", "error")
	return fmt.Errorf("delete Lease %s: %w", key, err)
}

// lost handles a failed write. On a conflict (another node wrote first)
// it reads the Lease so the next plan sees the winner, and is not an
// error; anything else is.
func (m *Manager) lost(ctx context.Context, key types.NamespacedName, kind string, err error) error {
	if !apierrors.IsConflict(err) && !apierrors.IsAlreadyExists(err) && !apierrors.IsNotFound(err) {
		m.cfg.Wrote(kind, "error")
		return fmt.Errorf("%s Lease %s: %w", kind, key, err)
	}
	m.cfg.Wrote(kind, "conflict")
	cur, gerr := m.cfg.Client.Leases(key.Namespace).Get(ctx, key.Name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(gerr):
		// Gone: forget what this node wrote, so the next acquisition
		// creates it.
		m.forget(key)
		return nil
	case gerr != nil:
		return fmt.Errorf("read Lease %s after a conflict: %w", key, gerr)
	}
	m.remember(cur)
	return nil
}

// forget drops a Lease from the caches: it does not exist any more.
func (m *Manager) forget(key types.NamespacedName) {
	for _, mc := range []cache.MutationCache{m.serviceCache, m.daemonCache} {
		if obj, ok, err := mc.GetByKey(key.String()); err == nil && ok {
			if l, ok := obj.(*coordinationv1.Lease); ok {
				mc.OnDelete(l)
			}
		}
	}
	m.mu.Lock()
	delete(m.legacy, key)
	delete(m.observed, key)
	m.mu.Unlock()
}

// confirmExpired reads node's heartbeat from the API server before its
// addresses are taken over: the informer may lag behind, and a holder whose
// heartbeat was renewed in fact still acts on its addresses. One read per
// node and retry period is enough, however many addresses it held. A
// heartbeat that does not exist proves nothing while the node's Node does
// (it was deleted by hand, and the node writes it again within a retry
// period if it lives): it counts as expired only once this node has seen
// no renewal for twice the lease duration, or when the Node is gone.
func (m *Manager) confirmExpired(ctx context.Context, node string) error {
	m.mu.Lock()
	p := m.nodes[node]
	now := m.now()
	if p != nil && p.live(now) {
		m.mu.Unlock()
		return errHolderAlive
	}
	if at, ok := m.checked[node]; ok && now.Sub(at) < m.cfg.Timing.RetryPeriod {
		m.mu.Unlock()
		return nil
	}
	m.mu.Unlock()
	l, err := m.cfg.Client.Leases(m.cfg.Namespace).Get(ctx, HeartbeatName(node), metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		m.mu.Lock()
		defer m.mu.Unlock()
		gone := false
		if m.cfg.NodeExists != nil {
			if exists, known := m.cfg.NodeExists(node); known && !exists {
				gone = true
			}
		}
		if gone || p == nil || now.Sub(p.seenAt) >= 2*p.duration {
			m.checked[node] = now
			return nil
		}
		return errHolderAlive
	}
	if err != nil {
		return fmt.Errorf("read heartbeat of %s: %w", node, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if holderOf(l) == "" || (p != nil && l.Spec.RenewTime != nil && l.Spec.RenewTime.Time.Equal(p.renew)) {
		m.checked[node] = now
		return nil
	}
	m.observePeer(node, l)
	return errHolderAlive
}
