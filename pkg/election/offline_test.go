package election

import (
	"net/netip"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/egressvip/egressvip/pkg/model"
)

var (
	offNow    = time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	offTiming = Timing{LeaseDuration: 5 * time.Second, RenewDeadline: 3 * time.Second, RetryPeriod: time.Second}
)

// beat is node's heartbeat renewed ago before offNow, published by a
// current daemon unless changed.
func beat(node string, ago time.Duration, change ...func(*coordinationv1.Lease)) *coordinationv1.Lease {
	holder, secs := node, int32(5)
	l := &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Namespace: daemonNS, Name: HeartbeatName(node),
			Labels: map[string]string{LabelManagedBy: ManagedBy, LabelRole: RoleHeartbeat},
			Annotations: map[string]string{
				AnnotationNode:      `{"version":2,"standing":true,"via":["198.51.100.20"]}`,
				AnnotationAddresses: "198.51.100.120",
			}},
		Spec: coordinationv1.LeaseSpec{HolderIdentity: &holder, LeaseDurationSeconds: &secs,
			RenewTime: &metav1.MicroTime{Time: offNow.Add(-ago)}},
	}
	for _, c := range change {
		c(l)
	}
	return l
}

// owned is an ownership Lease held by holder.
func owned(ns, name, role, holder string, change ...func(*coordinationv1.Lease)) *coordinationv1.Lease {
	l := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name,
		Labels: map[string]string{LabelManagedBy: ManagedBy, LabelRole: role}}}
	if holder != "" {
		l.Spec.HolderIdentity = &holder
	}
	for _, c := range change {
		c(l)
	}
	return l
}

func renewed(ago time.Duration, secs int32) func(*coordinationv1.Lease) {
	return func(l *coordinationv1.Lease) {
		l.Spec.RenewTime = &metav1.MicroTime{Time: offNow.Add(-ago)}
		l.Spec.LeaseDurationSeconds = &secs
	}
}

func annotate(k, v string) func(*coordinationv1.Lease) {
	return func(l *coordinationv1.Lease) { l.Annotations = map[string]string{k: v} }
}

func TestOfflineView(t *testing.T) {
	addrKey := types.NamespacedName{Namespace: daemonNS, Name: AddressLeaseName(netip.MustParseAddr("203.0.113.10"))}
	svcKey := ServiceLeaseKey(types.NamespacedName{Namespace: "default", Name: "web"})
	address := func(holder string) *coordinationv1.Lease {
		return owned(daemonNS, addrKey.Name, RoleAddress, holder, annotate(AnnotationClaimedBy, "default"))
	}
	legacy := func(holder string, ago time.Duration) *coordinationv1.Lease {
		l := owned("default", svcKey.Name, "", holder, renewed(ago, 15))
		l.Labels = nil
		return l
	}
	tests := []struct {
		name       string
		self       string
		leases     []*coordinationv1.Lease
		nodeGone   bool
		wantPeer   map[string]model.Peer
		wantLease  map[types.NamespacedName]model.Lease
		wantSelf   [3]bool // Established, Overdue, Draining
		checkPeers bool
	}{
		{
			name:      "a live current peer holds the address",
			self:      "node-a",
			leases:    []*coordinationv1.Lease{beat("node-a", 500*time.Millisecond), beat("node-b", time.Second), address("node-b")},
			wantPeer:  map[string]model.Peer{"node-b": {Version: 2, Live: true, Candidate: true}},
			wantLease: map[types.NamespacedName]model.Lease{addrKey: {Kind: model.AddressLease, Holder: "node-b", Writer: model.Current, Valid: true, ClaimedBy: "default"}},
			wantSelf:  [3]bool{true, false, false},
		},
		{
			name:      "an expired peer's holding is not valid",
			self:      "node-a",
			leases:    []*coordinationv1.Lease{beat("node-a", 0), beat("node-b", 5*time.Second), address("node-b")},
			wantPeer:  map[string]model.Peer{"node-b": {Version: 2}},
			wantLease: map[types.NamespacedName]model.Lease{addrKey: {Kind: model.AddressLease, Holder: "node-b", Writer: model.Current, ClaimedBy: "default"}},
			wantSelf:  [3]bool{true, false, false},
		},
		{
			name:     "a heartbeat counts for its own longer duration",
			self:     "node-a",
			leases:   []*coordinationv1.Lease{beat("node-b", 7*time.Second, renewed(7*time.Second, 10))},
			wantPeer: map[string]model.Peer{"node-b": {Version: 2, Live: true, Candidate: true}},
			wantSelf: [3]bool{false, true, false},
		},
		{
			name: "draining and not standing peers are live but no candidates",
			self: "node-a",
			leases: []*coordinationv1.Lease{
				beat("node-b", 0, func(l *coordinationv1.Lease) { l.Annotations[AnnotationDraining] = "true" }),
				beat("node-c", 0, func(l *coordinationv1.Lease) { l.Annotations[AnnotationNode] = `{"version":2,"standing":false}` }),
			},
			wantPeer: map[string]model.Peer{"node-b": {Version: 2, Live: true}, "node-c": {Version: 2, Live: true}},
			wantSelf: [3]bool{false, true, false},
		},
		{
			name: "a heartbeat without record is the heartbeat release's",
			self: "node-a",
			leases: []*coordinationv1.Lease{
				beat("node-b", 0, func(l *coordinationv1.Lease) { delete(l.Annotations, AnnotationNode) }),
				owned("default", svcKey.Name, RoleService, "node-b"),
			},
			wantPeer:  map[string]model.Peer{"node-b": {Version: 0, Live: true, Candidate: true}},
			wantLease: map[types.NamespacedName]model.Lease{svcKey: {Kind: model.ServiceLease, Holder: "node-b", Writer: model.Heartbeat, Valid: true}},
			wantSelf:  [3]bool{false, true, false},
		},
		{
			name:      "a legacy holding renewed within its duration is valid",
			self:      "node-a",
			leases:    []*coordinationv1.Lease{legacy("node-z", 10*time.Second)},
			wantLease: map[types.NamespacedName]model.Lease{svcKey: {Kind: model.ServiceLease, Holder: "node-z", Writer: model.Legacy, Valid: true}},
			wantSelf:  [3]bool{false, true, false},
		},
		{
			name:      "a legacy holding not renewed for its duration is not",
			self:      "node-a",
			leases:    []*coordinationv1.Lease{legacy("node-z", 16*time.Second)},
			wantLease: map[types.NamespacedName]model.Lease{svcKey: {Kind: model.ServiceLease, Holder: "node-z", Writer: model.Legacy}},
			wantSelf:  [3]bool{false, true, false},
		},
		{
			name:      "a legacy holder whose Node is gone holds nothing",
			self:      "node-a",
			leases:    []*coordinationv1.Lease{legacy("node-z", time.Second)},
			nodeGone:  true,
			wantLease: map[types.NamespacedName]model.Lease{svcKey: {Kind: model.ServiceLease, Holder: "node-z", Writer: model.Legacy}},
			wantSelf:  [3]bool{false, true, false},
		},
		{
			name:      "self holds soundly while its heartbeat is fresh",
			self:      "node-a",
			leases:    []*coordinationv1.Lease{beat("node-a", 2*time.Second), address("node-a")},
			wantLease: map[types.NamespacedName]model.Lease{addrKey: {Kind: model.AddressLease, Holder: "node-a", Writer: model.Current, Valid: true, Current: true, ClaimedBy: "default"}},
			wantSelf:  [3]bool{true, false, false},
		},
		{
			name:      "self past its renew deadline is overdue and its holding not valid",
			self:      "node-a",
			leases:    []*coordinationv1.Lease{beat("node-a", 3*time.Second), address("node-a")},
			wantLease: map[types.NamespacedName]model.Lease{addrKey: {Kind: model.AddressLease, Holder: "node-a", Writer: model.Current, ClaimedBy: "default"}},
			wantSelf:  [3]bool{true, true, false},
		},
		{
			name:   "a bystander sees every node as a peer",
			self:   "(cluster)",
			leases: []*coordinationv1.Lease{beat("node-a", 0), beat("node-b", 0), address("")},
			wantPeer: map[string]model.Peer{"node-a": {Version: 2, Live: true, Candidate: true},
				"node-b": {Version: 2, Live: true, Candidate: true}},
			wantLease: map[types.NamespacedName]model.Lease{addrKey: {Kind: model.AddressLease, ClaimedBy: "default"}},
			wantSelf:  [3]bool{false, true, false},
		},
		{
			name: "Leases that are not egressvip's are ignored",
			self: "node-a",
			leases: []*coordinationv1.Lease{owned("kube-system", "kube-scheduler", "", "master", func(l *coordinationv1.Lease) { l.Labels = nil }),
				owned(daemonNS, "other", "something", "node-b")},
			wantSelf: [3]bool{false, true, false},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o := Offline{Self: tc.self, Now: offNow, Timing: offTiming, Leases: tc.leases}
			if tc.nodeGone {
				o.NodeExists = func(string) (bool, bool) { return false, true }
			}
			v := OfflineView(o)
			if got := [3]bool{v.Established, v.Overdue, v.Draining}; got != tc.wantSelf {
				t.Errorf("established, overdue, draining = %v, want %v", got, tc.wantSelf)
			}
			if len(v.Peers) != len(tc.wantPeer) {
				t.Errorf("peers %v, want %v", v.Peers, tc.wantPeer)
			}
			for n, want := range tc.wantPeer {
				got := v.Peers[n]
				if got.Version != want.Version || got.Live != want.Live || got.Candidate != want.Candidate {
					t.Errorf("peer %s = %+v, want %+v", n, got, want)
				}
			}
			if len(v.Leases) != len(tc.wantLease) {
				t.Errorf("leases %v, want %v", v.Leases, tc.wantLease)
			}
			for k, want := range tc.wantLease {
				got := v.Leases[k]
				if got.Kind != want.Kind || got.Holder != want.Holder || got.Writer != want.Writer || got.Valid != want.Valid ||
					got.Current != want.Current || got.ClaimedBy != want.ClaimedBy {
					t.Errorf("lease %s = %+v, want %+v", k, got, want)
				}
			}
		})
	}
}

func TestOfflineHeartbeatsParsesThePublishedRecord(t *testing.T) {
	hs := OfflineHeartbeats(Offline{Now: offNow, Timing: offTiming, Leases: []*coordinationv1.Lease{
		beat("node-b", 1500*time.Millisecond, func(l *coordinationv1.Lease) {
			l.Annotations[AnnotationNode] = `{"version":2,"standing":true,"via":["198.51.100.12"],"vtep":"02:00:00:00:00:01@192.0.2.2"}`
		}),
		beat("node-a", 0),
	}})
	if len(hs) != 2 || hs[0].Node != "node-a" || hs[1].Node != "node-b" {
		t.Fatalf("heartbeats %+v, want node-a then node-b", hs)
	}
	h := hs[1]
	if !h.Live || h.Version != 2 || !h.Standing || h.VTEP != "02:00:00:00:00:01@192.0.2.2" || h.Duration != 5*time.Second ||
		len(h.Via) != 1 || h.Via[0] != netip.MustParseAddr("198.51.100.12") ||
		len(h.Addresses) != 1 || h.Addresses[0] != netip.MustParseAddr("198.51.100.120") {
		t.Errorf("heartbeat %+v", h)
	}
	if got := h.Age(offNow); got != 1500*time.Millisecond {
		t.Errorf("age %s, want 1.5s", got)
	}
}
