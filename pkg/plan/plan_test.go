package plan

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/types"

	"github.com/egressvip/egressvip/pkg/desired"
	"github.com/egressvip/egressvip/pkg/election"
)

const self = "node-a"

var t0 = time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)

func key(name string) types.NamespacedName {
	return types.NamespacedName{Namespace: "default", Name: name}
}

func leaseOf(name string) types.NamespacedName {
	return types.NamespacedName{Namespace: "default", Name: election.LeaseName(name)}
}

// svc is an analysed Service that stands on this node. Local ones have a
// ready endpoint here (and on the extra ready nodes given).
func svc(name, ip string, local bool, readyNodes ...string) desired.Service {
	s := desired.Service{
		Key: key(name), UID: types.UID("uid-" + name), Lease: leaseOf(name), LBv4: netip.MustParseAddr(ip),
		Local: local, Stand: true,
	}
	if local {
		s.Egress = true
		s.LocalEndpoints = []desired.Endpoint{{Name: name + "-pod", Node: self, V4: netip.MustParseAddr("10.244.1.5")}}
		s.ReadyNodes = append([]string{self}, readyNodes...)
		s.RemoteReady = len(readyNodes)
	}
	return s
}

func notStanding(s desired.Service, reason string) desired.Service {
	s.Stand, s.Reason, s.LocalEndpoints = false, reason, nil
	return s
}

// view is an election view with this node established and the given
// other nodes alive.
func view(live ...string) election.View {
	v := election.View{
		Self: self, Now: t0, Established: true,
		Live: map[string]bool{self: true}, Candidates: map[string]bool{self: true},
		Leases: map[types.NamespacedName]election.Lease{},
	}
	for _, n := range live {
		v.Live[n], v.Candidates[n] = true, true
	}
	return v
}

func with(v election.View, name string, l election.Lease) election.View {
	v.Leases[leaseOf(name)] = l
	return v
}

func input(v election.View, services ...desired.Service) Input {
	return Input{Node: self, Services: services, Election: v, RetryPeriod: time.Second, Settle: 5 * time.Second}
}

// rankedSecond finds a Service name for which this node ranks second of
// self, node-b and node-c.
func rankedSecond(t *testing.T) (string, string) {
	t.Helper()
	for i := range 100 {
		name := fmt.Sprintf("svc-%d", i)
		r := election.Rank(leaseOf(name), []string{self, "node-b", "node-c"})
		if r[1] == self {
			return name, r[0]
		}
	}
	t.Fatal("no Service name ranks this node second")
	return "", ""
}

func TestDecide(t *testing.T) {
	second, first := rankedSecond(t)
	current := election.Lease{Holder: self, Current: true, OwnerUID: "uid-web"}
	resumed := Start([]netip.Addr{netip.MustParseAddr("203.0.113.10")})
	for _, tc := range []struct {
		name        string
		mem         Memory
		in          Input
		wantOwn     bool
		wantLeader  bool
		wantReason  string
		wantAcquire bool
	}{
		{name: "not standing: nothing",
			in:         input(view(), notStanding(svc("web", "203.0.113.10", true), desired.ReasonNoLocalEndpoint)),
			wantReason: desired.ReasonNoLocalEndpoint},
		{name: "free and the only candidate: acquire at once, program after the write",
			in:         input(view(), svc("web", "203.0.113.10", true)),
			wantReason: ReasonAcquiring, wantAcquire: true},
		{name: "free, Local: a ready node whose daemon is dead does not count",
			in:         input(view(), svc("web", "203.0.113.10", true, "node-dead")),
			wantReason: ReasonAcquiring, wantAcquire: true},
		{name: "free, Cluster, ranked second: wait a turn",
			in:         input(view("node-b", "node-c"), svc(second, "203.0.113.10", false)),
			wantReason: ReasonWaitingTurn},
		{name: "free, Cluster, ranked second, the first did not acquire within a turn",
			mem:        Memory{FreeSince: map[types.NamespacedName]time.Time{leaseOf(second): t0.Add(-time.Second)}},
			in:         input(view("node-b", "node-c"), svc(second, "203.0.113.10", false)),
			wantReason: ReasonAcquiring, wantAcquire: true},
		{name: "free, ranked second, but the first is draining",
			in: func() Input {
				v := view("node-b", "node-c")
				delete(v.Candidates, first)
				return input(v, svc(second, "203.0.113.10", false))
			}(),
			wantReason: ReasonAcquiring, wantAcquire: true},
		{name: "held by a live node: sticky, even if this node ranks first",
			in:         input(with(view("node-b"), "web", election.Lease{Holder: "node-b"}), svc("web", "203.0.113.10", false)),
			wantReason: ReasonHeldElsewhere},
		{name: "held by a node whose heartbeat expired: take it",
			in:         input(with(view(), "web", election.Lease{Holder: "node-b"}), svc("web", "203.0.113.10", false)),
			wantReason: ReasonAcquiring, wantAcquire: true},
		{name: "released: take it",
			in:         input(with(view(), "web", election.Lease{}), svc("web", "203.0.113.10", false)),
			wantReason: ReasonAcquiring, wantAcquire: true},
		{name: "held by this node, current: leader",
			in:      input(with(view(), "web", current), svc("web", "203.0.113.10", false)),
			wantOwn: true, wantLeader: true, wantReason: ReasonLeader},
		{name: "leader, renewal overdue, another node could serve: give it up, keep the Lease",
			in: func() Input {
				v := with(view(), "web", current)
				v.Overdue = true
				return input(v, svc("web", "203.0.113.10", false))
			}(),
			wantReason: ReasonOverdue},
		{name: "leader, renewal overdue, pinned: keep serving",
			in: func() Input {
				v := with(view(), "web", current)
				v.Overdue = true
				return input(v, svc("web", "203.0.113.10", true))
			}(),
			wantOwn: true, wantReason: ReasonKept},
		{name: "held from before a heartbeat gap, pinned: keep serving while confirming",
			in:      input(with(view(), "web", election.Lease{Holder: self}), svc("web", "203.0.113.10", true)),
			wantOwn: true, wantReason: ReasonKept, wantAcquire: true},
		{name: "held from before a heartbeat gap, not pinned: confirm before serving",
			in:         input(with(view(), "web", election.Lease{Holder: self}), svc("web", "203.0.113.10", false)),
			wantReason: ReasonAcquiring, wantAcquire: true},
		{name: "held, but the Service was created again: rewrite the owner",
			in:      input(with(view(), "web", election.Lease{Holder: self, Current: true, OwnerUID: "old"}), svc("web", "203.0.113.10", false)),
			wantOwn: true, wantLeader: true, wantReason: ReasonLeader, wantAcquire: true},
		{name: "restart, heartbeat not yet renewed: keep what the previous process bound",
			mem: resumed,
			in: func() Input {
				v := with(view(), "web", election.Lease{Holder: self})
				v.Established = false
				return input(v, svc("web", "203.0.113.10", false))
			}(),
			wantOwn: true, wantReason: ReasonResuming},
		{name: "restart after an upgrade (a legacy Lease): keep it and acquire at once",
			mem:     resumed,
			in:      input(with(view("node-b", "node-c"), "web", election.Lease{Holder: self, Legacy: true}), svc("web", "203.0.113.10", false)),
			wantOwn: true, wantReason: ReasonResuming, wantAcquire: true},
		{name: "restart, but another node holds it: let go",
			mem:        resumed,
			in:         input(with(view("node-b"), "web", election.Lease{Holder: "node-b"}), svc("web", "203.0.113.10", false)),
			wantReason: ReasonHeldElsewhere},
		{name: "no heartbeat yet: no acquisition",
			in: func() Input {
				v := view()
				v.Established, v.Overdue = false, true
				delete(v.Live, self)
				delete(v.Candidates, self)
				return input(v, svc("web", "203.0.113.10", false))
			}(),
			wantReason: ReasonNotCandidate},
		{name: "draining: no acquisition",
			in: func() Input {
				v := view()
				v.Draining = true
				return input(v, svc("web", "203.0.113.10", false))
			}(),
			wantReason: ReasonNotCandidate},
		{name: "a write in flight: no second one",
			in:         input(with(view(), "web", election.Lease{Pending: true}), svc("web", "203.0.113.10", false)),
			wantReason: ReasonAcquiring},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, _ := Decide(tc.mem, tc.in)
			s := tc.in.Services[0]
			d := p.Decisions[s.Key]
			if d.Own != tc.wantOwn || d.Leader != tc.wantLeader || d.Reason != tc.wantReason {
				t.Errorf("decision %+v, want own=%v leader=%v reason=%q", d, tc.wantOwn, tc.wantLeader, tc.wantReason)
			}
			acquired := slices.ContainsFunc(p.Acquire, func(c election.Claim) bool { return c.Lease == s.Lease })
			if acquired != tc.wantAcquire {
				t.Errorf("acquire %v, want %v", acquired, tc.wantAcquire)
			}
			if acquired {
				c := p.Acquire[0]
				if c.Owner == nil || c.Owner.Kind != "Service" || c.Owner.Name != s.Key.Name || c.Owner.UID != s.UID {
					t.Errorf("claim owner %+v, want the Service", c.Owner)
				}
			}
			if got := slices.Contains(p.State.Addresses, s.LBv4); got != tc.wantOwn {
				t.Errorf("address in the node state %v, want %v", got, tc.wantOwn)
			}
		})
	}
}

// Every node ranks the candidates the same way: exactly one acquires a
// free Lease at once, whatever order it sees them in.
func TestExactlyOneCandidateAcquiresAtOnce(t *testing.T) {
	nodes := []string{"node-a", "node-b", "node-c", "node-d"}
	for i := range 50 {
		s := svc(fmt.Sprintf("svc-%d", i), "203.0.113.10", false)
		first := 0
		for _, n := range nodes {
			v := view()
			v.Self = n
			for _, m := range nodes {
				v.Live[m], v.Candidates[m] = true, true
			}
			p, _ := Decide(Memory{}, input(v, s))
			if len(p.Acquire) > 0 {
				first++
			}
		}
		if first != 1 {
			t.Fatalf("%s: %d nodes acquire at once, want 1", s.Key, first)
		}
	}
}

// The candidates' first places spread over the nodes.
func TestRankSpreadsServices(t *testing.T) {
	count := map[string]int{}
	for i := range 3000 {
		count[election.Rank(leaseOf(fmt.Sprintf("svc-%d", i)), []string{"node-a", "node-b", "node-c"})[0]]++
	}
	for n, c := range count {
		if c < 800 || c > 1200 {
			t.Errorf("%s ranks first for %d of 3000 Services, want about 1000", n, c)
		}
	}
}

func TestGlobalLeaseHasNoOwner(t *testing.T) {
	global := types.NamespacedName{Namespace: "egressvip", Name: "egressvip.services"}
	a, b := svc("a", "203.0.113.10", false), svc("b", "203.0.113.11", false)
	a.Lease, b.Lease = global, global
	in := input(view(), a, b)
	in.GlobalLease = global
	p, _ := Decide(Memory{}, in)
	if len(p.Acquire) != 1 || p.Acquire[0].Lease != global || p.Acquire[0].Owner != nil {
		t.Fatalf("acquire %+v, want the global Lease once, without owner", p.Acquire)
	}
	in.Election.Leases[global] = election.Lease{Holder: self, Current: true}
	p, _ = Decide(Memory{}, in)
	if len(p.Own) != 2 {
		t.Fatalf("own %d Services under the global Lease, want 2", len(p.Own))
	}
}

// A Lease is released only after an apply that left its Service out
// succeeded; after a failed one it stays held.
func TestSettleReleasesOnlyWhatTheKernelLetGo(t *testing.T) {
	s := svc("web", "203.0.113.10", true)
	v := with(view(), "web", election.Lease{Holder: self, Current: true})
	p, mem := Decide(Memory{}, input(v, s))
	mem, release := Settle(mem, p, true)
	if len(release) != 0 || !mem.Programmed[s.Key] {
		t.Fatalf("setup: release %v programmed %v", release, mem.Programmed)
	}
	gone := notStanding(s, desired.ReasonNoLocalEndpoint)
	p, next := Decide(mem, input(v, gone))
	failed, release := Settle(next, p, false)
	if len(release) != 0 {
		t.Fatalf("released %v after a failed apply", release)
	}
	if !failed.Programmed[s.Key] {
		t.Fatal("a failed apply forgot what the kernel may hold")
	}
	p, next = Decide(failed, input(v, gone))
	_, release = Settle(next, p, true)
	if !slices.Equal(release, []types.NamespacedName{s.Lease}) {
		t.Fatalf("release %v after a successful apply, want %v", release, s.Lease)
	}
	// Overdue but still wanted: kept, not released.
	overdue := with(view(), "web", election.Lease{Holder: self, Current: true})
	overdue.Overdue = true
	p, next = Decide(mem, input(overdue, svc("web", "203.0.113.10", false)))
	if _, release = Settle(next, p, true); len(release) != 0 {
		t.Fatalf("released %v while overdue but still wanted", release)
	}
}

func TestEvents(t *testing.T) {
	bad := svc("bad", "203.0.113.10", true)
	bad.Problems = []desired.Problem{{Reason: desired.EventInvalidAnnotation, Message: "tcp:70000", Fatal: true}}
	v := with(view(), "bad", election.Lease{Holder: self, Current: true})
	mem := Memory{Initialized: true}
	warnings := func(events []Event) []string {
		var out []string
		for _, e := range events {
			if e.Warning {
				out = append(out, e.Reason)
			}
		}
		return out
	}

	p, mem := Decide(mem, input(v, bad))
	if got := warnings(p.Events); !slices.Equal(got, []string{desired.EventInvalidAnnotation}) {
		t.Fatalf("first plan warnings %v", got)
	}
	p, mem = Decide(mem, input(v, bad))
	if got := warnings(p.Events); len(got) != 0 {
		t.Fatalf("the same problem raised again: %v", got)
	}
	// The interface goes missing: one more reason, raised once.
	in := input(v, bad)
	in.InterfaceErr = "interface eth1 not found"
	p, mem = Decide(mem, input(v, svc("bad", "203.0.113.10", true)))
	if len(warnings(p.Events)) != 0 {
		t.Fatal("a fixed Service raised a Warning")
	}
	in = input(v, svc("bad", "203.0.113.10", true))
	in.InterfaceErr = "interface eth1 not found"
	p, mem = Decide(mem, in)
	if got := warnings(p.Events); !slices.Equal(got, []string{EventInterfaceNotFound}) {
		t.Fatalf("missing interface warnings %v", got)
	}
	p, mem = Decide(mem, in)
	if got := warnings(p.Events); len(got) != 0 {
		t.Fatalf("missing interface raised again: %v", got)
	}
	// The problem comes back after it cleared: raised again.
	p, mem = Decide(mem, input(v, bad))
	if got := warnings(p.Events); !slices.Equal(got, []string{desired.EventInvalidAnnotation}) {
		t.Fatalf("returning problem warnings %v", got)
	}
	_ = p
	_ = mem
}

func TestTransientProblemsWaitToSettle(t *testing.T) {
	s := svc("dual", "203.0.113.10", true)
	s.Problems = []desired.Problem{{Reason: desired.EventFamilyMismatch, Message: "no IPv6", Transient: true}}
	v := with(view(), "dual", election.Lease{Holder: self, Current: true})
	p, mem := Decide(Memory{}, input(v, s))
	if len(p.Events) != 0 || !p.Wake.Equal(t0.Add(5*time.Second)) {
		t.Fatalf("events %v wake %v: a transient problem must wait 5 s", p.Events, p.Wake)
	}
	v.Now = t0.Add(5 * time.Second)
	p, _ = Decide(mem, input(v, s))
	if len(p.Events) != 1 || p.Events[0].Reason != desired.EventFamilyMismatch {
		t.Fatalf("after 5 s: events %v", p.Events)
	}
}

// Local Services' problems come only from nodes with a local endpoint.
func TestOnlyServingNodesReport(t *testing.T) {
	elsewhere := notStanding(svc("bad", "203.0.113.10", true), desired.ReasonInvalid)
	elsewhere.Problems = []desired.Problem{{Reason: desired.EventInvalidAnnotation, Message: "x", Fatal: true}}
	p, _ := Decide(Memory{Initialized: true}, input(view(), elsewhere))
	if len(p.Events) != 0 {
		t.Fatalf("a node without a local endpoint reported %v", p.Events)
	}
}

func TestOwnershipEvents(t *testing.T) {
	s := svc("web", "203.0.113.10", false)
	v := with(view(), "web", election.Lease{Holder: self, Current: true})
	// A new process finds it serves the Service: no Event.
	p, mem := Decide(Memory{}, input(v, s))
	if len(p.Events) != 0 {
		t.Fatalf("first plan raised %v", p.Events)
	}
	v = with(view("node-b"), "web", election.Lease{Holder: "node-b"})
	p, _ = Decide(mem, input(v, s))
	if len(p.Events) != 1 || p.Events[0].Reason != EventReleased || p.Events[0].Warning {
		t.Fatalf("events %+v, want one Normal %s", p.Events, EventReleased)
	}
}
