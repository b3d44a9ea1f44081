package plan

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/types"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/pkg/election"
	"github.com/egressvip/egressvip/pkg/model"
)

const (
	self     = "node-a"
	daemonNS = "egressvip"
)

var t0 = time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)

func key(name string) types.NamespacedName {
	return types.NamespacedName{Namespace: "default", Name: name}
}

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }

func svcLease(name string) types.NamespacedName { return election.ServiceLeaseKey(key(name)) }

func addrLease(ip string) types.NamespacedName { return addressLease(daemonNS, addr(ip)) }

// svc is an analysed Service with one IPv4 address. Local ones have a ready
// endpoint on each of readyNodes (self when none given); egress ones have
// those endpoints egressed.
func svc(name, ip string, local, egress bool, readyNodes ...string) model.Service {
	s := model.Service{Key: key(name), UID: types.UID("uid-" + name), LBv4: addr(ip), Local: local, Egress: egress, EgressIPv4: egress,
		Created: t0.Add(-time.Hour), FlushConntrack: true}
	if len(readyNodes) == 0 {
		readyNodes = []string{self}
	}
	for i, n := range readyNodes {
		s.Endpoints = append(s.Endpoints, model.Endpoint{Name: fmt.Sprintf("%s-pod-%d", name, i), Node: n, Local: n == self,
			V4: addr(fmt.Sprintf("10.244.%d.5", i+1)), Ready: true, Serving: true, TargetKind: "Pod"})
	}
	slices.Sort(readyNodes)
	s.ReadyNodes = readyNodes
	return s
}

// view is an election view with this node established and the given other
// nodes live, current candidates.
func view(live ...string) model.ElectionView {
	v := model.ElectionView{Self: self, Now: t0, Established: true, Peers: map[string]model.Peer{},
		Leases: map[types.NamespacedName]model.Lease{}}
	for i, n := range live {
		v.Peers[n] = model.Peer{Version: election.ProtocolVersion, Live: true, Candidate: true,
			Via: []netip.Addr{addr(fmt.Sprintf("198.51.100.%d", 20+i))}}
	}
	return v
}

// holds marks every Lease of the listed Services and addresses as held by
// node (current when it is self).
func holds(v model.ElectionView, node string, services []string, addrs ...string) model.ElectionView {
	l := func(kind model.LeaseKind) model.Lease {
		return model.Lease{Kind: kind, Holder: node, Valid: node == self || v.Peers[node].Live, Current: node == self, Writer: model.Current,
			Owners: nil}
	}
	for _, s := range services {
		lv := l(model.ServiceLease)
		lv.Owners = []types.UID{types.UID("uid-" + s)}
		v.Leases[svcLease(s)] = lv
	}
	for _, a := range addrs {
		v.Leases[addrLease(a)] = l(model.AddressLease)
	}
	return v
}

func input(v model.ElectionView, services ...model.Service) Input {
	return Input{Node: self, Services: services, Election: v, DaemonNamespace: daemonNS, RetryPeriod: time.Second,
		Grace: 5 * time.Second, Settle: 5 * time.Second, Host: model.Host{Up: true}}
}

func bound(p Plan) []string {
	var out []string
	for _, b := range p.Bind {
		s := b.Addr.String()
		if b.KeepOnly {
			s += "(keep)"
		}
		out = append(out, s)
	}
	return out
}

func acquired(p Plan) []string {
	var out []string
	for _, c := range p.Acquire {
		out = append(out, c.Lease.Name)
	}
	slices.Sort(out)
	return out
}

func snatOf(p Plan) []string {
	var out []string
	for _, r := range p.Datapath.SNAT {
		s := r.Pod.String() + ">" + r.Source.String()
		if r.Remote {
			s += "(remote)"
		}
		out = append(out, s)
	}
	slices.Sort(out)
	return out
}

func steerOf(p Plan) []string {
	var out []string
	for _, r := range p.Datapath.Steer {
		out = append(out, r.Pod.String()+">"+r.Holder)
	}
	return out
}

func holdOf(p Plan) []string {
	var out []string
	for _, r := range p.Datapath.Hold {
		out = append(out, r.Pod.String())
	}
	return out
}

// A free address: this node, the only candidate, acquires the address
// Lease and the Service Lease, and binds nothing before both are written.
func TestFreeAddressIsAcquiredBeforeItIsBound(t *testing.T) {
	p, _ := Decide(Start(nil), input(view(), svc("web", "203.0.113.10", false, false)))
	if got, want := acquired(p), []string{"egressvip-web", "egressvip.addr.203.0.113.10"}; !slices.Equal(got, want) {
		t.Errorf("acquire %v, want %v", got, want)
	}
	if len(p.Bind) != 0 {
		t.Errorf("bound %v before the Leases were written", bound(p))
	}
	if d := p.Decisions[key("web")]; d.Reason != ReasonAcquiring {
		t.Errorf("reason %q", d.Reason)
	}
	var claim model.Claim
	for _, c := range p.Acquire {
		if c.Kind == model.AddressLease {
			claim = c
		}
	}
	if claim.ClaimedBy != "default" || claim.Address != addr("203.0.113.10") {
		t.Errorf("address claim %+v: want it to record the namespace and the address", claim)
	}
}

// The holder binds (probing first, since the kernel lacks it), SNATs its
// pods and reports.
func TestHolderBindsProbesSNATsAndReports(t *testing.T) {
	v := holds(view(), self, []string{"web"}, "203.0.113.10")
	p, mem := Decide(Start(nil), input(v, svc("web", "203.0.113.10", true, true)))
	if got := bound(p); !slices.Equal(got, []string{"203.0.113.10"}) {
		t.Fatalf("bound %v", got)
	}
	if !slices.Equal(p.Probe, []netip.Addr{addr("203.0.113.10")}) {
		t.Errorf("probe %v: a new address is probed before it is bound", p.Probe)
	}
	if got := snatOf(p); !slices.Equal(got, []string{"10.244.1.5>203.0.113.10"}) {
		t.Errorf("snat %v", got)
	}
	if !slices.Equal(p.Datapath.Fenced, []netip.Addr{addr("203.0.113.10")}) {
		t.Errorf("fenced %v: every SNAT source is fenced", p.Datapath.Fenced)
	}
	rep := p.Reports[key("web")]
	if rep.VIPHost != self || rep.ActiveEndpoint != "10.244.1.5" || rep.Egress != "1" || rep.Steered != "0" {
		t.Errorf("report %+v", rep)
	}
	// Once bound, the next plan does not probe it again.
	mem.Kernel = map[netip.Addr]bool{addr("203.0.113.10"): true}
	p, _ = Decide(mem, input(v, svc("web", "203.0.113.10", true, true)))
	if len(p.Probe) != 0 {
		t.Errorf("probed a held address again: %v", p.Probe)
	}
}

// Two Services of one namespace share an address (TCP and UDP): one group,
// one address Lease, both Service Leases, one holder.
func TestSharedAddressIsOneGroup(t *testing.T) {
	tcp, udp := svc("dns-tcp", "203.0.113.53", false, false), svc("dns-udp", "203.0.113.53", false, false)
	p, _ := Decide(Start(nil), input(view(), tcp, udp))
	if got, want := acquired(p), []string{"egressvip-dns-tcp", "egressvip-dns-udp", "egressvip.addr.203.0.113.53"}; !slices.Equal(got, want) {
		t.Errorf("acquire %v, want %v", got, want)
	}
	// Another node holds the address Lease: this node takes neither
	// Service, whatever their own Service Leases say.
	v := holds(view("node-b"), "node-b", nil, "203.0.113.53")
	p, _ = Decide(Start(nil), input(v, tcp, udp))
	if len(p.Acquire) != 0 || len(p.Bind) != 0 {
		t.Errorf("acquire %v bind %v while node-b holds the address", acquired(p), bound(p))
	}
	for _, k := range []string{"dns-tcp", "dns-udp"} {
		if d := p.Decisions[key(k)]; d.Holder != "node-b" || d.Reason != ReasonHeldElsewhere {
			t.Errorf("%s: %+v", k, d)
		}
	}
	// This node holds one Service Lease of the group (a split from a race
	// or an older release) but node-b the address: it releases its
	// Service Lease, never binds.
	v = holds(v, self, []string{"dns-udp"})
	p, _ = Decide(Start(nil), input(v, tcp, udp))
	if len(p.Bind) != 0 {
		t.Errorf("bound %v", bound(p))
	}
	mem, release, _ := Settle(Start(nil), p, t0, time.Second, 5*time.Second, Result{KernelKnown: true})
	_ = mem
	if !slices.Contains(release, svcLease("dns-udp")) {
		t.Errorf("release %v: the stray Service Lease goes", release)
	}
}

// Local policy, Services sharing an address with ready endpoints on
// disjoint nodes: one node serves the address (the oldest Service's), and
// the other Service gets a Warning.
func TestDisjointSharedAddressIsServedByOneNodeWithAWarning(t *testing.T) {
	older := svc("a", "203.0.113.7", true, false, "node-b")
	newer := svc("b", "203.0.113.7", true, false, self)
	newer.Created = older.Created.Add(time.Minute)
	p, _ := Decide(Start(nil), input(view("node-b"), older, newer))
	if d := p.Decisions[key("b")]; d.Reason != ReasonNotEligible || !slices.Equal(d.Eligible, []string{"node-b"}) {
		t.Errorf("decision %+v: only node-b (the older Service's) may hold it", d)
	}
	if len(p.Acquire) != 0 {
		t.Errorf("acquired %v", acquired(p))
	}
	// node-b reports; from node-b's view the Warning is raised on b.
	vb := view("node-a")
	vb.Self = "node-b"
	in := input(vb, older, newer)
	in.Node = "node-b"
	for i := range in.Services {
		for j := range in.Services[i].Endpoints {
			e := &in.Services[i].Endpoints[j]
			e.Local = e.Node == "node-b"
		}
	}
	p, _ = Decide(Start(nil), in)
	found := false
	for _, e := range p.Events {
		if e.Service == key("b") && e.Reason == EventSplit {
			found = true
		}
	}
	if !found {
		t.Errorf("no %s Warning on the Service left without its endpoints' node: %+v", EventSplit, p.Events)
	}
}

// Another node holds the address: this node's pods are steered there.
func TestPodsAreSteeredToTheHolder(t *testing.T) {
	s := svc("app", "203.0.113.20", false, true, self, "node-b")
	v := holds(view("node-b"), "node-b", []string{"app"}, "203.0.113.20")
	p, _ := Decide(Start(nil), input(v, s))
	if got := steerOf(p); !slices.Equal(got, []string{"10.244.1.5>node-b"}) {
		t.Fatalf("steer %v", got)
	}
	r := p.Datapath.Steer[0]
	if !slices.Equal(r.Via, []netip.Addr{addr("198.51.100.20")}) || r.Service != "default/app" {
		t.Errorf("steer rule %+v", r)
	}
	if len(p.Routes.Steer) != 1 || p.Steered != 1 {
		t.Errorf("routes %+v steered %d", p.Routes, p.Steered)
	}
	if len(p.Datapath.SNAT) != 0 {
		t.Errorf("snat %v on a node that does not hold the address", snatOf(p))
	}
	// The holder SNATs the pods steered to it once confirmed; an
	// unconfirmed one is held (dropped), never left to the node's NAT.
	s.Endpoints[1].Unverified = true // node-b's is index 1? sorted: local first
	v = holds(view("node-b"), self, []string{"app"}, "203.0.113.20")
	s2 := svc("app", "203.0.113.20", false, true, self, "node-b")
	p, _ = Decide(Start(nil), input(v, s2))
	if got := snatOf(p); !slices.Equal(got, []string{"10.244.1.5>203.0.113.20", "10.244.2.5>203.0.113.20(remote)"}) {
		t.Errorf("holder snat %v", got)
	}
	if rep := p.Reports[key("app")]; rep.Egress != "2" || rep.Steered != "1" {
		t.Errorf("report %+v: two egress pods, one steered", rep)
	}
	s2.Endpoints[1].Unverified = true
	p, _ = Decide(Start(nil), input(v, s2))
	if got := holdOf(p); !slices.Equal(got, []string{"10.244.2.5"}) {
		t.Errorf("hold %v: an unconfirmed remote pod is held on the holder", got)
	}
}

// An earlier release holds a Service Lease of the group: it binds on that
// alone, so this node neither binds nor steers to it.
func TestEarlierReleaseHoldingBlocks(t *testing.T) {
	s := svc("app", "203.0.113.21", false, true)
	v := view()
	v.Leases[svcLease("app")] = model.Lease{Kind: model.ServiceLease, Holder: "old-node", Writer: model.Legacy, Valid: true}
	p, _ := Decide(Start(nil), input(v, s))
	if d := p.Decisions[key("app")]; d.Reason != ReasonHeldByOlder || d.Holder != "old-node" {
		t.Errorf("decision %+v", d)
	}
	if len(p.Acquire)+len(p.Bind)+len(p.Datapath.Steer)+len(p.Datapath.SNAT) != 0 {
		t.Errorf("acquire %v bind %v steer %v snat %v", acquired(p), bound(p), steerOf(p), snatOf(p))
	}
	// Once it stops renewing (invalid), the Lease is taken in turn.
	lv := v.Leases[svcLease("app")]
	lv.Valid = false
	v.Leases[svcLease("app")] = lv
	p, _ = Decide(Start(nil), input(v, s))
	if !slices.Contains(acquired(p), "egressvip-app") {
		t.Errorf("acquire %v after the older holder expired", acquired(p))
	}
}

// Renewals overdue: a pinned group keeps what the kernel still holds
// (never re-added), another node could take the rest, so it goes.
func TestOverdueKeepsPinnedOnlyAndNeverReAdds(t *testing.T) {
	pinned := svc("pinned", "203.0.113.30", true, true)
	shared := svc("shared", "203.0.113.31", false, false)
	v := holds(view("node-b"), self, []string{"pinned", "shared"}, "203.0.113.30", "203.0.113.31")
	v.Overdue = true
	mem := Start([]netip.Addr{addr("203.0.113.30"), addr("203.0.113.31")})
	mem.Resumable = nil
	p, _ := Decide(mem, input(v, pinned, shared))
	if got := bound(p); !slices.Equal(got, []string{"203.0.113.30(keep)"}) {
		t.Errorf("bound %v: the pinned address is kept (keep-only), the other goes", got)
	}
	if d := p.Decisions[key("shared")]; d.Reason != ReasonOverdue {
		t.Errorf("shared: %+v", d)
	}
	if len(p.Probe) != 0 {
		t.Errorf("probe %v", p.Probe)
	}
	_, release, _ := Settle(mem, p, t0, time.Second, 5*time.Second, Result{KernelKnown: true, Kernel: []netip.Addr{addr("203.0.113.30")}})
	if slices.Contains(release, addrLease("203.0.113.30")) || !slices.Contains(release, addrLease("203.0.113.31")) {
		t.Errorf("release %v: the given-up address's Lease goes once the kernel let go, the kept one stays", release)
	}
}

// The kernel still holds the address after a failed removal: its Lease is
// not released.
func TestLeaseReleasedOnlyAfterTheKernelLetGo(t *testing.T) {
	s := svc("gone", "203.0.113.32", true, true, "node-b")
	v := holds(view("node-b"), self, []string{"gone"}, "203.0.113.32")
	mem := Start([]netip.Addr{addr("203.0.113.32")})
	mem.Resumable = nil
	p, _ := Decide(mem, input(v, s))
	if len(p.Bind) != 0 {
		t.Fatalf("bound %v without a local endpoint", bound(p))
	}
	_, release, _ := Settle(mem, p, t0, time.Second, 5*time.Second, Result{KernelKnown: true, Kernel: []netip.Addr{addr("203.0.113.32")},
		FailedAddrs: map[netip.Addr]error{addr("203.0.113.32"): fmt.Errorf("EBUSY")}})
	if len(release) != 0 {
		t.Errorf("released %v while the kernel holds the address", release)
	}
	_, release, _ = Settle(mem, p, t0, time.Second, 5*time.Second, Result{KernelKnown: true})
	if len(release) != 2 {
		t.Errorf("released %v once the kernel let go, want both Leases", release)
	}
}

// A Lease deleted by hand that this node holds stays held (no unbind) and
// is written again.
func TestDeletedLeaseIsRewrittenWithoutUnbinding(t *testing.T) {
	s := svc("web", "203.0.113.33", true, true)
	v := holds(view(), self, []string{"web"}, "203.0.113.33")
	lv := v.Leases[svcLease("web")]
	lv.Deleted = true
	v.Leases[svcLease("web")] = lv
	mem := Start([]netip.Addr{addr("203.0.113.33")})
	mem.Resumable = nil
	p, _ := Decide(mem, input(v, s))
	if got := bound(p); !slices.Equal(got, []string{"203.0.113.33"}) {
		t.Errorf("bound %v", got)
	}
	if got := acquired(p); !slices.Equal(got, []string{"egressvip-web"}) {
		t.Errorf("acquire %v: the deleted Lease is written again", got)
	}
}

// Another host announces an address while this node cannot renew its
// heartbeat (cut off from the API while its pod was rescheduled): it steps
// down at once and stays down until its heartbeat is sound again.
func TestConflictWhileOverdueStepsDown(t *testing.T) {
	s := svc("pinned", "203.0.113.34", true, true)
	v := holds(view(), self, []string{"pinned"}, "203.0.113.34")
	v.Overdue = true
	mem := Start([]netip.Addr{addr("203.0.113.34")})
	mem.Resumable = nil
	in := input(v, s)
	in.Conflicts = []Conflict{{Addr: addr("203.0.113.34"), MAC: "02:00:00:00:00:02", Probe: true, At: t0}}
	p, next := Decide(mem, in)
	if len(p.Bind) != 0 {
		t.Fatalf("bound %v after a conflict while overdue", bound(p))
	}
	if d := p.Decisions[key("pinned")]; d.Reason != ReasonSteppedDown {
		t.Errorf("decision %+v", d)
	}
	if !slices.ContainsFunc(p.Events, func(e Event) bool { return e.Reason == EventConflict && strings.Contains(e.Message, "stepping down") }) {
		t.Errorf("events %+v", p.Events)
	}
	// Still overdue: still down, without a new conflict.
	p, next = Decide(next, input(v, s))
	if len(p.Bind) != 0 {
		t.Errorf("bound %v again while still overdue", bound(p))
	}
	// Sound again: the election decides afresh.
	v.Overdue = false
	p, _ = Decide(next, input(v, s))
	if got := bound(p); !slices.Equal(got, []string{"203.0.113.34"}) {
		t.Errorf("bound %v once the heartbeat is sound", got)
	}
	// With a valid claim, a conflict is reported and the address kept.
	in = input(v, s)
	in.Conflicts = []Conflict{{Addr: addr("203.0.113.34"), MAC: "02:00:00:00:00:02", At: t0}}
	p, _ = Decide(mem, in)
	if got := bound(p); !slices.Equal(got, []string{"203.0.113.34"}) {
		t.Errorf("bound %v with a valid claim", got)
	}
}

// One group's apply fails: it backs off (not stood for, so its Leases go
// once its address is gone), the others are served as usual.
func TestFailingGroupBacksOffAlone(t *testing.T) {
	bad := svc("bad", "203.0.113.40", false, false)
	good := svc("good", "203.0.113.41", false, false)
	v := holds(view("node-b"), self, []string{"bad", "good"}, "203.0.113.40", "203.0.113.41")
	p, mem := Decide(Start(nil), input(v, bad, good))
	mem, _, _ = Settle(mem, p, t0, time.Second, 5*time.Second, Result{KernelKnown: true, Kernel: []netip.Addr{addr("203.0.113.41")},
		FailedAddrs: map[netip.Addr]error{addr("203.0.113.40"): fmt.Errorf("cannot assign requested address")}})
	p, _ = Decide(mem, input(v, bad, good))
	if got := bound(p); !slices.Equal(got, []string{"203.0.113.41"}) {
		t.Errorf("bound %v: only the good group", got)
	}
	if d := p.Decisions[key("bad")]; d.Reason != ReasonFailing {
		t.Errorf("bad: %+v", d)
	}
	if !slices.ContainsFunc(p.Events, func(e Event) bool { return e.Service == key("bad") && e.Reason == EventApplyFailed }) {
		t.Errorf("no %s on the failing Service: %+v", EventApplyFailed, p.Events)
	}
	_, release, _ := Settle(mem, p, t0, time.Second, 5*time.Second, Result{KernelKnown: true, Kernel: []netip.Addr{addr("203.0.113.41")}})
	if !slices.Contains(release, addrLease("203.0.113.40")) || slices.Contains(release, addrLease("203.0.113.41")) {
		t.Errorf("release %v: the failing group's Leases go (another node may try), the good one stays", release)
	}
	// After the back-off it is stood for again.
	v.Now = t0.Add(2 * time.Second)
	p, _ = Decide(mem, input(v, bad, good))
	if d := p.Decisions[key("bad")]; d.Reason == ReasonFailing {
		t.Errorf("still failing after the back-off: %+v", d)
	}
}

// A node whose serviceInterface is down does not stand.
func TestInterfaceDownDoesNotStand(t *testing.T) {
	in := input(view(), svc("web", "203.0.113.42", false, false))
	in.Host.Up = false
	p, _ := Decide(Start(nil), in)
	if len(p.Acquire) != 0 || len(p.Bind) != 0 {
		t.Errorf("acquire %v bind %v with the interface down", acquired(p), bound(p))
	}
}

// No holder: a strict Service's pods are held (dropped), the others keep
// the node's address; a pod of a Service that is starting here opens the
// gate.
func TestStrictHoldsAndTheGate(t *testing.T) {
	strict := svc("strict", "203.0.113.43", true, true, "node-b")
	strict.Strict = true
	strict.Endpoints = append(strict.Endpoints, model.Endpoint{Name: "new", Node: self, Local: true, V4: addr("10.244.1.9"), TargetKind: "Pod"})
	plain := svc("plain", "203.0.113.44", true, true, "node-b")
	plain.Endpoints = append(plain.Endpoints, model.Endpoint{Name: "new", Node: self, Local: true, V4: addr("10.244.1.10"), TargetKind: "Pod"})
	plain.PendingLocal = true
	in := input(view("node-b"), strict, plain)
	in.PodCIDRs = []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24")}
	in.KnownPods = []netip.Addr{addr("10.244.1.9"), addr("10.244.1.10")}
	p, _ := Decide(Start(nil), in)
	if got := holdOf(p); !slices.Equal(got, []string{"10.244.1.9"}) {
		t.Errorf("hold %v: the strict Service's local pod only", got)
	}
	if p.Datapath.Gate == nil || !slices.Equal(p.Datapath.Gate.Known, in.KnownPods) {
		t.Errorf("gate %+v: a pod starting here opens it", p.Datapath.Gate)
	}
}

// The address is being taken (Lease writes under way): this node's pods
// are SNATed already, and the fence drops their traffic until it is
// bound, so none leaves with the node's address.
func TestAcquiringSNATsBehindTheFence(t *testing.T) {
	s := svc("web", "203.0.113.45", true, true)
	p, _ := Decide(Start(nil), input(view(), s))
	if got := snatOf(p); !slices.Equal(got, []string{"10.244.1.5>203.0.113.45"}) || len(p.Bind) != 0 {
		t.Errorf("snat %v bind %v", got, bound(p))
	}
	if !slices.Equal(p.Datapath.Fenced, []netip.Addr{addr("203.0.113.45")}) {
		t.Errorf("fenced %v", p.Datapath.Fenced)
	}
}

// An address given up keeps the SNAT rules of the pods steered here for
// the grace period (fenced: dropped), then they go.
func TestGivenUpAddressDrainsSteeredPods(t *testing.T) {
	s := svc("app", "203.0.113.46", true, true, "node-b", "node-c")
	// This node has no endpoint any more; node-b holds now.
	v := holds(view("node-b", "node-c"), "node-b", []string{"app"}, "203.0.113.46")
	mem := Start([]netip.Addr{addr("203.0.113.46")})
	mem.Resumable = nil
	p, mem := Decide(mem, input(v, s))
	if got := snatOf(p); !slices.Equal(got, []string{"10.244.1.5>203.0.113.46(remote)", "10.244.2.5>203.0.113.46(remote)"}) {
		t.Fatalf("snat %v: the steered pods' rules stay while the address is still here", got)
	}
	mem, _, _ = Settle(mem, p, t0, time.Second, 5*time.Second, Result{KernelKnown: true})
	v.Now = t0.Add(time.Second)
	p, mem = Decide(mem, input(v, s))
	if got := snatOf(p); len(got) != 2 || !slices.Contains(p.Datapath.Fenced, addr("203.0.113.46")) {
		t.Errorf("snat %v fenced %v during the grace", got, p.Datapath.Fenced)
	}
	v.Now = t0.Add(10 * time.Second)
	p, _ = Decide(mem, input(v, s))
	if got := snatOf(p); len(got) != 0 {
		t.Errorf("snat %v after the grace", got)
	}
}

// An allow-list of the other family only: that family is not egressed.
func TestAllowListOfTheOtherFamilyEgressesNothing(t *testing.T) {
	s := svc("web", "203.0.113.47", true, true)
	s.Filter = model.Filter{Allow: []netip.Prefix{netip.MustParsePrefix("2001:db8::/32")},
		Ports: []annotations.DestinationPort{{Protocol: annotations.UDP, Port: 53}}}
	v := holds(view(), self, []string{"web"}, "203.0.113.47")
	p, _ := Decide(Start(nil), input(v, s))
	if got := snatOf(p); len(got) != 0 {
		t.Errorf("snat %v: IPv4 allows nothing", got)
	}
}

// Shutdown keeps pinned egress groups (their Leases, addresses, rules) and
// releases everything else once the kernel let go.
func TestDrainKeepsPinnedEgressAndReleasesTheRest(t *testing.T) {
	pinned := svc("pinned", "203.0.113.50", true, true)
	shared := svc("shared", "203.0.113.51", false, false)
	v := holds(view("node-b"), self, []string{"pinned", "shared"}, "203.0.113.50", "203.0.113.51")
	mem := Start([]netip.Addr{addr("203.0.113.50"), addr("203.0.113.51")})
	p := Drain(mem, input(v, pinned, shared))
	if got := bound(p); !slices.Equal(got, []string{"203.0.113.50(keep)"}) {
		t.Errorf("bound %v", got)
	}
	if got := snatOf(p); !slices.Equal(got, []string{"10.244.1.5>203.0.113.50"}) {
		t.Errorf("snat %v", got)
	}
	_, release, _ := Settle(mem, p, t0, time.Second, 5*time.Second, Result{KernelKnown: true, Kernel: []netip.Addr{addr("203.0.113.50")}})
	if want := []types.NamespacedName{svcLease("shared"), addrLease("203.0.113.51")}; !sameSet(release, want) {
		t.Errorf("release %v, want %v", release, want)
	}
	// A failed removal keeps the Lease.
	_, release, _ = Settle(mem, p, t0, time.Second, 5*time.Second, Result{KernelKnown: true, Kernel: []netip.Addr{addr("203.0.113.50"), addr("203.0.113.51")}})
	if len(release) != 0 {
		t.Errorf("release %v while the kernel still holds the shared address", release)
	}
}

func sameSet(a, b []types.NamespacedName) bool {
	x, y := slices.Clone(a), slices.Clone(b)
	cmp := func(p, q types.NamespacedName) int { return strings.Compare(p.String(), q.String()) }
	slices.SortFunc(x, cmp)
	slices.SortFunc(y, cmp)
	return slices.Equal(x, y)
}

// Candidates wait their turn in rank order; the first acquires at once.
func TestTurnsFollowTheRank(t *testing.T) {
	s := svc("web", "203.0.113.60", false, false)
	rank := election.Rank("203.0.113.60", []string{self, "node-b"})
	p, mem := Decide(Start(nil), input(view("node-b"), s))
	if rank[0] == self {
		if len(p.Acquire) == 0 {
			t.Errorf("first in rank did not acquire")
		}
		return
	}
	if len(p.Acquire) != 0 || p.Wake != t0.Add(time.Second) {
		t.Errorf("second in rank: acquire %v wake %s", acquired(p), p.Wake)
	}
	v := view("node-b")
	v.Now = t0.Add(time.Second)
	p, _ = Decide(mem, input(v, s))
	if len(p.Acquire) == 0 {
		t.Errorf("second in rank did not acquire after its turn")
	}
}

// A new process that finds an address bound takes its Leases back at once
// and keeps it (no probe: it is its own).
func TestRestartResumes(t *testing.T) {
	s := svc("web", "203.0.113.61", true, true)
	p, _ := Decide(Start([]netip.Addr{addr("203.0.113.61")}), input(view("node-b"), s))
	if got := bound(p); !slices.Equal(got, []string{"203.0.113.61(keep)"}) || len(p.Probe) != 0 {
		t.Errorf("bound %v probe %v", got, p.Probe)
	}
	if len(p.Acquire) != 2 {
		t.Errorf("acquire %v", acquired(p))
	}
}

// A singleton Lease (the allocator's, svc_election=false's) is acquired in
// turn, then reported as elected; a valid other holder keeps it.
func TestSingletons(t *testing.T) {
	lease := types.NamespacedName{Namespace: daemonNS, Name: "egressvip.allocator"}
	rank := election.Rank(lease.String(), []string{self, "node-b"})
	in := input(view("node-b"))
	in.Singletons = []types.NamespacedName{lease}
	p, mem := Decide(Start(nil), in)
	first := slices.ContainsFunc(p.Acquire, func(c model.Claim) bool { return c.Lease == lease })
	if first != (rank[0] == self) {
		t.Fatalf("acquire %v with rank %v", acquired(p), rank)
	}
	if !first {
		in.Election.Now = t0.Add(time.Second)
		p, _ = Decide(mem, in)
		if !slices.ContainsFunc(p.Acquire, func(c model.Claim) bool { return c.Lease == lease }) {
			t.Fatalf("second in rank did not acquire after its turn: %v", acquired(p))
		}
	}
	in = input(view("node-b"))
	in.Singletons = []types.NamespacedName{lease}
	in.Election.Leases[lease] = model.Lease{Kind: model.GlobalLease, Holder: self, Current: true, Valid: true}
	if p, _ := Decide(Start(nil), in); !p.Elected[lease] || len(p.Acquire) != 0 {
		t.Errorf("elected %v acquire %v", p.Elected, acquired(p))
	}
	in.Election.Leases[lease] = model.Lease{Kind: model.GlobalLease, Holder: "node-b", Valid: true}
	if p, _ := Decide(Start(nil), in); p.Elected[lease] || len(p.Acquire) != 0 {
		t.Errorf("elected %v acquire %v while node-b holds it", p.Elected, acquired(p))
	}
}

// svc_election=false: only the global Lease's holder holds addresses.
func TestGlobalLeaseHolderHoldsEverything(t *testing.T) {
	global := types.NamespacedName{Namespace: daemonNS, Name: "egressvip.services"}
	in := input(view("node-b"), svc("web", "203.0.113.70", false, false))
	in.Global = &global
	in.Election.Leases[global] = model.Lease{Kind: model.GlobalLease, Holder: "node-b", Valid: true}
	p, _ := Decide(Start(nil), in)
	if len(p.Acquire) != 0 || len(p.Bind) != 0 {
		t.Errorf("acquire %v bind %v while node-b holds the global Lease", acquired(p), bound(p))
	}
	in.Election.Leases[global] = model.Lease{Kind: model.GlobalLease, Holder: self, Current: true, Valid: true}
	p, _ = Decide(Start(nil), in)
	if !slices.Contains(acquired(p), "egressvip.addr.203.0.113.70") {
		t.Errorf("acquire %v as the global holder", acquired(p))
	}
}

// Holding part of a group while the rest is written (the Service Lease
// returned before the address Lease): nothing is released.
func TestPartlyHeldWhileAcquiringIsNotReleased(t *testing.T) {
	s := svc("web", "203.0.113.71", false, false)
	v := holds(view(), self, []string{"web"})
	p, mem := Decide(Start(nil), input(v, s))
	if d := p.Decisions[key("web")]; d.Reason != ReasonAcquiring {
		t.Fatalf("decision %+v", d)
	}
	if got := acquired(p); !slices.Equal(got, []string{"egressvip.addr.203.0.113.71"}) {
		t.Errorf("acquire %v: the missing address Lease only", got)
	}
	if _, release, _ := Settle(mem, p, t0, time.Second, 5*time.Second, Result{KernelKnown: true}); len(release) != 0 {
		t.Errorf("released %v while acquiring the rest", release)
	}
}

// The serviceInterface goes down: what the node holds stays for the grace
// (a flap must not move the address), nothing new is taken, and after the
// grace it is given up.
func TestInterfaceDownKeepsHoldingsForTheGrace(t *testing.T) {
	s := svc("web", "203.0.113.72", false, false)
	v := holds(view("node-b"), self, []string{"web"}, "203.0.113.72")
	in := input(v, s)
	in.Host.Up = false
	in.InterfaceGrace = 3 * time.Second
	mem := Start([]netip.Addr{addr("203.0.113.72")})
	mem.Resumable = nil
	p, mem := Decide(mem, in)
	if got := bound(p); !slices.Equal(got, []string{"203.0.113.72"}) {
		t.Errorf("bound %v during the grace", got)
	}
	in.Election.Now = t0.Add(4 * time.Second)
	p, _ = Decide(mem, in)
	if len(p.Bind) != 0 {
		t.Errorf("bound %v after the grace", bound(p))
	}
	in = input(view(), svc("new", "203.0.113.73", false, false))
	in.Host.Up = false
	if p, _ := Decide(Start(nil), in); len(p.Acquire) != 0 {
		t.Errorf("acquire %v with the interface down", acquired(p))
	}
}

// A pinned group whose address Lease is written and whose Service Lease is
// not yet: nothing new is bound and no Service is said to be served (its
// Event would claim an address the kernel does not hold); once both are
// written, it is bound and the Event says so.
func TestHalfWrittenAcquisitionServesNothing(t *testing.T) {
	s := svc("web", "203.0.113.72", true, true)
	_, mem := Decide(Start(nil), input(view(), s))
	p, mem := Decide(mem, input(holds(view(), self, nil, "203.0.113.72"), s))
	for _, b := range p.Bind {
		if !b.KeepOnly {
			t.Errorf("bound %v with the Service Lease unwritten", bound(p))
		}
	}
	if got := acquired(p); !slices.Equal(got, []string{"egressvip-web"}) {
		t.Errorf("acquire %v, want the Service Lease", got)
	}
	for _, e := range p.Events {
		if e.Reason == EventBound {
			t.Errorf("event %+v before anything is bound", e)
		}
	}
	p, _ = Decide(mem, input(holds(view(), self, []string{"web"}, "203.0.113.72"), s))
	if got := bound(p); !slices.Equal(got, []string{"203.0.113.72"}) {
		t.Fatalf("bound %v once both Leases are written", got)
	}
	var got []string
	for _, e := range p.Events {
		if e.Reason == EventBound {
			got = append(got, e.Message)
		}
	}
	if want := []string{"node " + self + " serves 203.0.113.72 (" + ReasonHolder + ")"}; !slices.Equal(got, want) {
		t.Errorf("events %q, want %q", got, want)
	}
}

// kube-vip.io/flush-conntrack: "false" reaches the datapath rules of the
// Service's pods.
func TestFlushConntrackFalseKeepsEntries(t *testing.T) {
	s := svc("web", "203.0.113.73", true, true)
	s.FlushConntrack = false
	p, _ := Decide(Start(nil), input(holds(view(), self, []string{"web"}, "203.0.113.73"), s))
	if len(p.Datapath.SNAT) != 1 || !p.Datapath.SNAT[0].KeepConntrack {
		t.Errorf("SNAT rules %+v: want one that keeps the conntrack entries", p.Datapath.SNAT)
	}
	s.FlushConntrack = true
	p, _ = Decide(Start(nil), input(holds(view(), self, []string{"web"}, "203.0.113.73"), s))
	if len(p.Datapath.SNAT) != 1 || p.Datapath.SNAT[0].KeepConntrack {
		t.Errorf("SNAT rules %+v: want one that flushes", p.Datapath.SNAT)
	}
}
