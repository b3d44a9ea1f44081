package election

import (
	"net/netip"
	"slices"
	"strings"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/egressvip/egressvip/pkg/model"
)

// Offline is what OfflineView and OfflineHeartbeats judge: Leases listed
// from the API server at one moment, without a running Manager's history.
type Offline struct {
	// Self is the node whose view is built. A name that is no node's
	// (such as one with a slash) gives the view of a bystander: every node
	// is a peer and Self is never a candidate.
	Self string
	// Now is the moment of the listing.
	Now time.Time
	// Timing is the daemons' lease timing: a heartbeat counts for at
	// least LeaseDuration, Self's renewal is overdue after RenewDeadline.
	Timing Timing
	// Leases are every heartbeat, address Lease and global Lease of the
	// daemon's namespace and the Service Leases of interest. Other Leases
	// are ignored.
	Leases []*coordinationv1.Lease
	// NodeExists says whether a Node object of that name exists (known is
	// false while that cannot be told); nil: never known. The holder of a
	// Lease without heartbeat whose Node is gone holds nothing.
	NodeExists func(name string) (exists, known bool)
}

// Heartbeat is what one node's heartbeat Lease says, judged at Offline.Now.
type Heartbeat struct {
	Node string
	// Holder is the Lease's holderIdentity ("" when released).
	Holder string
	// Renewed is its renewTime (zero when unset); Duration how long it
	// counts after that: its leaseDurationSeconds, at least
	// Timing.LeaseDuration, as a running daemon counts it.
	Renewed  time.Time
	Duration time.Duration
	// Live is true while Now is before Renewed + Duration.
	Live bool
	// Version, Standing, Via and VTEP are its published record
	// (AnnotationNode); Draining its AnnotationDraining; Addresses its
	// AnnotationAddresses.
	Version   int
	Standing  bool
	Draining  bool
	Via       []netip.Addr
	VTEP      string
	Addresses []netip.Addr
}

// Age is how long ago the heartbeat was renewed, as Now sees it.
func (h Heartbeat) Age(now time.Time) time.Duration {
	if h.Renewed.IsZero() {
		return 0
	}
	return now.Sub(h.Renewed)
}

// OfflineHeartbeats parses and judges every heartbeat of o.Leases, sorted
// by node. Liveness compares clocks: see OfflineView.
func OfflineHeartbeats(o Offline) []Heartbeat {
	var out []Heartbeat
	for _, l := range o.Leases {
		if l == nil || l.Labels[LabelRole] != RoleHeartbeat {
			continue
		}
		node, ok := strings.CutPrefix(l.Name, HeartbeatPrefix)
		if !ok || node == "" {
			continue
		}
		h := Heartbeat{Node: node, Holder: holderOf(l), Duration: o.Timing.LeaseDuration}
		if l.Spec.RenewTime != nil {
			h.Renewed = l.Spec.RenewTime.Time
		}
		if l.Spec.LeaseDurationSeconds != nil && *l.Spec.LeaseDurationSeconds > 0 {
			h.Duration = max(h.Duration, time.Duration(*l.Spec.LeaseDurationSeconds)*time.Second)
		}
		h.Live = h.Holder != "" && !h.Renewed.IsZero() && o.Now.Before(h.Renewed.Add(h.Duration))
		rec := parseNodeRecord(l)
		h.Version, h.Standing, h.Via, h.VTEP = rec.Version, rec.Standing, rec.Via, rec.VTEP
		h.Draining = l.Annotations[AnnotationDraining] == "true"
		for _, f := range strings.Split(l.Annotations[AnnotationAddresses], ",") {
			if a, err := netip.ParseAddr(strings.TrimSpace(f)); err == nil {
				h.Addresses = append(h.Addresses, a.Unmap())
			}
		}
		out = append(out, h)
	}
	slices.SortFunc(out, func(a, b Heartbeat) int { return strings.Compare(a.Node, b.Node) })
	return out
}

// OfflineView builds the election view of node o.Self at o.Now from listed
// Leases, for `egressvip explain`, which has no watch history.
//
// Unlike a running daemon, it compares clocks: the daemon counts a
// heartbeat live for a lease duration after it saw the heartbeat renewed
// (client-go's rule, which never compares the clocks of two nodes), while
// OfflineView counts it live while o.Now is before the renewTime the node
// wrote plus its lease duration. A clock skew between the node that wrote a
// heartbeat and the one that reads it shifts every verdict by the skew.
// Legacy holdings (Leases without heartbeat) are judged the same way, by
// their renewTime plus leaseDurationSeconds.
//
// Self's own heartbeat makes it Established while it is live and held by
// Self, and Overdue once its renewal is a renew deadline old (or missing).
// A running daemon also knows in which heartbeat epoch it wrote each
// holding (model.Lease.Current); offline that cannot be told, so a valid
// holding of Self counts as current. Nothing is Pending or Deleted.
func OfflineView(o Offline) model.ElectionView {
	v := model.ElectionView{Self: o.Self, Now: o.Now, Peers: map[string]model.Peer{}, Leases: map[types.NamespacedName]model.Lease{}}
	v.Overdue = true
	beats := map[string]Heartbeat{}
	for _, h := range OfflineHeartbeats(o) {
		beats[h.Node] = h
		if h.Node == o.Self {
			v.Established = h.Live && h.Holder == o.Self
			v.Overdue = !v.Established || o.Now.Sub(h.Renewed) >= o.Timing.RenewDeadline
			v.Draining = h.Draining
			continue
		}
		p := model.Peer{Version: h.Version, Live: h.Live, Candidate: h.Live && !h.Draining && h.Standing,
			Via: h.Via, Addresses: h.Addresses}
		if mac, under, ok := strings.Cut(h.VTEP, "@"); ok {
			if a, err := netip.ParseAddr(under); err == nil {
				p.VTEPMAC, p.VTEPUnderlay = mac, a
			}
		}
		v.Peers[h.Node] = p
	}
	for _, l := range o.Leases {
		if l == nil || !offlineOwnership(l) {
			continue
		}
		key := types.NamespacedName{Namespace: l.Namespace, Name: l.Name}
		out := model.Lease{Kind: kindOf(l), Holder: holderOf(l), ClaimedBy: l.Annotations[AnnotationClaimedBy]}
		for _, ref := range l.OwnerReferences {
			if ref.Kind == "Service" {
				out.Owners = append(out.Owners, ref.UID)
			}
		}
		judgeOffline(o, v, beats, l, &out)
		v.Leases[key] = out
	}
	return v
}

// offlineOwnership says whether l is an ownership Lease: labelled as one,
// or an unlabelled Service Lease of the release before heartbeats.
func offlineOwnership(l *coordinationv1.Lease) bool {
	switch l.Labels[LabelRole] {
	case RoleAddress, RoleGlobal, RoleService:
		return true
	case "":
		return strings.HasPrefix(l.Name, LeasePrefix)
	}
	return false
}

// judgeOffline sets a Lease's Writer, Valid and Current as Manager.judge
// does, with heartbeats and Legacy holdings judged by their renewTime.
func judgeOffline(o Offline, v model.ElectionView, beats map[string]Heartbeat, l *coordinationv1.Lease, out *model.Lease) {
	switch {
	case out.Holder == "":
		return
	case out.Holder == o.Self:
		out.Writer = model.Current
		out.Valid = v.Established && !v.Overdue
		out.Current = out.Valid
		return
	}
	h, ok := beats[out.Holder]
	switch {
	case ok && h.Version >= ProtocolVersion:
		out.Writer = model.Current
		out.Valid = h.Live
	case ok:
		out.Writer = model.Heartbeat
		out.Valid = h.Live
	default:
		out.Writer = model.Legacy
		if o.NodeExists != nil {
			if exists, known := o.NodeExists(out.Holder); known && !exists {
				return
			}
		}
		if l.Spec.RenewTime == nil {
			return
		}
		d := o.Timing.LeaseDuration
		if l.Spec.LeaseDurationSeconds != nil && *l.Spec.LeaseDurationSeconds > 0 {
			d = max(d, time.Duration(*l.Spec.LeaseDurationSeconds)*time.Second)
		}
		out.Valid = o.Now.Before(l.Spec.RenewTime.Add(d))
	}
}
