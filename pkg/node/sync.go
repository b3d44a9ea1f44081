package node

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"

	"github.com/egressvip/egressvip/pkg/desired"
	"github.com/egressvip/egressvip/pkg/netif"
)

const byService = "byService"

// indexByService indexes EndpointSlices by "namespace/service".
func indexByService(obj any) ([]string, error) {
	sl, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok {
		return nil, nil
	}
	name := sl.Labels[discoveryv1.LabelServiceName]
	if name == "" {
		return nil, nil
	}
	return []string{sl.Namespace + "/" + name}, nil
}

// view is one sync's picture: every Service we serve, analysed.
type view struct {
	services map[types.NamespacedName]*corev1.Service
	analysed []desired.Service
}

func (c *Controller) snapshot() (view, error) {
	all, err := c.services.List(labels.Everything())
	if err != nil {
		return view{}, fmt.Errorf("list Services from cache: %w", err)
	}
	v := view{services: map[types.NamespacedName]*corev1.Service{}}
	opts := desired.Options{Node: c.opts.Node, Election: c.opts.Election, GlobalLease: c.opts.GlobalLease}
	for _, svc := range all {
		if !c.ours(svc) {
			continue
		}
		objs, err := c.sliceIndex.ByIndex(byService, svc.Namespace+"/"+svc.Name)
		if err != nil {
			return view{}, fmt.Errorf("EndpointSlices of %s/%s: %w", svc.Namespace, svc.Name, err)
		}
		epSlices := make([]*discoveryv1.EndpointSlice, 0, len(objs))
		for _, o := range objs {
			epSlices = append(epSlices, o.(*discoveryv1.EndpointSlice))
		}
		s := desired.Analyze(svc, epSlices, opts)
		if s.Egress && c.snat == nil {
			s.Problems = append(s.Problems, desired.Problem{Reason: desired.EventEgressNotSupported, Message: "egress unavailable on node " + c.opts.Node + ": " + c.opts.SNATUnavailable})
			s.Egress, s.EgressIPv6 = false, false
		}
		v.services[s.Key] = svc
		v.analysed = append(v.analysed, s)
	}
	sort.Slice(v.analysed, func(i, j int) bool { return v.analysed[i].Key.String() < v.analysed[j].Key.String() })
	return v, nil
}

// Sync recomputes and applies the whole node state once.
func (c *Controller) Sync(ctx context.Context) error {
	v, err := c.snapshot()
	if err != nil {
		return err
	}
	identity := c.elections.Identity()

	standing := map[types.NamespacedName]bool{}
	for _, s := range v.analysed {
		if s.Stand {
			standing[s.Lease] = true
			c.elections.Stand(ctx, s.Lease)
		}
	}

	var owned []desired.Service
	ownedNow := map[types.NamespacedName]bool{}
	leading := map[types.NamespacedName]bool{}
	for _, s := range v.analysed {
		st := c.elections.State(s.Lease)
		resuming := c.resuming(s)
		ok, why := desired.Owns(s, st, identity, resuming)
		if ok {
			owned = append(owned, s)
			ownedNow[s.Key] = true
			leading[s.Key] = st.Leading
		}
		// Resuming ends once the election has decided: this node leads,
		// or another holds the Lease.
		if resuming && (st.Leading || (st.Observed && st.Holder != identity)) {
			for _, a := range s.Addresses() {
				delete(c.resumable, a)
			}
		}
		if ok != c.owned[s.Key] {
			c.log.WithFields(map[string]any{"service": s.Key.String(), "owned": ok, "reason": why}).Info("ownership changed")
			if ok {
				c.recorder.Eventf(v.services[s.Key], corev1.EventTypeNormal, "EgressVIPBound", "node %s serves %s (%s)", c.opts.Node, joinAddrs(s.Addresses()), why)
			} else {
				c.recorder.Eventf(v.services[s.Key], corev1.EventTypeNormal, "EgressVIPReleased", "node %s released %s (%s)", c.opts.Node, joinAddrs(s.Addresses()), why)
			}
		}
	}

	state := desired.Build(owned, c.excl.Exclude())
	applyErr := c.apply(ctx, state, v)
	if m := c.opts.Metrics; m != nil {
		m.OwnedServices.Set(float64(len(owned)))
		m.Addresses.Set(float64(len(state.Addresses)))
		m.SNATRules.Set(float64(len(state.SNAT.Rules)))
	}

	// Withdraw only after the kernel no longer holds what the lease
	// guarded, so an address is never held by two nodes.
	for _, lease := range c.elections.Leases() {
		if !standing[lease] {
			go c.elections.Withdraw(lease)
		}
	}

	reporting := map[types.NamespacedName]bool{}
	settled := map[string]time.Time{}
	for _, s := range v.analysed {
		var problems []desired.Problem
		// The nodes that would serve the Service report its problems:
		// for externalTrafficPolicy Local only those with a local ready
		// endpoint, not every node of the cluster.
		if !s.Local || len(s.LocalEndpoints) > 0 {
			problems = c.lasting(s.Key, append(slices.Clone(s.Problems), state.Conflicts[s.Key.String()]...), settled)
		}
		c.emitProblems(v.services[s.Key], problems)
		if ownedNow[s.Key] && leading[s.Key] {
			reporting[s.Key] = true
			// Report only what the kernel holds.
			if applyErr == nil {
				c.reporter.set(v.services[s.Key], desired.ReportFor(s, c.opts.Node))
			}
		}
	}
	c.reporter.retain(reporting)
	c.transientSince = settled

	for k := range c.reported {
		if _, ok := v.services[k]; !ok {
			delete(c.reported, k)
		}
	}
	c.owned = ownedNow
	c.last = map[types.NamespacedName]desired.Service{}
	for _, s := range v.analysed {
		c.last[s.Key] = s
	}
	return applyErr
}

func joinAddrs(addrs []netip.Addr) string {
	out := make([]string, len(addrs))
	for i, a := range addrs {
		out[i] = a.String()
	}
	return strings.Join(out, ",")
}

// resuming reports whether s's addresses were all bound when the process
// started.
func (c *Controller) resuming(s desired.Service) bool {
	addrs := s.Addresses()
	if len(addrs) == 0 || len(c.resumable) == 0 {
		return false
	}
	for _, a := range addrs {
		if !c.resumable[a] {
			return false
		}
	}
	return true
}

// apply writes addresses and rules. A failure of one part does not stop
// the other; a missing interface becomes an Event on every Service that
// needed it.
func (c *Controller) apply(ctx context.Context, state desired.State, v view) error {
	var errs []error
	added, removed, err := c.addrs.Sync(ctx, state.Addresses)
	if err != nil {
		errs = append(errs, fmt.Errorf("addresses: %w", err))
		if errors.Is(err, netif.ErrInterfaceNotFound) {
			for _, s := range v.analysed {
				if c.owned[s.Key] || slices.ContainsFunc(s.Addresses(), func(a netip.Addr) bool { return slices.Contains(state.Addresses, a) }) {
					c.emitProblems(v.services[s.Key], append(slices.Clone(s.Problems), desired.Problem{Reason: "InterfaceNotFound", Message: err.Error()}))
				}
			}
		}
	}
	for _, a := range added {
		c.log.WithField("ip", a.String()).Info("address bound")
	}
	for _, a := range removed {
		c.log.WithField("ip", a.String()).Info("address removed")
	}
	if c.snat != nil {
		if err := c.snat.Apply(ctx, state.SNAT); err != nil {
			errs = append(errs, fmt.Errorf("snat: %w", err))
		}
	}
	return errors.Join(errs...)
}

// lasting drops the transient problems that have not lasted c.settle yet
// and asks for a sync when they will have. since records when each
// transient problem seen now was first seen.
func (c *Controller) lasting(key types.NamespacedName, problems []desired.Problem, since map[string]time.Time) []desired.Problem {
	now := time.Now()
	return slices.DeleteFunc(problems, func(p desired.Problem) bool {
		if !p.Transient {
			return false
		}
		id := key.String() + "\x00" + p.Reason + "\x00" + p.Message
		first, ok := c.transientSince[id]
		if !ok {
			first = now
		}
		since[id] = first
		if wait := c.settle - now.Sub(first); wait > 0 {
			c.queue.AddAfter(syncKey, wait)
			return true
		}
		return false
	})
}

// emitProblems turns a Service's problems into Warning Events and log
// lines, once per distinct set of problems.
func (c *Controller) emitProblems(svc *corev1.Service, problems []desired.Problem) {
	if svc == nil {
		return
	}
	key := types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name}
	var msgs []string
	for _, p := range problems {
		msgs = append(msgs, p.Reason+": "+p.Message)
	}
	sig := strings.Join(msgs, "\n")
	if c.reported[key] == sig {
		return
	}
	c.reported[key] = sig
	for _, p := range problems {
		c.log.WithFields(map[string]any{"service": key.String(), "reason": p.Reason}).Error(p.Message)
		c.recorder.Event(svc, corev1.EventTypeWarning, p.Reason, p.Message)
	}
}

// shutdown runs once the loop has stopped (SIGTERM). Pinned Services keep
// lease, address and rules so the next process resumes them without a gap;
// every other Service's address and rules are removed first and then its
// lease is released, so another node takes over at once.
func (c *Controller) shutdown() {
	var keep []desired.Service
	keepLease := map[types.NamespacedName]bool{}
	for k, s := range c.last {
		if c.owned[k] && s.Pinned() && s.Egress {
			keep = append(keep, s)
			keepLease[s.Lease] = true
		}
	}
	for k, s := range c.last {
		if c.owned[k] && !keepLease[s.Lease] {
			c.log.WithField("service", k.String()).Info("shutting down: releasing Service")
		}
	}

	state := desired.Build(keep, c.excl.Exclude())
	if err := c.apply(context.Background(), state, view{}); err != nil {
		c.log.WithError(err).Error("shutdown: removing addresses and rules failed")
	}
	done := make(chan struct{})
	leases := c.elections.Leases()
	go func() {
		defer close(done)
		var wg sync.WaitGroup
		for _, lease := range leases {
			if keepLease[lease] {
				c.elections.Abandon(lease)
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				c.elections.Withdraw(lease)
			}()
		}
		wg.Wait()
	}()
	<-done
	c.log.WithField("kept", len(keep)).Info("shutdown complete")
}
