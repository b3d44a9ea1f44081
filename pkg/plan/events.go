package plan

import (
	"fmt"
	"slices"

	"github.com/egressvip/egressvip/pkg/election"
	"github.com/egressvip/egressvip/pkg/model"
)

// events are the ownership changes (Normal) and the problems (Warning,
// once per Service and reason while it lasts). One node reports a
// Service's problems, the same on every node: its holder, else the first
// node in rank that may hold it, else (an invalid Service) the first
// candidate in the Service's own rank — of the nodes with a local endpoint
// for externalTrafficPolicy Local. So a bad annotation is one Event, not
// one per node.
func (d *decider) events() []Event {
	var out []Event
	self := d.ev.Self
	candidates := d.candidates()
	if !slices.Contains(candidates, self) {
		candidates = append(candidates, self)
	}
	for i := range d.in.Services {
		s := &d.in.Services[i]
		dec, decided := d.p.Decisions[s.Key]
		served := d.next.Served[s.Key]
		if d.mem.Initialized && served != d.mem.Served[s.Key] && dec.Reason != ReasonResuming {
			e := Event{Service: s.Key, Reason: EventBound, Message: fmt.Sprintf("node %s serves %s (%s)", d.in.Node, joinAddrs(s.Addresses()), dec.Reason)}
			if !served {
				e.Reason = EventReleased
				e.Message = fmt.Sprintf("node %s released %s (%s)", d.in.Node, joinAddrs(s.Addresses()), dec.Reason)
			}
			out = append(out, e)
		}
		// A serviceInterface this node cannot use is this node's problem:
		// it reports it on the Services it served, whoever reports the
		// rest.
		var problems []model.Problem
		if (served || d.mem.Served[s.Key]) && d.in.InterfaceErr != "" {
			problems = append(problems, model.Problem{Reason: EventInterfaceNotFound, Message: d.in.InterfaceErr})
		}
		// So is an apply that failed here.
		if f, ok := d.next.Failing[d.p.groupOf[s.Key.String()]]; ok && f.Message != "" {
			problems = append(problems, model.Problem{Reason: EventApplyFailed, Message: f.Message})
		}
		if d.reports(s, dec, decided, candidates) {
			problems = append(problems, s.Problems...)
			problems = append(problems, d.problems[s.Key]...)
		}
		if len(problems) == 0 {
			continue
		}
		reported := map[string]bool{}
		for _, pr := range problems {
			if pr.Transient {
				id := s.Key.String() + "\x00" + pr.Reason + "\x00" + pr.Message
				first, ok := d.mem.TransientSince[id]
				if !ok {
					first = d.now
				}
				d.next.TransientSince[id] = first
				if at := first.Add(d.in.Settle); d.now.Before(at) {
					d.wake(at)
					continue
				}
			}
			reported[pr.Reason] = true
			if !d.mem.Reported[s.Key][pr.Reason] {
				out = append(out, Event{Service: s.Key, Warning: true, Reason: pr.Reason, Message: pr.Message})
			}
		}
		if len(reported) > 0 {
			d.next.Reported[s.Key] = reported
		}
	}
	return out
}

// reports says whether this node reports s's problems.
func (d *decider) reports(s *model.Service, dec Decision, decided bool, candidates []string) bool {
	self := d.ev.Self
	switch {
	case decided && dec.Holder != "":
		return dec.Holder == self
	case decided && len(dec.Eligible) > 0:
		return dec.Eligible[0] == self
	}
	var nodes []string
	for _, n := range candidates {
		if !s.Local || slices.ContainsFunc(s.Endpoints, func(e model.Endpoint) bool { return e.Node == n }) {
			nodes = append(nodes, n)
		}
	}
	return firstOr(election.Rank(s.Key.String(), nodes), "") == self
}
