package election

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// Claim asks for a Lease to be written naming this node.
type Claim struct {
	Lease types.NamespacedName
	// Owner is the Service the Lease belongs to (its ownerReference);
	// nil for the global Lease.
	Owner *metav1.OwnerReference
}

// Acquire writes the Lease naming this node, in the background. The write
// carries the resourceVersion this node last saw, so of two nodes acquiring
// at once one fails and reads the winner. A holder is taken over only
// after its heartbeat, read from the API server, is found expired too. A
// Lease already held by this node is written again, which confirms a
// holding left from before a heartbeat gap. It is a no-op while a write for
// the Lease is in flight.
func (m *Manager) Acquire(c Claim) {
	m.start(c.Lease, "acquire", func(ctx context.Context) error { return m.acquire(ctx, c) })
}

// Release writes the Lease without a holder, in the background, if this
// node holds it. Call it only once the kernel no longer holds what the
// Lease guards.
func (m *Manager) Release(lease types.NamespacedName) {
	m.start(lease, "release", func(ctx context.Context) error { return m.release(ctx, lease) })
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
// takes 2,000 Services over queues 2,000 writes, not 2,000 goroutines. A
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
			time.AfterFunc(m.cfg.Timing.RetryPeriod, m.cfg.Poke)
		}
		m.cfg.Poke()
	}
}

func holderOf(l *coordinationv1.Lease) string {
	if l == nil || l.Spec.HolderIdentity == nil {
		return ""
	}
	return *l.Spec.HolderIdentity
}

func (m *Manager) acquire(ctx context.Context, c Claim) error {
	cur := m.current(c.Lease)
	prev := holderOf(cur)
	legacy := cur != nil && cur.Labels[LabelRole] == ""
	if prev != "" && prev != m.cfg.Identity && !legacy {
		if err := m.confirmExpired(ctx, prev); err != nil {
			return err
		}
	}
	m.mu.Lock()
	epoch := m.epoch
	m.mu.Unlock()
	if epoch == 0 {
		return errors.New("no heartbeat yet")
	}
	now := metav1.NewMicroTime(m.now())
	l := cur
	if l == nil {
		l = &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: c.Lease.Namespace, Name: c.Lease.Name}}
	}
	if l.Labels == nil {
		l.Labels = map[string]string{}
	}
	l.Labels[LabelManagedBy] = ManagedBy
	l.Labels[LabelRole] = RoleService
	if c.Owner == nil {
		l.Labels[LabelRole] = RoleGlobal
	} else {
		l.OwnerReferences = []metav1.OwnerReference{*c.Owner}
	}
	if l.Annotations == nil {
		l.Annotations = map[string]string{}
	}
	l.Annotations[AnnotationValidWhile] = "Lease " + m.cfg.Namespace + "/" + m.heartbeat + " is valid"
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
	// The holding is valid while the heartbeat is; a duration here would
	// make other tools read a Lease that is never renewed as expired.
	l.Spec.LeaseDurationSeconds = nil

	leases := m.cfg.Client.Leases(c.Lease.Namespace)
	var out *coordinationv1.Lease
	var err error
	if cur == nil {
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
		// Gone: the informer's delete drops what this node wrote.
		return nil
	case gerr != nil:
		return fmt.Errorf("read Lease %s after a conflict: %w", key, gerr)
	}
	m.remember(cur)
	return nil
}

// confirmExpired reads node's heartbeat from the API server before its
// Services are taken over: the informer may lag behind, and a holder whose
// heartbeat was renewed in fact still acts on its addresses. One read per
// node and retry period is enough, however many Services it held.
func (m *Manager) confirmExpired(ctx context.Context, node string) error {
	m.mu.Lock()
	p := m.nodes[node]
	if p != nil && p.live(m.now()) {
		m.mu.Unlock()
		return errHolderAlive
	}
	if at, ok := m.checked[node]; ok && m.now().Sub(at) < m.cfg.Timing.RetryPeriod {
		m.mu.Unlock()
		return nil
	}
	m.mu.Unlock()
	l, err := m.cfg.Client.Leases(m.cfg.Namespace).Get(ctx, HeartbeatName(node), metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		m.mu.Lock()
		m.checked[node] = m.now()
		m.mu.Unlock()
		return nil
	}
	if err != nil {
		return fmt.Errorf("read heartbeat of %s: %w", node, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if holderOf(l) == "" || (p != nil && l.Spec.RenewTime != nil && l.Spec.RenewTime.Time.Equal(p.renew)) {
		m.checked[node] = m.now()
		return nil
	}
	m.observePeer(node, l)
	return errHolderAlive
}
