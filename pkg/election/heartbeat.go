package election

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// NodeInfo is what this node publishes in its heartbeat, read at every
// renewal.
type NodeInfo struct {
	// Standing is false while the node cannot hold addresses (its
	// serviceInterface is missing or down): others do not rank it.
	Standing bool
	// Via are the node's addresses steered traffic may use as next hop,
	// in order of preference (InternalIPs, then serviceInterface ones).
	Via []netip.Addr
	// VTEPMAC and VTEPUnderlay are its VXLAN endpoint (empty without
	// VXLAN mode).
	VTEPMAC      string
	VTEPUnderlay netip.Addr
	// Addresses are its own serviceInterface addresses.
	Addresses []netip.Addr
	// UID is the Node object's UID: the heartbeat's owner, so it goes
	// with its Node (empty while unknown).
	UID types.UID
}

// nodeRecord is the JSON of AnnotationNode.
type nodeRecord struct {
	Version  int          `json:"version"`
	Standing bool         `json:"standing"`
	Via      []netip.Addr `json:"via,omitempty"`
	VTEP     string       `json:"vtep,omitempty"` // mac@underlay
}

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
				m.heartbeatFailed(err)
			}
			failing = true
		} else if failing {
			log.Info("heartbeat renewed again")
			failing = false
		}
		m.heartbeatOK.Store(!failing)
		wait := m.cfg.Timing.RetryPeriod - m.now().Sub(start)
		select {
		case <-ctx.Done():
		case <-m.cfg.Clock.After(max(wait, 0)):
		}
	}
}

// heartbeatFailed logs a failed renewal once per failing stretch; failures
// an operator must fix (the namespace is missing, RBAC forbids the write)
// at error level with what to do.
func (m *Manager) heartbeatFailed(err error) {
	log := m.cfg.Log.WithField("lease", m.cfg.Namespace+"/"+m.heartbeat).WithError(err)
	switch {
	case apierrors.IsNotFound(err):
		log.Errorf("cannot write the heartbeat: namespace %q does not exist; create it, or set POD_NAMESPACE to the daemon's namespace (the DaemonSet's metadata.namespace through the downward API)", m.cfg.Namespace)
	case apierrors.IsForbidden(err):
		log.Errorf("cannot write the heartbeat: RBAC forbids it; the daemon's ServiceAccount needs get, list, watch, create and update on coordination.k8s.io leases in namespace %q (see manifests/rbac.yaml)", m.cfg.Namespace)
	default:
		log.Warn("heartbeat renewal failed; retrying")
	}
}

// HeartbeatOK reports whether the last heartbeat renewal succeeded: the
// daemon is not ready while it cannot write its heartbeat.
func (m *Manager) HeartbeatOK() bool { return m.heartbeatOK.Load() }

// renew writes the heartbeat once, with RenewTime start.
func (m *Manager) renew(ctx context.Context, start time.Time) error {
	ctx, cancel := context.WithTimeout(ctx, m.cfg.Timing.RenewDeadline)
	defer cancel()
	info := m.nodeInfo()
	m.mu.Lock()
	l := m.heartbeatRecord(start, info)
	m.mu.Unlock()
	leases := m.cfg.HeartbeatClient.Leases(m.cfg.Namespace)
	var out *coordinationv1.Lease
	var err error
	if l.ResourceVersion == "" {
		out, err = leases.Create(ctx, l, metav1.CreateOptions{})
	} else {
		out, err = leases.Update(ctx, l, metav1.UpdateOptions{})
	}
	if apierrors.IsConflict(err) || apierrors.IsAlreadyExists(err) || (apierrors.IsNotFound(err) && l.ResourceVersion != "") {
		// Somebody else wrote it (an admin, or a previous process), or
		// deleted it: read it and write again at once.
		m.cfg.Wrote("heartbeat", "conflict")
		cur, gerr := leases.Get(ctx, m.heartbeat, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(gerr):
			m.mu.Lock()
			m.hb = nil
			l = m.heartbeatRecord(start, info)
			m.mu.Unlock()
			out, err = leases.Create(ctx, l, metav1.CreateOptions{})
		case gerr != nil:
			return fmt.Errorf("read heartbeat: %w", gerr)
		default:
			m.mu.Lock()
			m.hb = cur
			l = m.heartbeatRecord(start, info)
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

func (m *Manager) nodeInfo() NodeInfo {
	if m.cfg.Node == nil {
		return NodeInfo{Standing: true}
	}
	return m.cfg.Node()
}

// heartbeatRecord is the heartbeat to write; m.mu is held.
func (m *Manager) heartbeatRecord(renew time.Time, info NodeInfo) *coordinationv1.Lease {
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
	var addrs []string
	for _, a := range info.Addresses {
		if !a.IsLinkLocalUnicast() {
			addrs = append(addrs, a.String())
		}
	}
	l.Annotations[AnnotationAddresses] = strings.Join(addrs, ",")
	rec := nodeRecord{Version: ProtocolVersion, Standing: info.Standing && !m.draining, Via: info.Via}
	if info.VTEPMAC != "" && info.VTEPUnderlay.IsValid() {
		rec.VTEP = info.VTEPMAC + "@" + info.VTEPUnderlay.String()
	}
	if b, err := json.Marshal(rec); err == nil {
		l.Annotations[AnnotationNode] = string(b)
	}
	if info.UID != "" {
		// The heartbeat goes with its Node: the garbage collector
		// deletes it when the Node is deleted.
		l.OwnerReferences = []metav1.OwnerReference{{APIVersion: "v1", Kind: "Node", Name: m.cfg.Identity, UID: info.UID}}
	}
	holder := m.cfg.Identity
	seconds := int32((max(m.cfg.Timing.LeaseDuration, m.hbDuration) + time.Second - 1) / time.Second)
	if l.Spec.HolderIdentity == nil || *l.Spec.HolderIdentity != holder {
		l.Spec.AcquireTime = &metav1.MicroTime{Time: renew}
	}
	l.Spec.HolderIdentity = &holder
	l.Spec.LeaseDurationSeconds = &seconds
	l.Spec.RenewTime = &metav1.MicroTime{Time: renew}
	return l
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
		// addresses over; what this node held must be written again.
		m.epoch++
	}
	m.renewedAt = start
	m.hb = out
	if out != nil && out.Spec.LeaseDurationSeconds != nil {
		m.hbWritten = time.Duration(*out.Spec.LeaseDurationSeconds) * time.Second
	}
	m.mu.Unlock()
	if first || wasOverdue {
		m.cfg.Poke()
	}
}

// SetHeartbeatDuration sets the leaseDurationSeconds the next heartbeat
// renewals carry: never less than Timing.LeaseDuration. Other nodes take
// this node's addresses over only that long after the last renewal they
// saw (they read the heartbeat from the API server once more before they
// do), so a node whose addresses need a longer kernel lifetime (thousands
// of IPv6 addresses cost more to renew) announces it here first.
func (m *Manager) SetHeartbeatDuration(d time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.hbDuration = d
}

// HeartbeatDuration is the leaseDurationSeconds of the last heartbeat
// renewal that was written (0 before the first).
func (m *Manager) HeartbeatDuration() time.Duration {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.hbWritten
}

// RenewedAt is the RenewTime of the last successful heartbeat renewal.
func (m *Manager) RenewedAt() time.Time {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.renewedAt
}

// Drain marks this node as leaving: its heartbeat says so at once, so that
// other nodes take the addresses it releases without waiting for it, and
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

// parseNodeRecord reads a peer's published state; a heartbeat without it is
// the heartbeat release's (version 0, standing).
func parseNodeRecord(l *coordinationv1.Lease) nodeRecord {
	rec := nodeRecord{Standing: true}
	raw, ok := l.Annotations[AnnotationNode]
	if !ok {
		return rec
	}
	var r nodeRecord
	if err := json.Unmarshal([]byte(raw), &r); err != nil {
		// Unreadable: treat it as a current node that stands, so that
		// its holdings are judged by its heartbeat.
		return nodeRecord{Version: ProtocolVersion, Standing: true}
	}
	return r
}
