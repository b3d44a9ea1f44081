// Package plan makes every decision of one sync as a pure function: from
// the previous sync's memory, the cluster view (analysed Services), the
// election view, what the wire said and the time, to the node state to
// program (addresses, firewall rules, routes), the Leases to acquire,
// release and delete, the reports and Events, and the next memory
// (Decide). The results of applying it are folded back by Settle, and
// shutdown is planned by Drain. The controller (pkg/node) only snapshots,
// plans, applies and emits, so each decision is table-tested here with the
// reason it gives, like MetalLB's ShouldAnnounce.
//
// The rule that keeps an address on one node at any moment: a node binds
// an address only while it holds the address's Lease in the current
// heartbeat epoch and every Service Lease of the Services claiming it (so
// that no daemon of an earlier release, which elects per Service, can hold
// one of them), and nobody answered for the address on the wire when it
// probed; it releases a Lease only once the kernel no longer holds what the
// Lease guards. The kernel itself forgets an address whose lifetime the
// daemon stopped refreshing, and drops SNATed traffic whose source address
// is not bound (the fence), so a dead or frozen daemon's holdings end
// before any other node may take them.
package plan

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/types"

	"github.com/egressvip/egressvip/pkg/election"
	"github.com/egressvip/egressvip/pkg/model"
)

// Reasons a node does or does not hold a group's addresses.
const (
	ReasonHolder        = "holder"
	ReasonResuming      = "resuming"
	ReasonKept          = "keptWhileAPIUnreachable"
	ReasonOverdue       = "heartbeatRenewalOverdue"
	ReasonHeldElsewhere = "heldByAnotherNode"
	ReasonHeldByOlder   = "heldByAnEarlierRelease"
	ReasonAcquiring     = "acquiring"
	ReasonWaitingTurn   = "waitingForTurn"
	ReasonNotCandidate  = "notCandidate"
	ReasonNotEligible   = "noLocalReadyEndpoint"
	ReasonInterface     = "interfaceUnavailable"
	ReasonFailing       = "applyFailing"
	ReasonSteppedDown   = "steppedDown"
	ReasonAddressInUse  = "addressInUse"
	ReasonNotHolder     = "notHolder"
)

// Event reasons the planner raises.
const (
	EventBound             = "EgressVIPBound"
	EventReleased          = "EgressVIPReleased"
	EventInterfaceNotFound = "InterfaceNotFound"
	EventSplit             = "AddressSharedAcrossNodes"
	EventApplyFailed       = "ApplyFailed"
	EventConflict          = "AddressConflict"
	EventInUse             = "AddressInUse"
	EventSteeringFailed    = "SteeringFailed"
)

// Input is one sync's picture.
type Input struct {
	Node string
	// Services are every Service this node serves, analysed and admitted,
	// sorted by key.
	Services []model.Service
	Election model.ElectionView
	// DaemonNamespace holds the address Leases and the global Lease.
	DaemonNamespace string
	// Global, when set, is the one Lease of svc_election=false: only its
	// holder holds addresses.
	Global *types.NamespacedName
	// Singletons are Leases in the daemon's namespace that elect one node
	// for a task (the global Lease, the address allocator): acquired in
	// turn by the first node in rank, held while its heartbeat is valid.
	Singletons []types.NamespacedName
	// RetryPeriod separates the turns of the candidates for a free
	// address; Grace is how long remote pods' SNAT rules of an address
	// just given up stay (dropped by the fence) while the other nodes'
	// steering catches up.
	RetryPeriod time.Duration
	Grace       time.Duration
	// Settle is how long a transient problem must last to be reported.
	Settle time.Duration
	// Exclude are destinations never SNATed, steered or held.
	Exclude []netip.Prefix
	// Host is the serviceInterface; InterfaceErr why it cannot be used.
	// While it is down this node stands for nothing new, and keeps what it
	// holds for InterfaceGrace (a link that flaps must not move every
	// address); after that it gives it up, so another node serves it.
	Host           model.Host
	InterfaceErr   string
	InterfaceGrace time.Duration
	// Conflicts are what the wire said since the last plan: another host
	// announced or probed an address this node holds.
	Conflicts []Conflict
	// Tunnel, when set, steers through egressvip's VXLAN device.
	Tunnel *model.Tunnel
	// PodCIDRs are this node's pod ranges and KnownPods the addresses of
	// every pod of it: the gate holds back unknown ones while a selected
	// pod starts.
	PodCIDRs  []netip.Prefix
	KnownPods []netip.Addr
}

// Conflict is a frame from another host that claimed or probed an address
// this node holds.
type Conflict struct {
	Addr  netip.Addr
	MAC   string
	Probe bool
	At    time.Time
}

// Memory is what one sync leaves to the next.
type Memory struct {
	// Kernel are the owned addresses the kernel holds after the last
	// apply (failed removals included).
	Kernel map[netip.Addr]bool
	// Programmed are the Services whose firewall rules or routes the
	// kernel may still hold.
	Programmed map[types.NamespacedName]bool
	// Served is the last plan's served Services, for Events on change.
	Served map[types.NamespacedName]bool
	// Resumable are addresses found bound at start-up, until the
	// election has decided about them.
	Resumable map[netip.Addr]bool
	// FreeSince is when each group (by key) was first seen free.
	FreeSince map[string]time.Time
	// Failing are groups whose apply failed, by key, with back-off.
	Failing map[string]Failure
	// Busy are addresses another host answered for when probed, until
	// when to probe again.
	Busy map[netip.Addr]time.Time
	// SteppedDown are groups this node gave up because the wire showed
	// another holder while its own claim was not valid; until its
	// heartbeat is sound again.
	SteppedDown map[string]bool
	// Drained are addresses given up recently: the SNAT rules of the
	// pods steered here stay (the fence drops their traffic) until the
	// time, so that nothing steered here leaves with a node's address.
	Drained map[netip.Addr]Drained
	// Reported are the reasons of the Warning Events raised per Service
	// that still last: each is raised once while it lasts.
	Reported map[types.NamespacedName]map[string]bool
	// TransientSince is when each transient problem was first seen.
	TransientSince map[string]time.Time
	// DownSince is when the serviceInterface was first seen down (zero
	// while it is up).
	DownSince time.Time
	// Initialized is false until the first plan: a new process raises no
	// Events for what it finds it already serves.
	Initialized bool
}

// Failure is a group whose apply failed.
type Failure struct {
	Attempts int
	Until    time.Time
	Message  string
}

// Drained is an address given up with the rules that stay until Until.
type Drained struct {
	Until time.Time
	Rules []model.SNATRule
}

// Start is the memory of a new process that found addrs bound.
func Start(addrs []netip.Addr) Memory {
	m := Memory{Resumable: map[netip.Addr]bool{}, Kernel: map[netip.Addr]bool{}, Programmed: map[types.NamespacedName]bool{}}
	for _, a := range addrs {
		m.Resumable[a] = true
		m.Kernel[a] = true
	}
	return m
}

// Decision is the outcome for one group (and each of its Services).
type Decision struct {
	// Holder is the node that holds the group's addresses ("" if none).
	Holder string
	// Own: this node binds the group's addresses.
	Own bool
	// Leader: this node holds the group soundly and reports on its
	// Services.
	Leader bool
	Reason string
	// Eligible are the nodes that may hold the group, in rank order.
	Eligible []string
}

// Event is a Kubernetes Event to raise on a Service.
type Event struct {
	Service types.NamespacedName
	Warning bool
	Reason  string
	Message string
}

// Report is what the holder writes on a Service.
type Report struct {
	Ingress            []string
	VIPHost            string
	ActiveEndpoint     string
	ActiveEndpointIPv6 string
	// Egress and Steered count the Service's egress pods and those of
	// them on other nodes, steered to this one ("" when not egressing).
	Egress, Steered string
}

// Equal reports whether two reports are the same.
func (r Report) Equal(o Report) bool {
	return slices.Equal(r.Ingress, o.Ingress) && r.VIPHost == o.VIPHost && r.ActiveEndpoint == o.ActiveEndpoint &&
		r.ActiveEndpointIPv6 == o.ActiveEndpointIPv6 && r.Egress == o.Egress && r.Steered == o.Steered
}

// Plan is what a sync does.
type Plan struct {
	// Decisions are per Service (the group's decision).
	Decisions map[types.NamespacedName]Decision
	// Bind are the addresses the kernel should hold; Probe those of them
	// to ask the wire about first (new acquisitions).
	Bind  []model.Binding
	Probe []netip.Addr
	// Datapath and Routes are the firewall rules and routes.
	Datapath model.Datapath
	Routes   model.Routes
	// Acquire, Release and Delete are Lease writes. Releases are decided
	// by Settle (only once the kernel let go).
	Acquire []model.Claim
	Delete  []types.NamespacedName
	// Reports are what this node writes on the Services it leads.
	Reports map[types.NamespacedName]Report
	Events  []Event
	// Wake is when to plan again at the latest (zero: no need).
	Wake time.Time
	// Elected are the Singletons this node holds soundly now.
	Elected map[types.NamespacedName]bool
	// Steered counts the local pods steered to another node (a gauge);
	// Conflicts the frames from other hosts claiming held addresses.
	Steered, Conflicts int
	// releasable are the Leases this node holds but wants no more, with
	// the addresses they guard: Settle releases those the kernel let go.
	releasable map[types.NamespacedName][]netip.Addr
	// groupOf maps Services and addresses to their group key, for Settle.
	groupOf map[string]string
	// owned are the Services with rules or routes in this plan.
	owned map[types.NamespacedName]bool
	// drained are the addresses given up by this plan (Settle starts
	// their grace once the kernel let go).
	drained map[netip.Addr][]model.SNATRule
}

// Decide plans one sync.
func Decide(mem Memory, in Input) (Plan, Memory) {
	d := decider{in: in, mem: mem, ev: in.Election, now: in.Election.Now}
	d.next = Memory{
		Kernel:         mem.Kernel,
		Programmed:     mem.Programmed,
		Served:         map[types.NamespacedName]bool{},
		Resumable:      map[netip.Addr]bool{},
		FreeSince:      map[string]time.Time{},
		Failing:        map[string]Failure{},
		Busy:           map[netip.Addr]time.Time{},
		SteppedDown:    map[string]bool{},
		Drained:        map[netip.Addr]Drained{},
		Reported:       map[types.NamespacedName]map[string]bool{},
		TransientSince: map[string]time.Time{},
		Initialized:    true,
	}
	if !in.Host.Up {
		d.next.DownSince = mem.DownSince
		if d.next.DownSince.IsZero() {
			d.next.DownSince = in.Election.Now
		}
		d.wake(d.next.DownSince.Add(in.InterfaceGrace))
	}
	d.p = Plan{
		Decisions:  make(map[types.NamespacedName]Decision, len(in.Services)),
		Reports:    map[types.NamespacedName]Report{},
		releasable: map[types.NamespacedName][]netip.Addr{},
		groupOf:    map[string]string{},
		owned:      map[types.NamespacedName]bool{},
		drained:    map[netip.Addr][]model.SNATRule{},
	}
	d.carry()
	d.conflicts()
	d.singletons()
	gs := groups(in.Services)
	covered := map[types.NamespacedName]bool{}
	for _, g := range gs {
		d.group(g, covered)
	}
	d.strays(covered)
	d.drainedRules()
	d.finish()
	d.p.Events = append(d.p.Events, d.events()...)
	return d.p, d.next
}

// decider carries one Decide call.
type decider struct {
	in   Input
	mem  Memory
	next Memory
	ev   model.ElectionView
	now  time.Time
	p    Plan
	// snat, steer, hold collect the datapath.
	snat  []model.SNATRule
	steer []model.SteerRule
	hold  []model.HoldRule
	gate  bool
	// problems are planner-found problems per Service.
	problems map[types.NamespacedName][]model.Problem
}

func (d *decider) wake(t time.Time) {
	if d.p.Wake.IsZero() || t.Before(d.p.Wake) {
		d.p.Wake = t
	}
}

func (d *decider) problem(s types.NamespacedName, reason, msg string) {
	if d.problems == nil {
		d.problems = map[types.NamespacedName][]model.Problem{}
	}
	d.problems[s] = append(d.problems[s], model.Problem{Reason: reason, Message: msg})
}

// carry keeps the memories that outlive one plan while they last.
func (d *decider) carry() {
	for k, f := range d.mem.Failing {
		d.next.Failing[k] = f
	}
	for a, until := range d.mem.Busy {
		if d.now.Before(until) {
			d.next.Busy[a] = until
			d.wake(until)
		}
	}
	for a, dr := range d.mem.Drained {
		if d.now.Before(dr.Until) {
			d.next.Drained[a] = dr
			d.wake(dr.Until)
		}
	}
	// A stepped-down group stays down until this node's heartbeat is
	// sound again: then the election decides afresh.
	if d.ev.Overdue || !d.ev.Established {
		for k := range d.mem.SteppedDown {
			d.next.SteppedDown[k] = true
		}
	}
}

// conflicts handles what the wire said. Another host announcing or
// probing an address this node holds while this node's own claim is not
// valid (its heartbeat renewal is overdue: others may have seen it expire
// and taken the address, as a node cut off from the API while its pod is
// rescheduled) makes it step down at once. With a valid claim it keeps the
// address; the Event says that another host claims it.
func (d *decider) conflicts() {
	for _, c := range d.in.Conflicts {
		if !d.mem.Kernel[c.Addr] {
			continue
		}
		what := "announced"
		if c.Probe {
			what = "probed for"
		}
		msg := fmt.Sprintf("host %s %s %s, which node %s holds; keeping it", c.MAC, what, c.Addr, d.in.Node)
		if d.ev.Overdue || !d.ev.Established {
			d.next.SteppedDown[c.Addr.String()] = true
			msg = fmt.Sprintf("host %s %s %s while node %s could not renew its heartbeat: stepping down", c.MAC, what, c.Addr, d.in.Node)
		}
		d.p.Conflicts++
		for i := range d.in.Services {
			s := &d.in.Services[i]
			if slices.Contains(s.Addresses(), c.Addr) {
				d.p.Events = append(d.p.Events, Event{Service: s.Key, Warning: true, Reason: EventConflict, Message: msg})
			}
		}
	}
}

// leaseState summarises a group's Leases for this node.
type leaseState struct {
	// authority is the node whose holding decides (the holder of the
	// group's first address Lease, else of any), "" if none is valid.
	authority string
	// foreign is a valid holder of an earlier release holding a Service
	// Lease of the group (it binds on that alone).
	foreign string
	// selfAll: this node holds every Lease of the group, selfCurrent:
	// every one of them in the current epoch.
	selfAll, selfCurrent, selfAny bool
	pending                       bool
	// free: no Lease of the group names a valid holder.
	free bool
}

func (d *decider) leases(g *group) leaseState {
	st := leaseState{selfAll: true, selfCurrent: true, free: true}
	self := d.ev.Self
	check := func(key types.NamespacedName, authority bool) {
		lv := d.ev.Leases[key]
		st.pending = st.pending || lv.Pending
		if lv.Holder == self {
			st.selfAny = true
			st.selfCurrent = st.selfCurrent && lv.Current
			if authority && st.authority == "" {
				st.authority = self
			}
		} else {
			st.selfAll, st.selfCurrent = false, false
		}
		if lv.Holder == "" || !lv.Valid || lv.Holder == self {
			return
		}
		st.free = false
		if lv.Kind == model.ServiceLease && lv.Writer != model.Current && st.foreign == "" {
			st.foreign = lv.Holder
		}
		if authority && st.authority == "" {
			st.authority = lv.Holder
		}
	}
	for _, a := range g.addrs {
		check(addressLease(d.in.DaemonNamespace, a), true)
	}
	for _, s := range g.services {
		check(election.ServiceLeaseKey(s.Key), false)
	}
	if st.authority == "" {
		// No valid address Lease: a current node's Service Lease of the
		// group names the holder (an address Lease deleted by hand).
		for _, s := range g.services {
			lv := d.ev.Leases[election.ServiceLeaseKey(s.Key)]
			if lv.Valid && lv.Writer == model.Current && lv.Holder != "" {
				st.authority = lv.Holder
				break
			}
		}
	}
	if st.foreign != "" {
		st.authority = st.foreign
	}
	return st
}

// singletons elects one node per Singleton Lease: a valid holder keeps it;
// a free (or expired) one is acquired by the first candidate in rank, the
// others a retry period per place later. Any live node may hold one,
// whatever its serviceInterface (the allocator needs none).
func (d *decider) singletons() {
	self := d.ev.Self
	var candidates []string
	for n, p := range d.ev.Peers {
		if p.Candidate && p.Version >= election.ProtocolVersion {
			candidates = append(candidates, n)
		}
	}
	if d.ev.Candidate(self) {
		candidates = append(candidates, self)
	}
	slices.Sort(candidates)
	for _, key := range d.in.Singletons {
		lv := d.ev.Leases[key]
		switch {
		case lv.Holder == self && lv.Current && d.ev.Live(self):
			if d.p.Elected == nil {
				d.p.Elected = map[types.NamespacedName]bool{}
			}
			d.p.Elected[key] = true
			continue
		case lv.Holder != "" && lv.Holder != self && lv.Valid, lv.Pending:
			continue
		case !d.ev.Candidate(self):
			continue
		}
		fk := "lease:" + key.String()
		since, ok := d.mem.FreeSince[fk]
		if !ok {
			since = d.now
		}
		d.next.FreeSince[fk] = since
		at := since.Add(time.Duration(slices.Index(election.Rank(key.String(), candidates), self)) * d.in.RetryPeriod)
		if lv.Holder == self || !d.now.Before(at) {
			d.p.Acquire = append(d.p.Acquire, model.Claim{Lease: key, Kind: model.GlobalLease})
		} else {
			d.wake(at)
		}
	}
}

// candidates are the nodes that may acquire now, self included when it
// may.
func (d *decider) candidates() []string {
	var out []string
	for n, p := range d.ev.Peers {
		if p.Candidate && p.Version >= election.ProtocolVersion {
			out = append(out, n)
		}
	}
	if d.ev.Candidate(d.ev.Self) && d.in.Host.Up {
		out = append(out, d.ev.Self)
	}
	if d.in.Global != nil {
		// svc_election=false: the global Lease's holder is the only
		// candidate.
		lv := d.ev.Leases[*d.in.Global]
		out = slices.DeleteFunc(out, func(n string) bool { return n != lv.Holder || !lv.Valid })
	}
	slices.Sort(out)
	return out
}

// group decides one group.
func (d *decider) group(g *group, covered map[types.NamespacedName]bool) {
	self := d.ev.Self
	for _, a := range g.addrs {
		covered[addressLease(d.in.DaemonNamespace, a)] = true
		d.p.groupOf[a.String()] = g.key
	}
	for _, s := range g.services {
		covered[election.ServiceLeaseKey(s.Key)] = true
		d.p.groupOf[s.Key.String()] = g.key
	}
	st := d.leases(g)
	eligible, split := g.eligible(d.candidates())
	eligible = election.Rank(g.key, eligible)
	if split {
		for _, s := range g.services {
			if !s.ReadyOn(firstOr(eligible, "")) {
				d.problem(s.Key, EventSplit, fmt.Sprintf("the Services sharing %s have ready endpoints on different nodes; %s is served by one node (%s), where this Service has no ready endpoint: its inbound traffic is not served",
					joinAddrs(g.addrs), joinAddrs(g.addrs), firstOr(eligible, "none")))
			}
		}
	}
	resuming := d.resuming(g)
	failing, isFailing := d.next.Failing[g.key]
	if isFailing && !d.now.Before(failing.Until) {
		isFailing = false
	}
	if isFailing {
		d.wake(failing.Until)
	}
	stepped := d.next.SteppedDown[g.key] || slices.ContainsFunc(g.addrs, func(a netip.Addr) bool { return d.next.SteppedDown[a.String()] })
	if stepped {
		d.next.SteppedDown[g.key] = true
	}
	selfEligible := slices.Contains(eligible, self) && !isFailing && !stepped
	pinned := g.pinned(self)

	dec := Decision{Eligible: eligible}
	own, keepOnly := false, false
	switch {
	case st.foreign != "":
		dec.Reason, dec.Holder = ReasonHeldByOlder, st.foreign
	case st.authority != "" && st.authority != self:
		dec.Reason, dec.Holder = ReasonHeldElsewhere, st.authority
	case stepped:
		dec.Reason = ReasonSteppedDown
	case !d.in.Host.Up && st.selfAll && st.selfCurrent && d.now.Before(d.next.DownSince.Add(d.in.InterfaceGrace)):
		// A flap: keep it for the grace.
		own = true
		dec.Reason, dec.Holder = ReasonInterface, self
	case !d.in.Host.Up:
		dec.Reason = ReasonInterface
	case isFailing:
		dec.Reason = ReasonFailing
	case st.selfAny && (d.ev.Overdue || !st.selfCurrent) && pinned:
		// Renewals failing, or holdings not yet confirmed after a
		// heartbeat gap: no other node could serve the group, so none
		// takes it; keep what the kernel still holds, and confirm the
		// holdings (written again with the resourceVersion this node
		// last saw, so a takeover meanwhile wins) once renewals work.
		own, keepOnly = true, true
		dec.Reason, dec.Holder = ReasonKept, self
		if !d.ev.Overdue && d.ev.Established && !d.ev.Draining && !st.pending {
			d.acquire(g, st)
		}
	case st.selfAny && d.ev.Overdue:
		// Another node could serve it: give the addresses up before
		// the heartbeat can expire and that node take them.
		dec.Reason = ReasonOverdue
	case !selfEligible && !(resuming && st.free):
		dec.Reason = ReasonNotEligible
		if !slices.Contains(eligible, self) && !d.ev.Candidate(self) {
			dec.Reason = ReasonNotCandidate
		}
	case st.selfAll && st.selfCurrent:
		own = true
		dec.Reason, dec.Holder, dec.Leader = ReasonHolder, self, true
		// A Service deleted and created again must be the owner of its
		// Lease, or the garbage collector removes it.
		if d.ev.Established && !d.ev.Overdue && !d.ev.Draining {
			d.acquire(g, st)
		}
	case resuming && st.free:
		// This node still has the addresses from before a restart:
		// taking the Leases back at once keeps them where they are.
		own, keepOnly = true, true
		dec.Reason, dec.Holder = ReasonResuming, self
		d.acquire(g, st)
	default:
		dec.Reason = d.turn(g, st, eligible)
	}
	if dec.Holder == "" && st.authority != "" {
		dec.Holder = st.authority
	}
	for _, s := range g.services {
		d.p.Decisions[s.Key] = dec
	}
	d.bind(g, dec, own, keepOnly, st)
	d.datapath(g, dec, own)
}

// turn decides a group this node may acquire but does not hold soundly:
// confirm what it holds, take what is free in turn.
func (d *decider) turn(g *group, st leaseState, eligible []string) string {
	self := d.ev.Self
	canWrite := d.ev.Established && !d.ev.Overdue && !d.ev.Draining && !st.pending
	if st.selfAny {
		// Holds part of it (a heartbeat gap, a Lease deleted by hand, an
		// acquisition under way): write the rest at once.
		if canWrite {
			d.acquire(g, st)
		}
		return ReasonAcquiring
	}
	since, ok := d.mem.FreeSince[g.key]
	if !ok {
		since = d.now
	}
	d.next.FreeSince[g.key] = since
	if !canWrite {
		if st.pending {
			return ReasonAcquiring
		}
		return ReasonNotCandidate
	}
	at := since.Add(time.Duration(slices.Index(eligible, self)) * d.in.RetryPeriod)
	if d.now.Before(at) {
		d.wake(at)
		return ReasonWaitingTurn
	}
	d.acquire(g, st)
	return ReasonAcquiring
}

// acquire asks for every Lease of the group this node does not hold in the
// current epoch: the address Leases (the authority) and the Service Leases.
func (d *decider) acquire(g *group, st leaseState) {
	ns := d.in.DaemonNamespace
	var names []string
	for _, a := range g.addrs {
		names = append(names, election.AddressLeaseName(a))
	}
	for _, a := range g.addrs {
		key := addressLease(ns, a)
		if lv := d.ev.Leases[key]; lv.Holder == d.ev.Self && lv.Current && !lv.Deleted || lv.Pending {
			continue
		}
		d.p.Acquire = append(d.p.Acquire, model.Claim{Lease: key, Kind: model.AddressLease, Address: a, ClaimedBy: g.namespace()})
	}
	for _, s := range g.services {
		key := election.ServiceLeaseKey(s.Key)
		lv := d.ev.Leases[key]
		ownerOK := s.UID == "" || slices.Contains(lv.Owners, s.UID)
		if lv.Holder == d.ev.Self && lv.Current && !lv.Deleted && ownerOK || lv.Pending {
			continue
		}
		d.p.Acquire = append(d.p.Acquire, model.Claim{Lease: key, Kind: model.ServiceLease,
			Owners: []model.Owner{{Name: s.Key.Name, UID: s.UID}}, AddressLeases: names})
	}
}

// resuming reports whether all of g's addresses were bound when the
// process started and the election has not decided since.
func (d *decider) resuming(g *group) bool {
	if len(d.mem.Resumable) == 0 {
		return false
	}
	for _, a := range g.addrs {
		if !d.mem.Resumable[a] {
			return false
		}
	}
	return true
}

// bind records the group's addresses to bind, and the Leases to release
// when the node holds them but wants them no more.
func (d *decider) bind(g *group, dec Decision, own, keepOnly bool, st leaseState) {
	self := d.ev.Self
	if own {
		for _, a := range g.addrs {
			if dec.Reason == ReasonResuming {
				d.next.Resumable[a] = true
			}
			if until, busy := d.next.Busy[a]; busy && !d.mem.Kernel[a] {
				// Someone else answered for it: not bound until it
				// stops; the next probe asks again.
				d.wake(until)
				continue
			}
			d.p.Bind = append(d.p.Bind, model.Binding{Addr: a, KeepOnly: keepOnly})
			if !keepOnly && !d.mem.Kernel[a] {
				d.p.Probe = append(d.p.Probe, a)
			}
		}
		// Keeping what the kernel does not hold (an acquisition half
		// written) serves nothing yet.
		if !keepOnly || slices.ContainsFunc(g.addrs, func(a netip.Addr) bool { return d.mem.Kernel[a] }) {
			for _, s := range g.services {
				d.next.Served[s.Key] = true
			}
		}
		return
	}
	if !st.selfAny {
		return
	}
	switch dec.Reason {
	case ReasonAcquiring, ReasonWaitingTurn:
		// Partly held while the rest is being written: wanted.
		return
	}
	// Held but not wanted (or held elsewhere after a split): release once
	// the kernel let go of the addresses.
	for _, a := range g.addrs {
		key := addressLease(d.in.DaemonNamespace, a)
		if lv := d.ev.Leases[key]; lv.Holder == self && !lv.Pending {
			d.p.releasable[key] = []netip.Addr{a}
		}
	}
	for _, s := range g.services {
		key := election.ServiceLeaseKey(s.Key)
		if lv := d.ev.Leases[key]; lv.Holder == self && !lv.Pending {
			d.p.releasable[key] = g.addrs
		}
	}
}

// strays are Leases this node holds that no group of this plan covers: a
// Service deleted or no longer ours, an address no Service claims any
// more. Released once the kernel let go; an address Lease nobody claims is
// deleted after.
func (d *decider) strays(covered map[types.NamespacedName]bool) {
	for key, lv := range d.ev.Leases {
		if covered[key] || lv.Holder != d.ev.Self || lv.Pending || lv.Kind == model.GlobalLease {
			continue
		}
		var addrs []netip.Addr
		if a, ok := election.AddressOfLease(key.Name); ok && lv.Kind == model.AddressLease {
			addrs = []netip.Addr{a}
		}
		d.p.releasable[key] = addrs
	}
	// Address Leases of addresses nobody claims, held by nobody valid:
	// deleted by the first node in rank (they have no owner the garbage
	// collector follows).
	for key, lv := range d.ev.Leases {
		if covered[key] || lv.Kind != model.AddressLease || lv.Pending || lv.Deleted || (lv.Holder != "" && lv.Valid) {
			continue
		}
		if first := firstOr(election.Rank(key.Name, d.candidates()), ""); first == d.ev.Self {
			d.p.Delete = append(d.p.Delete, key)
		}
	}
	slices.SortFunc(d.p.Delete, func(a, b types.NamespacedName) int { return strings.Compare(a.String(), b.String()) })
}

func firstOr(s []string, def string) string {
	if len(s) == 0 {
		return def
	}
	return s[0]
}

func joinAddrs(addrs []netip.Addr) string {
	out := make([]string, len(addrs))
	for i, a := range addrs {
		out[i] = a.String()
	}
	return strings.Join(out, ",")
}
