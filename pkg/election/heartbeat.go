package election

import (
	"context"
	"fmt"
	"strings"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// heartbeatLoop renews this node's heartbeat every retry period until ctx
// ends. It first reads the previous process's heartbeat: if that was this
// node's and the first renewal lands within a lease duration of it, no
// other node can have seen this node expire, and the holdings the
// previous process wrote stay current without being written again.
func (m *Manager) heartbeatLoop(ctx context.Context) {
	log := m.cfg.Log.WithField("lease", m.cfg.Namespace+"/"+m.heartbeat)
	get, cancel := context.WithTimeout(ctx, m.cfg.Timing.RenewDeadline)
	prev, err := m.cfg.HeartbeatClient.Leases(m.cfg.Namespace).Get(get, m.heartbeat, metav1.GetOptions{})
	cancel()
	if err == nil {
		m.mu.Lock()
		m.hb = prev
		if prev.Spec.HolderIdentity != nil && *prev.Spec.HolderIdentity == m.cfg.Identity && prev.Spec.RenewTime != nil {
			m.prevRenew = prev.Spec.RenewTime.Time
			m.renewedAt = m.prevRenew
		}
		m.mu.Unlock()
	}
	failing := false
	for ctx.Err() == nil {
		start := m.now()
		if err := m.renew(ctx, start); err != nil {
			if !failing {
				log.WithError(err).Warn("heartbeat renewal failed; retrying")
			}
			failing = true
		} else if failing {
			log.Info("heartbeat renewed again")
			failing = false
		}
		wait := m.cfg.Timing.RetryPeriod - m.now().Sub(start)
		select {
		case <-ctx.Done():
		case <-time.After(max(wait, 0)):
		}
	}
}

// renew writes the heartbeat once, with RenewTime start.
func (m *Manager) renew(ctx context.Context, start time.Time) error {
	ctx, cancel := context.WithTimeout(ctx, m.cfg.Timing.RenewDeadline)
	defer cancel()
	addrs := m.hostAddresses()
	m.mu.Lock()
	l := m.heartbeatRecord(start, addrs)
	m.mu.Unlock()
	leases := m.cfg.HeartbeatClient.Leases(m.cfg.Namespace)
	var out *coordinationv1.Lease
	var err error
	if l.ResourceVersion == "" {
		out, err = leases.Create(ctx, l, metav1.CreateOptions{})
	} else {
		out, err = leases.Update(ctx, l, metav1.UpdateOptions{})
	}
	if apierrors.IsConflict(err) || apierrors.IsAlreadyExists(err) || apierrors.IsNotFound(err) {
		// Somebody else wrote it (an admin, or a previous process):
		// read it and write again at once.
		m.cfg.Wrote("heartbeat", "conflict")
		cur, gerr := leases.Get(ctx, m.heartbeat, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(gerr):
			l.ResourceVersion = ""
			out, err = leases.Create(ctx, l, metav1.CreateOptions{})
		case gerr != nil:
			return fmt.Errorf("read heartbeat: %w", gerr)
		default:
			m.mu.Lock()
			m.hb = cur
			l = m.heartbeatRecord(start, addrs)
			m.mu.Unlock()
			out, err = leases.Update(ctx, l, metav1.UpdateOptions{})
		}
	}
	if err != nil {
		m.cfg.Wrote("heartbeat", "error")
		return err
	}
	m.cfg.Wrote("heartbeat", "ok")
	m.renewed(start, out)
	return nil
}

// heartbeatRecord is the heartbeat to write; m.mu is held.
func (m *Manager) heartbeatRecord(renew time.Time, addrs []string) *coordinationv1.Lease {
	var l *coordinationv1.Lease
	if m.hb != nil {
		l = m.hb.DeepCopy()
	} else {
		l = &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: m.cfg.Namespace, Name: m.heartbeat}}
	}
	if l.Labels == nil {
		l.Labels = map[string]string{}
	}
	l.Labels[LabelManagedBy] = ManagedBy
	l.Labels[LabelRole] = RoleHeartbeat
	if l.Annotations == nil {
		l.Annotations = map[string]string{}
	}
	if m.draining {
		l.Annotations[AnnotationDraining] = "true"
	} else {
		delete(l.Annotations, AnnotationDraining)
	}
	if addrs != nil {
		l.Annotations[AnnotationAddresses] = strings.Join(addrs, ",")
	}
	holder := m.cfg.Identity
	seconds := int32((m.cfg.Timing.LeaseDuration + time.Second - 1) / time.Second)
	if l.Spec.HolderIdentity == nil || *l.Spec.HolderIdentity != holder {
		l.Spec.AcquireTime = &metav1.MicroTime{Time: renew}
	}
	l.Spec.HolderIdentity = &holder
	l.Spec.LeaseDurationSeconds = &seconds
	l.Spec.RenewTime = &metav1.MicroTime{Time: renew}
	return l
}

// hostAddresses are the addresses published in the heartbeat (nil when
// the daemon publishes none).
func (m *Manager) hostAddresses() []string {
	if m.cfg.HostAddresses == nil {
		return nil
	}
	addrs := []string{}
	for _, a := range m.cfg.HostAddresses() {
		if !a.IsLinkLocalUnicast() {
			addrs = append(addrs, a.String())
		}
	}
	return addrs
}

// renewed records a successful renewal whose RenewTime is start.
func (m *Manager) renewed(start time.Time, out *coordinationv1.Lease) {
	ack := m.now()
	m.mu.Lock()
	wasOverdue := m.renewedAt.IsZero() || ack.Sub(m.renewedAt) >= m.cfg.Timing.RenewDeadline
	first := m.epoch == 0
	switch {
	case first:
		m.epoch = 1
		m.adopted = !m.prevRenew.IsZero() && ack.Sub(m.prevRenew) < m.cfg.Timing.LeaseDuration
	case ack.Sub(m.renewedAt) >= m.cfg.Timing.LeaseDuration:
		// Other nodes may have seen the heartbeat expire and taken
		// Services over; what this node held must be written again.
		m.epoch++
	}
	m.renewedAt = start
	m.hb = out
	m.mu.Unlock()
	if first || wasOverdue {
		m.cfg.Poke()
	}
}

// Drain marks this node as leaving: its heartbeat says so at once, so that
// other nodes take the Services it releases without waiting for it, and
// they no longer rank it for anything new. It waits at most a retry period
// for the write.
func (m *Manager) Drain(ctx context.Context) {
	m.mu.Lock()
	m.draining = true
	m.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, m.cfg.Timing.RetryPeriod)
	defer cancel()
	if err := m.renew(ctx, m.now()); err != nil {
		m.cfg.Log.WithError(err).Warn("could not mark the heartbeat as draining")
	}
}
