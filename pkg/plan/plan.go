// Package plan makes every decision of one sync as a pure function: from
// the previous sync's memory, the cluster view (analysed Services), the
// election view and the time, to the node state to program, the Leases to
// acquire and release, the Events to raise, and the next memory. The
// controller (pkg/node) only snapshots, plans, applies and emits, so each
// decision is table-tested here with the reason it gives, like MetalLB's
// ShouldAnnounce.
package plan

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/egressvip/egressvip/pkg/desired"
	"github.com/egressvip/egressvip/pkg/election"
)

// Reasons a node does or does not program a Service.
const (
	ReasonLeader        = "leader"
	ReasonResuming      = "resuming"
	ReasonKept          = "keptWhileAPIUnreachable"
	ReasonOverdue       = desired.ReasonRenewalOverdue
	ReasonHeldElsewhere = "heldByAnotherNode"
	ReasonAcquiring     = "acquiring"
	ReasonWaitingTurn   = "waitingForTurn"
	ReasonNotCandidate  = "notCandidate"
)

// Event reasons the planner raises.
const (
	EventBound             = "EgressVIPBound"
	EventReleased          = "EgressVIPReleased"
	EventInterfaceNotFound = "InterfaceNotFound"
)

// Input is one sync's picture.
type Input struct {
	Node string
	// Services are every Service this node serves, analysed.
	Services []desired.Service
	Election election.View
	// GlobalLease is the one Lease of svc_election=false (no owner).
	GlobalLease types.NamespacedName
	// RetryPeriod separates the turns of the candidates for a free Lease.
	RetryPeriod time.Duration
	// Settle is how long a transient problem must last to be reported.
	Settle  time.Duration
	Exclude []netip.Prefix
	// InterfaceErr is why the last address sync could not find the
	// serviceInterface ("" if it could).
	InterfaceErr string
}

// Memory is what one sync leaves to the next.
type Memory struct {
	// Programmed are the Services whose addresses and rules the kernel
	// may still hold: those of the last successful apply, plus, after a
	// failed one, whatever was programmed before.
	Programmed map[types.NamespacedName]bool
	// Owned is the last plan's ownership, for Events on change.
	Owned map[types.NamespacedName]bool
	// Resumable are addresses found bound at start-up, until the
	// election has decided about the Services that claim them.
	Resumable map[netip.Addr]bool
	// FreeSince is when each free Lease was first seen free.
	FreeSince map[types.NamespacedName]time.Time
	// Reported are the reasons of the Warning Events raised per Service
	// that still last: each is raised once while it lasts.
	Reported map[types.NamespacedName]map[string]bool
	// TransientSince is when each transient problem was first seen.
	TransientSince map[string]time.Time
	// Initialized is false until the first plan: a new process raises
	// no Events for what it finds it already serves.
	Initialized bool
}

// Start is the memory of a new process that found addrs bound.
func Start(addrs []netip.Addr) Memory {
	m := Memory{Resumable: map[netip.Addr]bool{}, Programmed: map[types.NamespacedName]bool{}}
	for _, a := range addrs {
		m.Resumable[a] = true
	}
	return m
}

// Decision is the outcome for one Service.
type Decision struct {
	// Own: program the Service's addresses and rules now.
	Own bool
	// Leader: this node holds the Service's Lease and its heartbeat is
	// sound, so it reports status and annotations.
	Leader bool
	Reason string
}

// Event is a Kubernetes Event to raise on a Service.
type Event struct {
	Service types.NamespacedName
	Warning bool
	Reason  string
	Message string
}

// Plan is what a sync does.
type Plan struct {
	Decisions map[types.NamespacedName]Decision
	// Own are the Services to program; State is their node state.
	Own   []desired.Service
	State desired.State
	// Acquire are the Leases to write naming this node.
	Acquire []election.Claim
	Events  []Event
	// Wake is when to plan again at the latest (zero: no need).
	Wake time.Time
	// releasable are the Leases this node holds but wants no more, with
	// their Services; Settle releases those the kernel no longer needs.
	releasable map[types.NamespacedName][]types.NamespacedName
}

// group is the Services of one Lease: one, or all of them for the global
// Lease.
type group struct {
	lease    types.NamespacedName
	services []*desired.Service
}

// Decide plans one sync.
func Decide(mem Memory, in Input) (Plan, Memory) {
	ev := in.Election
	now := ev.Now
	n := len(in.Services)
	next := Memory{
		Programmed:     mem.Programmed,
		Owned:          make(map[types.NamespacedName]bool, len(mem.Owned)),
		Resumable:      map[netip.Addr]bool{},
		FreeSince:      map[types.NamespacedName]time.Time{},
		Reported:       map[types.NamespacedName]map[string]bool{},
		TransientSince: map[string]time.Time{},
		Initialized:    true,
	}
	p := Plan{
		Decisions:  make(map[types.NamespacedName]Decision, n),
		Own:        make([]desired.Service, 0, len(mem.Owned)),
		releasable: map[types.NamespacedName][]types.NamespacedName{},
	}
	wake := func(t time.Time) {
		if p.Wake.IsZero() || t.Before(p.Wake) {
			p.Wake = t
		}
	}

	// Services are grouped by Lease: one each, or all of them under the
	// global Lease.
	groups := make([]group, 0, n)
	byLease := make(map[types.NamespacedName]int, n)
	for i := range in.Services {
		s := &in.Services[i]
		gi, ok := byLease[s.Lease]
		if !ok {
			gi = len(groups)
			byLease[s.Lease] = gi
			groups = append(groups, group{lease: s.Lease})
		}
		groups[gi].services = append(groups[gi].services, s)
	}

	for gi := range groups {
		g := &groups[gi]
		lv := ev.Leases[g.lease]
		selfHolds := lv.Holder == ev.Self && !lv.Legacy
		heldElsewhere := !selfHolds && ev.HolderValid(lv)
		free := !selfHolds && !heldElsewhere
		stand, resumingAny := false, false
		for _, s := range g.services {
			stand = stand || s.Stand
			resumingAny = resumingAny || (s.Stand && resuming(mem, *s))
		}
		if free {
			since, ok := mem.FreeSince[g.lease]
			if !ok {
				since = now
			}
			next.FreeSince[g.lease] = since
		}

		// Acquisition: confirm a holding left from before a heartbeat
		// gap, or take a free Lease in turn.
		canWrite := stand && !lv.Pending && ev.Established && !ev.Overdue && !ev.Draining
		acquiring := false
		switch {
		case !canWrite:
		case selfHolds && !lv.Current:
			acquiring = true
		case selfHolds && len(g.services) == 1 && g.lease != in.GlobalLease && g.services[0].UID != "" && lv.OwnerUID != g.services[0].UID:
			// The Service was deleted and created again: the Lease
			// must name the new one as owner, or the garbage
			// collector removes it.
			acquiring = true
		case free && resumingAny:
			// This node still has the addresses from before a
			// restart: taking the Lease back at once keeps them
			// where they are.
			acquiring = true
		case free:
			at := next.FreeSince[g.lease].Add(time.Duration(turn(g, ev)) * in.RetryPeriod)
			if !now.Before(at) {
				acquiring = true
			} else {
				wake(at)
			}
		}
		if acquiring {
			p.Acquire = append(p.Acquire, claim(g, in.GlobalLease))
		}

		for _, s := range g.services {
			d := decide(mem, ev, *s, lv, selfHolds, heldElsewhere, acquiring)
			p.Decisions[s.Key] = d
			if d.Own {
				p.Own = append(p.Own, *s)
				next.Owned[s.Key] = true
				if d.Reason == ReasonResuming {
					for _, a := range s.Addresses() {
						next.Resumable[a] = true
					}
				}
			}
		}
		if selfHolds && !stand && !lv.Pending {
			for _, s := range g.services {
				p.releasable[g.lease] = append(p.releasable[g.lease], s.Key)
			}
		}
	}

	p.State = desired.Build(p.Own, in.Exclude)
	p.Events = events(mem, &next, in, p, wake)
	return p, next
}

// decide is the ownership of one Service, with its reason.
func decide(mem Memory, ev election.View, s desired.Service, lv election.Lease, selfHolds, heldElsewhere, acquiring bool) Decision {
	switch {
	case !s.Stand:
		return Decision{Reason: s.Reason}
	case selfHolds && lv.Current && !ev.Overdue:
		return Decision{Own: true, Leader: true, Reason: ReasonLeader}
	case selfHolds && s.Pinned():
		// Renewals failing, or a holding not yet confirmed after a
		// heartbeat gap: no other node can serve the Service, so
		// none takes it; keep what is programmed.
		return Decision{Own: true, Reason: ReasonKept}
	case selfHolds && ev.Overdue:
		// Another node could serve it: give the address up before
		// the heartbeat can expire and that node take it.
		return Decision{Reason: ReasonOverdue}
	case resuming(mem, s) && !heldElsewhere:
		return Decision{Own: true, Reason: ReasonResuming}
	case heldElsewhere:
		return Decision{Reason: ReasonHeldElsewhere}
	case acquiring || lv.Pending:
		return Decision{Reason: ReasonAcquiring}
	case !ev.Established || ev.Overdue || ev.Draining:
		return Decision{Reason: ReasonNotCandidate}
	default:
		return Decision{Reason: ReasonWaitingTurn}
	}
}

// resuming reports whether all of s's addresses were bound when the
// process started and the election has not decided since.
func resuming(mem Memory, s desired.Service) bool {
	addrs := s.Addresses()
	if len(addrs) == 0 || len(mem.Resumable) == 0 {
		return false
	}
	for _, a := range addrs {
		if !mem.Resumable[a] {
			return false
		}
	}
	return true
}

// turn is this node's place among the candidates for a free Lease: every
// node ranks them the same way, so the first acquires at once and the
// others wait their turn, a retry period each, in case it does not.
func turn(g *group, ev election.View) int {
	var candidates []string
	s := g.services[0]
	if len(g.services) == 1 && s.Local {
		for _, n := range s.ReadyNodes {
			if ev.Candidates[n] {
				candidates = append(candidates, n)
			}
		}
	} else {
		for n, ok := range ev.Candidates {
			if ok {
				candidates = append(candidates, n)
			}
		}
	}
	if !slices.Contains(candidates, ev.Self) {
		candidates = append(candidates, ev.Self)
	}
	return slices.Index(election.Rank(g.lease, candidates), ev.Self)
}

func claim(g *group, global types.NamespacedName) election.Claim {
	c := election.Claim{Lease: g.lease}
	if g.lease != global && len(g.services) == 1 {
		s := g.services[0]
		c.Owner = &metav1.OwnerReference{APIVersion: "v1", Kind: "Service", Name: s.Key.Name, UID: s.UID}
	}
	return c
}

// events are the ownership changes (Normal) and the problems (Warning,
// once per Service and reason while it lasts). The nodes that would serve
// a Service report its problems: for externalTrafficPolicy Local only
// those with a local ready endpoint, not every node of the cluster.
func events(mem Memory, next *Memory, in Input, p Plan, wake func(time.Time)) []Event {
	var out []Event
	now := in.Election.Now
	for _, s := range in.Services {
		d := p.Decisions[s.Key]
		if mem.Initialized && d.Own != mem.Owned[s.Key] && d.Reason != ReasonResuming {
			e := Event{Service: s.Key, Reason: EventBound, Message: fmt.Sprintf("node %s serves %s (%s)", in.Node, joinAddrs(s.Addresses()), d.Reason)}
			if !d.Own {
				e.Reason = EventReleased
				e.Message = fmt.Sprintf("node %s released %s (%s)", in.Node, joinAddrs(s.Addresses()), d.Reason)
			}
			out = append(out, e)
		}
		if s.Local && len(s.LocalEndpoints) == 0 {
			continue
		}
		problems := slices.Clone(s.Problems)
		problems = append(problems, p.State.Conflicts[s.Key.String()]...)
		if d.Own && in.InterfaceErr != "" {
			problems = append(problems, desired.Problem{Reason: EventInterfaceNotFound, Message: in.InterfaceErr})
		}
		reported := map[string]bool{}
		for _, pr := range problems {
			if pr.Transient {
				id := s.Key.String() + "\x00" + pr.Reason + "\x00" + pr.Message
				first, ok := mem.TransientSince[id]
				if !ok {
					first = now
				}
				next.TransientSince[id] = first
				if at := first.Add(in.Settle); now.Before(at) {
					wake(at)
					continue
				}
			}
			reported[pr.Reason] = true
			if !mem.Reported[s.Key][pr.Reason] {
				out = append(out, Event{Service: s.Key, Warning: true, Reason: pr.Reason, Message: pr.Message})
			}
		}
		if len(reported) > 0 {
			next.Reported[s.Key] = reported
		}
	}
	return out
}

// Settle records what the kernel holds after the plan was applied (ok is
// whether the apply succeeded) and returns the Leases to release: those
// this node holds but no longer wants, once none of their Services can be
// left in the kernel. A failed apply releases nothing it may have left.
func Settle(mem Memory, p Plan, ok bool) (Memory, []types.NamespacedName) {
	programmed := map[types.NamespacedName]bool{}
	if !ok {
		for k := range mem.Programmed {
			programmed[k] = true
		}
	}
	for _, s := range p.Own {
		programmed[s.Key] = true
	}
	mem.Programmed = programmed
	var release []types.NamespacedName
	for lease, services := range p.releasable {
		if !slices.ContainsFunc(services, func(k types.NamespacedName) bool { return programmed[k] }) {
			release = append(release, lease)
		}
	}
	slices.SortFunc(release, func(a, b types.NamespacedName) int { return strings.Compare(a.String(), b.String()) })
	return mem, release
}

func joinAddrs(addrs []netip.Addr) string {
	out := make([]string, len(addrs))
	for i, a := range addrs {
		out[i] = a.String()
	}
	return strings.Join(out, ",")
}
