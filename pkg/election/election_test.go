package election

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strconv"
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

	"github.com/egressvip/egressvip/pkg/kube/kubefake"
)

var fast = Timing{LeaseDuration: 1200 * time.Millisecond, RenewDeadline: 800 * time.Millisecond, RetryPeriod: 100 * time.Millisecond}

const daemonNS = "egressvip"

func quietLog() *logrus.Entry {
	l := logrus.New()
	l.SetOutput(io.Discard)
	return logrus.NewEntry(l)
}

// eventually polls cond for at most 10 s; it is a bound, not a timing assertion.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
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

// start runs a Manager for node until the test ends or stop is called.
func start(t *testing.T, api *apiServer, node string) (*Manager, context.CancelFunc) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	m := NewManager(Config{
		Identity: node, Namespace: daemonNS, Timing: fast,
		HeartbeatClient: kubefake.Wrap(api), Client: kubefake.Wrap(api), Log: quietLog(),
	})
	m.Run(ctx)
	eventually(t, node+" synced and established", func() bool { return m.HasSynced() && m.View().Established })
	return m, cancel
}

func holder(l Lease) string { return l.Holder }

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

var web = types.NamespacedName{Namespace: "default", Name: LeaseName("web")}

func owner(name string) *metav1.OwnerReference {
	return &metav1.OwnerReference{APIVersion: "v1", Kind: "Service", Name: name, UID: types.UID("uid-" + name)}
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

// Each node renews one heartbeat; the others see it live, and see it
// expire a lease duration after it stops.
func TestHeartbeatsAndLiveness(t *testing.T) {
	api := newAPIServer()
	a, _ := start(t, api, "node-a")
	_, stopB := start(t, api, "node-b")
	eventually(t, "node-a sees node-b", func() bool { return a.View().Live["node-b"] })

	hb := api.lease(t, types.NamespacedName{Namespace: daemonNS, Name: HeartbeatName("node-a")})
	if holderOf(hb) != "node-a" || hb.Labels[LabelRole] != RoleHeartbeat || hb.Spec.LeaseDurationSeconds == nil || hb.Spec.RenewTime == nil {
		t.Fatalf("heartbeat %+v", hb)
	}
	if v := a.View(); !v.Live["node-a"] || !v.Candidates["node-a"] || v.Overdue {
		t.Fatalf("node-a's own view: %+v", v)
	}

	stopB()
	stopped := time.Now()
	eventually(t, "node-b expires in node-a's view", func() bool { return !a.View().Live["node-b"] })
	if waited := time.Since(stopped); waited < fast.LeaseDuration-fast.RetryPeriod {
		t.Fatalf("node-b expired %s after its last renewal, before the lease duration %s", waited, fast.LeaseDuration)
	}
}

// Of two nodes acquiring one Lease at once, exactly one holds it; both
// views then agree.
func TestAcquireRaceHasOneWinner(t *testing.T) {
	for _, exists := range []bool{false, true} {
		t.Run(fmt.Sprintf("lease exists %v", exists), func(t *testing.T) {
			api := newAPIServer()
			if exists {
				released := &coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Namespace: web.Namespace, Name: web.Name,
					Labels: map[string]string{LabelRole: RoleService, LabelManagedBy: ManagedBy}}}
				if _, err := api.CoordinationV1().Leases(web.Namespace).Create(context.Background(), released, metav1.CreateOptions{}); err != nil {
					t.Fatal(err)
				}
			}
			a, _ := start(t, api, "node-a")
			b, _ := start(t, api, "node-b")
			eventually(t, "both synced", func() bool { _, ok := b.View().Leases[web]; return !exists || ok })
			a.Acquire(Claim{Lease: web, Owner: owner("web")})
			b.Acquire(Claim{Lease: web, Owner: owner("web")})
			eventually(t, "both views agree on one holder", func() bool {
				la, lb := a.View().Leases[web], b.View().Leases[web]
				return la.Holder != "" && la.Holder == lb.Holder && !la.Pending && !lb.Pending
			})
			winner := holderOf(api.lease(t, web))
			if got := holder(a.View().Leases[web]); got != winner {
				t.Fatalf("views say %s, the API server %s", got, winner)
			}
			for _, m := range []*Manager{a, b} {
				l := m.View().Leases[web]
				if l.Current != (m.Identity() == winner) {
					t.Fatalf("%s: Current=%v with holder %s", m.Identity(), l.Current, winner)
				}
			}
		})
	}
}

// A holder whose heartbeat is live keeps its Lease; once it expired, the
// Lease is taken over, and the write carries the owner and labels.
func TestTakeoverOnlyAfterTheHeartbeatExpired(t *testing.T) {
	api := newAPIServer()
	a, _ := start(t, api, "node-a")
	b, stopB := start(t, api, "node-b")
	b.Acquire(Claim{Lease: web, Owner: owner("web")})
	eventually(t, "node-a sees node-b hold it", func() bool { return a.View().Leases[web].Holder == "node-b" })

	a.Acquire(Claim{Lease: web, Owner: owner("web")})
	eventually(t, "the attempt ends", func() bool { return !a.View().Leases[web].Pending })
	if h := holderOf(api.lease(t, web)); h != "node-b" {
		t.Fatalf("took the Lease from a live holder: now %s", h)
	}

	stopB()
	eventually(t, "node-b expires", func() bool { return !a.View().Live["node-b"] })
	eventually(t, "node-a takes over", func() bool {
		a.Acquire(Claim{Lease: web, Owner: owner("web")})
		return a.View().Leases[web].Holder == "node-a" && a.View().Leases[web].Current
	})
	l := api.lease(t, web)
	if l.Labels[LabelRole] != RoleService || len(l.OwnerReferences) != 1 || l.OwnerReferences[0].UID != "uid-web" {
		t.Fatalf("lease metadata %+v", l.ObjectMeta)
	}
	if l.Spec.LeaseTransitions == nil || *l.Spec.LeaseTransitions != 1 || l.Spec.LeaseDurationSeconds != nil {
		t.Fatalf("lease spec %+v", l.Spec)
	}
}

// A Service Lease is written on acquisition and release only: steady
// state costs the heartbeat alone, whatever the number of Services.
func TestSteadyStateWritesOnlyHeartbeats(t *testing.T) {
	api := newAPIServer()
	a, _ := start(t, api, "node-a")
	for i := range 50 {
		a.Acquire(Claim{Lease: types.NamespacedName{Namespace: "default", Name: LeaseName(fmt.Sprintf("s%d", i))}, Owner: owner("s")})
	}
	eventually(t, "50 held", func() bool { return current(a) == 50 })
	before := api.writes.Load()
	time.Sleep(10 * fast.RetryPeriod)
	if w := api.writes.Load() - before; w > 12 {
		t.Fatalf("%d writes in 10 retry periods with 50 Services held, want about 10 (the heartbeat)", w)
	}
	a.Release(types.NamespacedName{Namespace: "default", Name: LeaseName("s0")})
	eventually(t, "released", func() bool {
		return a.View().Leases[types.NamespacedName{Namespace: "default", Name: LeaseName("s0")}].Holder == ""
	})
}

// Many acquisitions at once queue behind a bounded number of writers.
func TestAcquisitionsAreBounded(t *testing.T) {
	api := newAPIServer()
	var inFlight, most atomic.Int64
	api.PrependReactor("create", "leases", func(k8stesting.Action) (bool, runtime.Object, error) {
		n := inFlight.Add(1)
		for {
			m := most.Load()
			if n <= m || most.CompareAndSwap(m, n) {
				break
			}
		}
		time.Sleep(2 * time.Millisecond)
		inFlight.Add(-1)
		return false, nil, nil
	})
	a, _ := start(t, api, "node-a")
	for i := range 200 {
		a.Acquire(Claim{Lease: types.NamespacedName{Namespace: "default", Name: LeaseName(fmt.Sprintf("s%d", i))}, Owner: owner("s")})
	}
	eventually(t, "200 held", func() bool { return current(a) == 200 })
	if m := most.Load(); m > 16 {
		t.Fatalf("%d writes ran at once, want at most the 16 workers", m)
	}
	eventually(t, "the workers stop with an empty queue", func() bool {
		a.mu.Lock()
		defer a.mu.Unlock()
		return a.workers == 0
	})
}

// Failing renewals make the node overdue within the renew deadline;
// renewals that come back after a lease duration start a new epoch, in
// which what it held must be written again before it counts.
func TestOverdueAndEpoch(t *testing.T) {
	api := newAPIServer()
	a, _ := start(t, api, "node-a")
	a.Acquire(Claim{Lease: web, Owner: owner("web")})
	eventually(t, "held", func() bool { return a.View().Leases[web].Current })

	api.failHeartbeats.Store(true)
	failed := time.Now()
	eventually(t, "overdue", func() bool { return a.View().Overdue })
	if time.Since(failed) > fast.LeaseDuration {
		t.Fatal("overdue came after the heartbeat could expire")
	}
	time.Sleep(fast.LeaseDuration)
	api.failHeartbeats.Store(false)
	eventually(t, "renewed again", func() bool { return !a.View().Overdue })
	if a.View().Leases[web].Current {
		t.Fatal("a holding from before a heartbeat gap still counts as current")
	}
	a.Acquire(Claim{Lease: web, Owner: owner("web")})
	eventually(t, "confirmed", func() bool { return a.View().Leases[web].Current })
}

// A restarted daemon whose heartbeat never lapsed keeps its holdings
// current without writing them; after a gap it does not.
func TestRestartAdoptsHoldingsWithoutAGap(t *testing.T) {
	api := newAPIServer()
	a, stop := start(t, api, "node-a")
	a.Acquire(Claim{Lease: web, Owner: owner("web")})
	eventually(t, "held", func() bool { return a.View().Leases[web].Current })
	stop()

	before := api.writes.Load()
	again, stopAgain := start(t, api, "node-a")
	eventually(t, "the Lease is seen", func() bool { return again.View().Leases[web].Holder == "node-a" })
	if !again.View().Leases[web].Current {
		t.Fatal("a restart without a heartbeat gap lost its holding")
	}
	if w := api.writes.Load() - before; w > 3 {
		t.Fatalf("the restart wrote %d times; only the heartbeat should be written", w)
	}
	stopAgain()

	time.Sleep(fast.LeaseDuration + 200*time.Millisecond)
	late, _ := start(t, api, "node-a")
	eventually(t, "the Lease is seen", func() bool { return late.View().Leases[web].Holder == "node-a" })
	if late.View().Leases[web].Current {
		t.Fatal("a restart after a heartbeat gap counts its old holding as current")
	}
}

// A node publishes its interface addresses in its heartbeat; the others
// learn them.
func TestHeartbeatPublishesInterfaceAddresses(t *testing.T) {
	api := newAPIServer()
	a, _ := start(t, api, "node-a")
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	b := NewManager(Config{Identity: "node-b", Namespace: daemonNS, Timing: fast, HeartbeatClient: kubefake.Wrap(api), Client: kubefake.Wrap(api), Log: quietLog(),
		HostAddresses: func() []netip.Addr {
			return []netip.Addr{netip.MustParseAddr("203.0.113.12"), netip.MustParseAddr("fe80::1")}
		}})
	b.Run(ctx)
	eventually(t, "node-a learns node-b's address", func() bool { return a.PeerAddresses()[netip.MustParseAddr("203.0.113.12")] })
	if a.PeerAddresses()[netip.MustParseAddr("fe80::1")] {
		t.Fatal("a link-local address was published")
	}
}

// A draining node is live (its holdings stay valid) but no candidate.
func TestDrainingNodeIsNoCandidate(t *testing.T) {
	api := newAPIServer()
	a, _ := start(t, api, "node-a")
	b, _ := start(t, api, "node-b")
	eventually(t, "node-a sees node-b", func() bool { return a.View().Candidates["node-b"] })
	b.Drain(context.Background())
	eventually(t, "node-b draining", func() bool { v := a.View(); return v.Live["node-b"] && !v.Candidates["node-b"] })
	if !b.View().Draining || b.View().Candidates["node-b"] {
		t.Fatal("node-b's own view does not show it draining")
	}
}

func TestRankIsStableAndOrderFree(t *testing.T) {
	a := Rank(web, []string{"n1", "n2", "n3"})
	b := Rank(web, []string{"n3", "n1", "n2"})
	if fmt.Sprint(a) != fmt.Sprint(b) {
		t.Fatalf("rank depends on input order: %v vs %v", a, b)
	}
}
