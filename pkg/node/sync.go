package node

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"

	"github.com/egressvip/egressvip/pkg/desired"
	"github.com/egressvip/egressvip/pkg/netif"
	"github.com/egressvip/egressvip/pkg/plan"
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
	// The cluster's ranges, read once per sync.
	exclude []netip.Prefix
}

func (c *Controller) snapshot() (view, error) {
	all, err := c.services.List(labels.Everything())
	if err != nil {
		return view{}, fmt.Errorf("list Services from cache: %w", err)
	}
	v := view{
		services: make(map[types.NamespacedName]*corev1.Service, len(all)),
		analysed: make([]desired.Service, 0, len(all)),
		exclude:  c.excl.Exclude(),
	}
	// The detector's map is shared: add the peers' to a copy.
	nodeAddrs := maps.Clone(c.excl.NodeAddresses())
	if nodeAddrs == nil {
		nodeAddrs = map[netip.Addr]bool{}
	}
	for a := range c.elections.PeerAddresses() {
		nodeAddrs[a] = true
	}
	opts := desired.Options{Node: c.opts.Node, Election: c.opts.Election, GlobalLease: c.opts.GlobalLease,
		PodCIDRs: c.excl.PodCIDRs(), NodeAddresses: nodeAddrs, LocalPod: c.localPod, MissingIPv6: c.excl.Missing(true)}
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
	slices.SortFunc(v.analysed, func(a, b desired.Service) int { return desired.CompareKeys(a.Key, b.Key) })
	host, err := c.addrs.Host()
	if err != nil && !errors.Is(err, netif.ErrInterfaceNotFound) {
		c.log.WithError(err).Warn("cannot read the serviceInterface's own addresses")
	}
	v.analysed = desired.Admit(v.analysed, desired.Admission{
		NodeAddresses: opts.NodeAddresses,
		Host:          desired.Host{Own: host.Own, Subnets: host.Subnets, Gateways: host.Gateways},
		Exclude:       v.exclude,
		Allowed:       c.opts.Allowed,
	})
	return v, nil
}

// Sync recomputes and applies the whole node state once: snapshot, plan,
// apply, emit. Every decision is the planner's (pkg/plan).
func (c *Controller) Sync(ctx context.Context) error {
	v, err := c.snapshot()
	if err != nil {
		return err
	}
	p, mem := plan.Decide(c.mem, plan.Input{
		Node:         c.opts.Node,
		Services:     v.analysed,
		Election:     c.elections.View(),
		GlobalLease:  c.opts.GlobalLease,
		RetryPeriod:  c.opts.RetryPeriod,
		Settle:       c.settle,
		Exclude:      v.exclude,
		InterfaceErr: c.interfaceErr,
	})
	for _, cl := range p.Acquire {
		c.elections.Acquire(cl)
	}
	applyErr := c.apply(ctx, p.State)
	// Release only what the kernel no longer holds, so an address is
	// never held by two nodes.
	mem, release := plan.Settle(mem, p, applyErr == nil)
	for _, lease := range release {
		c.log.WithField("lease", lease.String()).Debug("releasing")
		c.elections.Release(lease)
	}
	c.mem = mem
	c.emit(v, p.Events)

	leaders := map[types.NamespacedName]bool{}
	for _, s := range p.Own {
		if p.Decisions[s.Key].Leader {
			leaders[s.Key] = true
			// Report only what the kernel holds.
			if applyErr == nil {
				c.reporter.set(v.services[s.Key], desired.ReportFor(s, c.opts.Node))
			}
		}
	}
	c.reporter.retain(leaders)
	if m := c.opts.Metrics; m != nil {
		m.OwnedServices.Set(float64(len(p.Own)))
		m.Addresses.Set(float64(len(p.State.Addresses)))
		m.SNATRules.Set(float64(len(p.State.SNAT.Rules)))
	}
	if !p.Wake.IsZero() {
		c.queue.AddAfter(syncKey, time.Until(p.Wake))
	}
	c.last = p
	return applyErr
}

// emit raises the plan's Events and logs them.
func (c *Controller) emit(v view, events []plan.Event) {
	for _, e := range events {
		svc := v.services[e.Service]
		log := c.log.WithFields(map[string]any{"service": e.Service.String(), "reason": e.Reason})
		if e.Warning {
			log.Error(e.Message)
		} else {
			log.Info(e.Message)
		}
		if svc == nil {
			continue
		}
		kind := corev1.EventTypeNormal
		if e.Warning {
			kind = corev1.EventTypeWarning
		}
		c.recorder.Event(svc, kind, e.Reason, e.Message)
	}
}

// apply writes addresses and rules. A failure of one part does not stop
// the other; a missing interface is remembered for the next plan, which
// raises it as an Event on the Services that needed it.
func (c *Controller) apply(ctx context.Context, state desired.State) error {
	var errs []error
	added, removed, err := c.addrs.Sync(ctx, state.Addresses)
	c.interfaceErr = ""
	if err != nil {
		errs = append(errs, fmt.Errorf("addresses: %w", err))
		if errors.Is(err, netif.ErrInterfaceNotFound) {
			c.interfaceErr = err.Error()
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

// shutdown runs once the loop has stopped (SIGTERM). The heartbeat says
// the node is draining; pinned egress Services keep Lease, address and
// rules so the next process resumes them without a gap; every other
// Service's address and rules are removed first and then its Lease is
// released, so another node takes over at once.
func (c *Controller) shutdown() {
	ctx, cancel := context.WithTimeout(context.Background(), c.opts.RenewDeadline)
	defer cancel()
	c.elections.Drain(ctx)
	var keep []desired.Service
	kept := map[types.NamespacedName]bool{}
	for _, s := range c.last.Own {
		if s.Pinned() && s.Egress {
			keep = append(keep, s)
			kept[s.Lease] = true
		}
	}
	state := desired.Build(keep, c.excl.Exclude())
	applyErr := c.apply(ctx, state)
	if applyErr != nil {
		c.log.WithError(applyErr).Error("shutdown: removing addresses and rules failed; keeping their Leases")
	}
	ev := c.elections.View()
	var release []types.NamespacedName
	for key, l := range ev.Leases {
		if l.Holder != ev.Self || kept[key] {
			continue
		}
		if applyErr != nil && c.heldProgrammed(key) {
			continue
		}
		release = append(release, key)
	}
	c.elections.ReleaseNow(ctx, release)
	c.log.WithFields(map[string]any{"kept": len(keep), "released": len(release)}).Info("shutdown complete")
}

// heldProgrammed reports whether a Service of lease may be in the kernel.
func (c *Controller) heldProgrammed(lease types.NamespacedName) bool {
	for _, s := range c.last.Own {
		if s.Lease == lease {
			return true
		}
	}
	return false
}
