package election

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	coordinationv1 "k8s.io/api/coordination/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/egressvip/egressvip/pkg/kube"
	"github.com/egressvip/egressvip/pkg/kube/kubefake"
	"github.com/egressvip/egressvip/pkg/model"
)

var fast = Timing{LeaseDuration: 1200 * time.Millisecond, RenewDeadline: 800 * time.Millisecond, RetryPeriod: 100 * time.Millisecond}

const daemonNS = "egressvip"

func quietLog() *logrus.Entry {
	l := logrus.New()
	l.SetOutput(io.Discard)
	return logrus.NewEntry(l)
}

// eventually polls cond for at most 30 s; it is a bound, not a timing assertion.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}

// apiServer is a fake clientset whose Leases behave like the API
// server's: every write gets a new resourceVersion, and an update that
// carries a stale one fails with a conflict. failHeartbeats makes the
// heartbeat writes fail (an API server this node cannot reach).
type apiServer struct {
	*fake.Clientset
	mu             sync.Mutex
	rv             int
	failHeartbeats atomic.Bool
	writes         atomic.Int64
}

func newAPIServer() *apiServer {
	s := &apiServer{Clientset: fake.NewClientset()}
	write := func(a k8stesting.Action) (bool, runtime.Object, error) {
		var l *coordinationv1.Lease
		switch a := a.(type) {
		case k8stesting.CreateAction:
			l = a.GetObject().(*coordinationv1.Lease).DeepCopy()
		case k8stesting.UpdateAction:
			l = a.GetObject().(*coordinationv1.Lease).DeepCopy()
		default:
			return false, nil, nil
		}
		if l.Labels[LabelRole] == RoleHeartbeat && s.failHeartbeats.Load() {
			return true, nil, errors.New("connection refused")
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		tracker := s.Tracker()
		gvr := coordinationv1.SchemeGroupVersion.WithResource("leases")
		cur, err := tracker.Get(gvr, a.GetNamespace(), l.Name)
		switch {
		case a.GetVerb() == "create" && err == nil:
			return true, nil, apierrors.NewAlreadyExists(gvr.GroupResource(), l.Name)
		case a.GetVerb() == "update" && err != nil:
			return true, nil, err
		case a.GetVerb() == "update" && cur.(*coordinationv1.Lease).ResourceVersion != l.ResourceVersion:
			return true, nil, apierrors.NewConflict(gvr.GroupResource(), l.Name, errors.New("stale resourceVersion"))
		}
		s.rv++
		l.ResourceVersion = strconv.Itoa(s.rv)
		s.writes.Add(1)
		if a.GetVerb() == "create" {
			err = tracker.Create(gvr, l, a.GetNamespace())
		} else {
			err = tracker.Update(gvr, l, a.GetNamespace())
		}
		return true, l, err
	}
	s.PrependReactor("create", "leases", write)
	s.PrependReactor("update", "leases", write)
	return s
}

func (s *apiServer) lease(t *testing.T, key types.NamespacedName) *coordinationv1.Lease {
	t.Helper()
	l, err := s.CoordinationV1().Leases(key.Namespace).Get(context.Background(), key.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func (s *apiServer) remove(t *testing.T, key types.NamespacedName) {
	t.Helper()
	if err := s.CoordinationV1().Leases(key.Namespace).Delete(context.Background(), key.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
}

type options struct {
	node       func() NodeInfo
	nodeExists func(string) (bool, bool)
}

// start runs a Manager for node until the test ends or stop is called.
func start(t *testing.T, api *apiServer, node string, opts ...options) (*Manager, context.CancelFunc) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	cfg := Config{
		Identity: node, Namespace: daemonNS, Timing: fast,
		HeartbeatClient: kubefake.Wrap(api), Client: kubefake.Wrap(api), Log: quietLog(),
	}
	for _, o := range opts {
		cfg.Node, cfg.NodeExists = o.node, o.nodeExists
	}
	m := NewManager(cfg)
	m.Run(ctx)
	eventually(t, node+" synced and established", func() bool { return m.HasSynced() && m.View().Established })
	return m, cancel
}

// current counts the holdings m's view shows as current.
func current(m *Manager) int {
	n := 0
	for _, l := range m.View().Leases {
		if l.Current {
			n++
		}
	}
	return n
}

var (
	web     = types.NamespacedName{Namespace: "default", Name: LeaseName("web")}
	webAddr = netip.MustParseAddr("203.0.113.10")
	addrKey = types.NamespacedName{Namespace: daemonNS, Name: AddressLeaseName(webAddr)}
)

func svcClaim(key types.NamespacedName) model.Claim {
	return model.Claim{Lease: key, Kind: model.ServiceLease, Owners: []model.Owner{{Name: "web", UID: "uid-web"}},
		AddressLeases: []string{addrKey.Name}}
}

func addrClaim() model.Claim {
	return model.Claim{Lease: addrKey, Kind: model.AddressLease, Address: webAddr, ClaimedBy: "default"}
}

func TestTimingValidate(t *testing.T) {
	for _, tc := range []struct {
		name    string
		timing  Timing
		wantErr bool
	}{
		{name: "defaults", timing: Timing{5 * time.Second, 3 * time.Second, time.Second}},
		{name: "duration not above deadline", timing: Timing{3 * time.Second, 3 * time.Second, time.Second}, wantErr: true},
		{name: "deadline not above 1.2 retry", timing: Timing{5 * time.Second, 1200 * time.Millisecond, time.Second}, wantErr: true},
		{name: "zero retry", timing: Timing{5 * time.Second, 3 * time.Second, 0}, wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.timing.Validate(); (err != nil) != tc.wantErr {
				t.Fatalf("Validate() = %v, wantErr %v", err, tc.wantErr)
			}
		})
	}
}

// The kernel forgets an address before any other node may take it: the
// lifetime is shorter than the lease duration by the retry period (the
// last refresh may follow the last renewal) and the kernel's whole-second
// rounding.
func TestAddressLifetime(t *testing.T) {
	for _, tc := range []struct {
		timing Timing
		want   time.Duration
	}{
		{Timing{5 * time.Second, 3 * time.Second, time.Second}, 2 * time.Second},
		{Timing{15 * time.Second, 10 * time.Second, 2 * time.Second}, 11 * time.Second},
		{Timing{3 * time.Second, 2 * time.Second, time.Second}, time.Second},
	} {
		got := tc.timing.AddressLifetime()
		if got != tc.want {
			t.Errorf("%+v: %s, want %s", tc.timing, got, tc.want)
		}
		if got+time.Second >= tc.timing.LeaseDuration-tc.timing.RetryPeriod && tc.timing.LeaseDuration > 3*time.Second {
			t.Errorf("%+v: lifetime %s plus a second of rounding reaches the takeover", tc.timing, got)
		}
	}
}

func TestAddressLeaseNames(t *testing.T) {
	for _, s := range []string{"203.0.113.10", "2001:db8:1::10", "::1"} {
		a := netip.MustParseAddr(s)
		name := AddressLeaseName(a)
		if got, ok := AddressOfLease(name); !ok || got != a {
			t.Errorf("%s: name %q parses back to %v %v", s, name, got, ok)
		}
		rest := strings.TrimPrefix(name, AddressPrefix)
		if strings.ContainsAny(name, ":") || strings.HasPrefix(rest, "-") || strings.HasSuffix(rest, "-") {
			t.Errorf("%s: %q is not a DNS subdomain", s, name)
		}
	}
}

// Each node renews one heartbeat publishing its state; the others see it
// live, and see it expire a lease duration after it stops.
func TestHeartbeatsAndLiveness(t *testing.T) {
	api := newAPIServer()
	a, _ := start(t, api, "node-a")
	_, stopB := start(t, api, "node-b", options{node: func() NodeInfo {
		return NodeInfo{Standing: true, Via: []netip.Addr{netip.MustParseAddr("198.51.100.12")}, UID: "uid-node-b",
			VTEPMAC: "02:00:00:00:00:02", VTEPUnderlay: netip.MustParseAddr("198.51.100.12"),
			Addresses: []netip.Addr{netip.MustParseAddr("203.0.113.12"), netip.MustParseAddr("fe80::1")}}
	}})
	eventually(t, "node-a sees node-b", func() bool { return a.View().Peers["node-b"].Live })
	p := a.View().Peers["node-b"]
	if p.Version != ProtocolVersion || !p.Candidate || len(p.Via) != 1 || p.VTEPMAC != "02:00:00:00:00:02" || !p.VTEPUnderlay.IsValid() {
		t.Fatalf("peer %+v", p)
	}
	if !a.PeerAddresses()[netip.MustParseAddr("203.0.113.12")] || a.PeerAddresses()[netip.MustParseAddr("fe80::1")] {
		t.Fatalf("peer addresses %v", a.PeerAddresses())
	}
	hb := api.lease(t, types.NamespacedName{Namespace: daemonNS, Name: HeartbeatName("node-b")})
	if len(hb.OwnerReferences) != 1 || hb.OwnerReferences[0].Kind != "Node" || hb.OwnerReferences[0].UID != "uid-node-b" {
		t.Fatalf("the heartbeat does not go with its Node: %+v", hb.OwnerReferences)
	}
	if v := a.View(); !v.Live("node-a") || !v.Candidate("node-a") || v.Overdue {
		t.Fatalf("node-a's own view: %+v", v)
	}
	stopB()
	stopped := time.Now()
	eventually(t, "node-b expires in node-a's view", func() bool { return !a.View().Peers["node-b"].Live })
	if waited := time.Since(stopped); waited < fast.LeaseDuration-fast.RetryPeriod {
		t.Fatalf("node-b expired %s after its last renewal, before the lease duration %s", waited, fast.LeaseDuration)
	}
}

// A node that does not stand (its serviceInterface is down) is live but no
// candidate.
func TestNotStandingIsNoCandidate(t *testing.T) {
	api := newAPIServer()
	a, _ := start(t, api, "node-a")
	start(t, api, "node-b", options{node: func() NodeInfo { return NodeInfo{Standing: false} }})
	eventually(t, "node-a sees node-b", func() bool { return a.View().Peers["node-b"].Live })
	if a.View().Peers["node-b"].Candidate {
		t.Fatal("a node whose interface is down is a candidate")
	}
}

// Of two nodes acquiring one Lease at once, exactly one holds it; both
// views then agree.
func TestAcquireRaceHasOneWinner(t *testing.T) {
	for _, exists := range []bool{false, true} {
		t.Run(fmt.Sprintf("lease exists %v", exists), func(t *testing.T) {
			api := newAPIServer()
			if exists {
				released := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: daemonNS, Name: addrKey.Name,
					Labels: map[string]string{LabelRole: RoleAddress, LabelManagedBy: ManagedBy}}}
				if _, err := api.CoordinationV1().Leases(daemonNS).Create(context.Background(), released, metav1.CreateOptions{}); err != nil {
					t.Fatal(err)
				}
			}
			a, _ := start(t, api, "node-a")
			b, _ := start(t, api, "node-b")
			eventually(t, "both synced", func() bool { _, ok := b.View().Leases[addrKey]; return !exists || ok })
			a.Acquire(addrClaim())
			b.Acquire(addrClaim())
			eventually(t, "both views agree on one holder", func() bool {
				la, lb := a.View().Leases[addrKey], b.View().Leases[addrKey]
				return la.Holder != "" && la.Holder == lb.Holder && !la.Pending && !lb.Pending
			})
			l := api.lease(t, addrKey)
			winner := holderOf(l)
			for _, m := range []*Manager{a, b} {
				lv := m.View().Leases[addrKey]
				if lv.Current != (m.Identity() == winner) || !lv.Valid || lv.Kind != model.AddressLease || lv.ClaimedBy != "default" {
					t.Fatalf("%s: %+v with holder %s", m.Identity(), lv, winner)
				}
			}
			if l.Annotations[AnnotationAddress] != webAddr.String() || l.Spec.LeaseDurationSeconds != nil {
				t.Fatalf("address Lease %+v", l)
			}
		})
	}
}

// A holder whose heartbeat is live keeps its Lease; once it expired, the
// Lease is taken over, and the write carries the owner, the labels and the
// duration that keeps earlier releases off it.
func TestTakeoverOnlyAfterTheHeartbeatExpired(t *testing.T) {
	api := newAPIServer()
	a, _ := start(t, api, "node-a")
	b, stopB := start(t, api, "node-b")
	b.Acquire(svcClaim(web))
	eventually(t, "node-a sees node-b hold it", func() bool { return a.View().Leases[web].Holder == "node-b" })

	a.Acquire(svcClaim(web))
	eventually(t, "the attempt ends", func() bool { return !a.View().Leases[web].Pending })
	if h := holderOf(api.lease(t, web)); h != "node-b" {
		t.Fatalf("took the Lease from a live holder: now %s", h)
	}

	stopB()
	eventually(t, "node-b expires", func() bool { return !a.View().Peers["node-b"].Live })
	eventually(t, "node-a takes over", func() bool {
		a.Acquire(svcClaim(web))
		return a.View().Leases[web].Holder == "node-a" && a.View().Leases[web].Current
	})
	l := api.lease(t, web)
	if l.Labels[LabelRole] != RoleService || len(l.OwnerReferences) != 1 || l.OwnerReferences[0].UID != "uid-web" ||
		l.Annotations[AnnotationAddressLeases] != addrKey.Name {
		t.Fatalf("lease metadata %+v", l.ObjectMeta)
	}
	if l.Spec.LeaseTransitions == nil || *l.Spec.LeaseTransitions != 1 || l.Spec.LeaseDurationSeconds == nil || *l.Spec.LeaseDurationSeconds != LegacyHoldSeconds {
		t.Fatalf("lease spec %+v", l.Spec)
	}
}

// Ownership Leases are written on acquisition and release only: steady
// state costs the heartbeat alone, whatever the number of addresses.
func TestSteadyStateWritesOnlyHeartbeats(t *testing.T) {
	api := newAPIServer()
	a, _ := start(t, api, "node-a")
	for i := range 50 {
		a.Acquire(model.Claim{Lease: types.NamespacedName{Namespace: daemonNS, Name: AddressLeaseName(netip.AddrFrom4([4]byte{203, 0, 113, byte(i)}))},
			Kind: model.AddressLease})
	}
	eventually(t, "50 held", func() bool { return current(a) == 50 })
	before := api.writes.Load()
	time.Sleep(10 * fast.RetryPeriod)
	if w := api.writes.Load() - before; w > 12 {
		t.Fatalf("%d writes in 10 retry periods with 50 addresses held, want about 10 (the heartbeat)", w)
	}
}

// Many acquisitions at once queue behind a bounded number of writers.
// slowCreates delays every Lease create by 20 ms outside the fake (whose
// reactors run one at a time) and records how many were in flight at most.
type slowCreates struct {
	kube.Interface
	inFlight, most atomic.Int64
}

// IsWatchListSemanticsUnSupported passes the fake's answer on to the
// informers.
func (c *slowCreates) IsWatchListSemanticsUnSupported() bool {
	w, ok := c.Interface.(interface{ IsWatchListSemanticsUnSupported() bool })
	return ok && w.IsWatchListSemanticsUnSupported()
}

func (c *slowCreates) Leases(ns string) kube.LeaseClient {
	return slowLeaseClient{c.Interface.Leases(ns), c}
}

type slowLeaseClient struct {
	kube.LeaseClient
	c *slowCreates
}

func (l slowLeaseClient) Create(ctx context.Context, lease *coordinationv1.Lease, opts metav1.CreateOptions) (*coordinationv1.Lease, error) {
	n := l.c.inFlight.Add(1)
	for {
		m := l.c.most.Load()
		if n <= m || l.c.most.CompareAndSwap(m, n) {
			break
		}
	}
	time.Sleep(20 * time.Millisecond)
	l.c.inFlight.Add(-1)
	return l.LeaseClient.Create(ctx, lease, opts)
}

// Acquisitions run in parallel, at most Workers at once: a node taking
// thousands of addresses over writes at the rate the API server answers.
func TestAcquisitionsAreBounded(t *testing.T) {
	api := newAPIServer()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	slow := &slowCreates{Interface: kubefake.Wrap(api)}
	a := NewManager(Config{Identity: "node-a", Namespace: daemonNS, Timing: fast,
		HeartbeatClient: kubefake.Wrap(api), Client: slow, Log: quietLog()})
	a.Run(ctx)
	eventually(t, "node-a established", func() bool { return a.HasSynced() && a.View().Established })
	claims := make([]model.Claim, 200)
	for i := range claims {
		claims[i] = model.Claim{Lease: types.NamespacedName{Namespace: "default", Name: LeaseName(fmt.Sprintf("s%d", i))}, Kind: model.ServiceLease}
		a.Acquire(claims[i])
	}
	// Like the sync loop, ask again for what is not held in the current
	// epoch: on a busy machine a write may time out, or the heartbeat of
	// the fast test timing lapse (no-op while a write is pending).
	eventually(t, "200 held", func() bool {
		v := a.View()
		for _, c := range claims {
			if !v.Leases[c.Lease].Current {
				a.Acquire(c)
			}
		}
		return current(a) == 200
	})
	if m := slow.most.Load(); m > DefaultWorkers || m < DefaultWorkers/2 {
		t.Fatalf("%d writes ran at once, want up to the %d workers and most of them", m, DefaultWorkers)
	}
}

// Failing renewals make the node overdue within the renew deadline;
// renewals that come back after a lease duration start a new epoch, in
// which what it held must be written again before it counts.
func TestOverdueAndEpoch(t *testing.T) {
	api := newAPIServer()
	a, _ := start(t, api, "node-a")
	a.Acquire(addrClaim())
	eventually(t, "held", func() bool { return a.View().Leases[addrKey].Current })

	api.failHeartbeats.Store(true)
	failed := time.Now()
	eventually(t, "overdue", func() bool { return a.View().Overdue })
	if time.Since(failed) > fast.LeaseDuration {
		t.Fatal("overdue came after the heartbeat could expire")
	}
	time.Sleep(fast.LeaseDuration)
	api.failHeartbeats.Store(false)
	eventually(t, "renewed again", func() bool { return !a.View().Overdue })
	if a.View().Leases[addrKey].Current {
		t.Fatal("a holding from before a heartbeat gap still counts as current")
	}
	a.Acquire(addrClaim())
	eventually(t, "confirmed", func() bool { return a.View().Leases[addrKey].Current })
}

// A restarted daemon whose heartbeat never lapsed keeps its holdings
// current without writing them; after a gap it does not.
func TestRestartAdoptsHoldingsWithoutAGap(t *testing.T) {
	api := newAPIServer()
	a, stop := start(t, api, "node-a")
	a.Acquire(addrClaim())
	eventually(t, "held", func() bool { return a.View().Leases[addrKey].Current })
	stop()

	before := api.writes.Load()
	again, stopAgain := start(t, api, "node-a")
	eventually(t, "the Lease is seen", func() bool { return again.View().Leases[addrKey].Holder == "node-a" })
	if !again.View().Leases[addrKey].Current {
		t.Fatal("a restart without a heartbeat gap lost its holding")
	}
	if w := api.writes.Load() - before; w > 3 {
		t.Fatalf("the restart wrote %d times; only the heartbeat should be written", w)
	}
	stopAgain()

	time.Sleep(fast.LeaseDuration + 200*time.Millisecond)
	late, _ := start(t, api, "node-a")
	eventually(t, "the Lease is seen", func() bool { return late.View().Leases[addrKey].Holder == "node-a" })
	if late.View().Leases[addrKey].Current {
		t.Fatal("a restart after a heartbeat gap counts its old holding as current")
	}
}

// A draining node is live (its holdings stay valid) but no candidate.
func TestDrainingNodeIsNoCandidate(t *testing.T) {
	api := newAPIServer()
	a, _ := start(t, api, "node-a")
	b, _ := start(t, api, "node-b")
	eventually(t, "node-a sees node-b", func() bool { return a.View().Peers["node-b"].Candidate })
	b.Drain(context.Background())
	eventually(t, "node-b draining", func() bool { p := a.View().Peers["node-b"]; return p.Live && !p.Candidate })
	if v := b.View(); !v.Draining || v.Candidate("node-b") {
		t.Fatal("node-b's own view does not show it draining")
	}
}

// A heartbeat deleted by hand does not make the others take the node's
// addresses: its peer stays live until it would have expired, the owner
// writes it again at once, and a takeover attempt finds the holder alive.
func TestDeletedHeartbeatIsNoTakeover(t *testing.T) {
	api := newAPIServer()
	exists := func(string) (bool, bool) { return true, true }
	a, _ := start(t, api, "node-a", options{nodeExists: exists})
	b, _ := start(t, api, "node-b", options{nodeExists: exists})
	b.Acquire(addrClaim())
	eventually(t, "node-a sees node-b hold it", func() bool { return a.View().Leases[addrKey].Holder == "node-b" })
	hb := types.NamespacedName{Namespace: daemonNS, Name: HeartbeatName("node-b")}
	for range 3 {
		api.remove(t, hb)
		if err := a.confirmExpired(context.Background(), "node-b"); !errors.Is(err, errHolderAlive) {
			t.Fatalf("a deleted heartbeat of a Node that exists confirmed as expired: %v", err)
		}
		if !a.View().Peers["node-b"].Live || !a.View().Leases[addrKey].Valid {
			t.Fatal("node-b's holding became invalid when its heartbeat was deleted")
		}
		eventually(t, "node-b writes its heartbeat again", func() bool {
			_, err := api.CoordinationV1().Leases(daemonNS).Get(context.Background(), hb.Name, metav1.GetOptions{})
			return err == nil
		})
	}
	a.Acquire(addrClaim())
	eventually(t, "the attempt ends", func() bool { return !a.View().Leases[addrKey].Pending })
	if h := holderOf(api.lease(t, addrKey)); h != "node-b" {
		t.Fatalf("the address moved to %s", h)
	}
}

// The heartbeat of a deleted Node goes with it, and its holdings with it.
func TestHeartbeatOfADeletedNodeGoes(t *testing.T) {
	api := newAPIServer()
	var gone atomic.Bool
	exists := func(n string) (bool, bool) { return n != "node-b" || !gone.Load(), true }
	a, _ := start(t, api, "node-a", options{nodeExists: exists})
	_, stopB := start(t, api, "node-b")
	eventually(t, "node-a sees node-b", func() bool { return a.View().Peers["node-b"].Live })
	stopB()
	gone.Store(true)
	api.remove(t, types.NamespacedName{Namespace: daemonNS, Name: HeartbeatName("node-b")})
	eventually(t, "node-b forgotten", func() bool { _, ok := a.View().Peers["node-b"]; return !ok })
}

// A Lease deleted by hand keeps its live holder in the others' views (they
// do not take it for free), and the holder's own view keeps it current.
func TestDeletedLeaseKeepsItsHolder(t *testing.T) {
	api := newAPIServer()
	a, _ := start(t, api, "node-a")
	b, _ := start(t, api, "node-b")
	b.Acquire(svcClaim(web))
	eventually(t, "node-a sees node-b hold it", func() bool { return a.View().Leases[web].Holder == "node-b" })
	api.remove(t, web)
	eventually(t, "both saw the deletion", func() bool { return a.View().Leases[web].Deleted && b.View().Leases[web].Deleted })
	if lv := a.View().Leases[web]; lv.Holder != "node-b" || !lv.Valid {
		t.Fatalf("node-a's view of the deleted Lease: %+v", lv)
	}
	if lv := b.View().Leases[web]; !lv.Current {
		t.Fatalf("the holder's view of its deleted Lease: %+v", lv)
	}
	b.Acquire(svcClaim(web))
	eventually(t, "written again", func() bool { lv := a.View().Leases[web]; return !lv.Deleted && lv.Holder == "node-b" })
}

// A Lease of the release before heartbeats (no labels, renewed by its
// holder, which has no heartbeat) is valid while it is renewed, as
// client-go's elector judges it, and only then taken over.
func TestLegacyLeaseIsValidWhileRenewed(t *testing.T) {
	api := newAPIServer()
	a, _ := start(t, api, "node-a")
	dur := int32(1)
	legacy := func(renew time.Time) *coordinationv1.Lease {
		holder := "old-node"
		return &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: web.Namespace, Name: web.Name},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: &holder, LeaseDurationSeconds: &dur, RenewTime: &metav1.MicroTime{Time: renew}}}
	}
	cur, err := api.CoordinationV1().Leases(web.Namespace).Create(context.Background(), legacy(time.Now()), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// node-a learns of it when it tries to acquire.
	a.Acquire(svcClaim(web))
	eventually(t, "node-a sees the legacy holder", func() bool { return a.View().Leases[web].Holder == "old-node" })
	lv := a.View().Leases[web]
	if lv.Writer != model.Legacy || !lv.Valid {
		t.Fatalf("legacy Lease %+v", lv)
	}
	// Renewed for a while: stays valid and held.
	deadline := time.Now().Add(2500 * time.Millisecond)
	for time.Now().Before(deadline) {
		cur.Spec.RenewTime = &metav1.MicroTime{Time: time.Now()}
		if cur, err = api.CoordinationV1().Leases(web.Namespace).Update(context.Background(), cur, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		a.Acquire(svcClaim(web))
		time.Sleep(fast.RetryPeriod)
		if lv := a.View().Leases[web]; !lv.Valid || lv.Holder != "old-node" {
			t.Fatalf("a renewed legacy Lease lost: %+v", lv)
		}
	}
	// Not renewed any more: invalid after its duration, then taken.
	eventually(t, "the legacy holding expires", func() bool { return !a.View().Leases[web].Valid })
	eventually(t, "node-a takes it", func() bool {
		a.Acquire(svcClaim(web))
		return a.View().Leases[web].Holder == "node-a"
	})
	if l := api.lease(t, web); l.Labels[LabelRole] != RoleService {
		t.Fatalf("taken over without labels: %+v", l.Labels)
	}
}

// An address Lease nobody holds is deleted on request.
func TestDeleteUnclaimedAddressLease(t *testing.T) {
	api := newAPIServer()
	api.PrependReactor("delete", "leases", func(a k8stesting.Action) (bool, runtime.Object, error) { return false, nil, nil })
	a, _ := start(t, api, "node-a")
	// Each write is asked for again until it took, as the sync loop does
	// (a no-op while one is pending): on a loaded machine one may time out.
	eventually(t, "held", func() bool {
		if a.View().Leases[addrKey].Current {
			return true
		}
		a.Acquire(addrClaim())
		return false
	})
	eventually(t, "released", func() bool {
		if lv := a.View().Leases[addrKey]; lv.Holder == "" && !lv.Pending {
			return true
		}
		a.Release(addrKey)
		return false
	})
	eventually(t, "deleted", func() bool {
		if _, err := api.CoordinationV1().Leases(daemonNS).Get(context.Background(), addrKey.Name, metav1.GetOptions{}); apierrors.IsNotFound(err) {
			return true
		}
		a.Delete(addrKey)
		return false
	})
}

func TestRankIsStableAndOrderFree(t *testing.T) {
	a := Rank("203.0.113.10", []string{"n1", "n2", "n3"})
	b := Rank("203.0.113.10", []string{"n3", "n1", "n2"})
	if fmt.Sprint(a) != fmt.Sprint(b) {
		t.Fatalf("rank depends on input order: %v vs %v", a, b)
	}
}
