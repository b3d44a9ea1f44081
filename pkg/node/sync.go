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
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/pkg/desired"
	"github.com/egressvip/egressvip/pkg/election"
	"github.com/egressvip/egressvip/pkg/model"
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

// ignored is kube-vip.io/ignore: kube-vip leaves such a Service alone.
func ignored(svc *corev1.Service) bool { return annotations.Ignored(svc) }

// view is one sync's picture: every Service we serve, analysed and
// admitted, and the cluster's ranges.
type view struct {
	services map[types.NamespacedName]*corev1.Service
	analysed []model.Service
	exclude  []netip.Prefix
	host     netif.Host
	election model.ElectionView
	refused  int
}

func (c *Controller) snapshot() (view, error) {
	all, err := c.services.List(labels.Everything())
	if err != nil {
		return view{}, fmt.Errorf("list Services from cache: %w", err)
	}
	v := view{
		services: make(map[types.NamespacedName]*corev1.Service, len(all)),
		analysed: make([]model.Service, 0, len(all)),
		election: c.elections.View(),
	}
	// The detector's map is shared: add the peers' to a copy.
	nodeAddrs := maps.Clone(c.cluster.NodeAddresses())
	if nodeAddrs == nil {
		nodeAddrs = map[netip.Addr]bool{}
	}
	for a := range c.elections.PeerAddresses() {
		nodeAddrs[a] = true
	}
	v.exclude = c.exclusions(nodeAddrs)
	opts := desired.Options{
		Node:          c.opts.Node,
		PodCIDRs:      c.cluster.PodCIDRs(),
		NodeAddresses: nodeAddrs,
		LocalPod:      c.localPodByIP,
		LocalPods:     c.localPodsSelected,
		RemotePod:     c.verifier.Verdict,
		Holds: func(a netip.Addr) bool {
			l, ok := v.election.Leases[types.NamespacedName{Namespace: c.opts.DaemonNamespace, Name: election.AddressLeaseName(a)}]
			return ok && l.Holder == c.opts.Node
		},
		MissingIPv6: c.cluster.Missing(true),
	}
	blocked := ""
	if c.opts.EgressBlocked != nil {
		blocked = c.opts.EgressBlocked()
	}
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
			s.Problems = append(s.Problems, model.Problem{Reason: desired.EventEgressNotSupported, Message: "egress unavailable on node " + c.opts.Node + ": " + c.opts.SNATUnavailable})
			s.Egress, s.EgressIPv6 = false, false
		} else if s.Egress && blocked != "" {
			s.Problems = append(s.Problems, model.Problem{Reason: desired.EventEgressNotSupported, Message: "egress cannot work on node " + c.opts.Node + ": " + blocked})
			s.Egress, s.EgressIPv6 = false, false
		}
		v.services[s.Key] = svc
		v.analysed = append(v.analysed, s)
	}
	slices.SortFunc(v.analysed, func(a, b model.Service) int { return model.CompareKeys(a.Key, b.Key) })
	host, err := c.addrs.Host()
	if err != nil && !errors.Is(err, netif.ErrInterfaceNotFound) {
		c.log.WithError(err).Warn("cannot read the serviceInterface's own addresses")
	}
	v.host = host
	c.host.Store(&host)
	claimed := map[netip.Addr]string{}
	for key, lv := range v.election.Leases {
		if lv.Kind != model.AddressLease || lv.ClaimedBy == "" {
			continue
		}
		if a, ok := election.AddressOfLease(key.Name); ok {
			claimed[a] = lv.ClaimedBy
		}
	}
	v.analysed = desired.Admit(v.analysed, desired.Admission{
		NodeAddresses: nodeAddrs,
		Host:          model.Host{Own: host.Own, Subnets: host.Subnets, Gateways: host.Gateways, Up: host.Up},
		Exclude:       c.cluster.Exclude(),
		Allowed:       c.opts.Allowed,
		ClaimedBy:     claimed,
	})
	for _, s := range v.analysed {
		for _, p := range s.Problems {
			if p.Reason == desired.EventAddressRefused || p.Reason == desired.EventAddressConflict {
				v.refused++
			}
		}
	}
	return v, nil
}

// nodeInterfaces are the interfaces other nodes' steered traffic arrives
// on: those of the routes to their first next-hop address of each family
// (their InternalIPs), from the routing writer. Only those: traffic from
// the serviceInterface's network (the outside world) is never exempt from
// the anti-spoofing check.
func (c *Controller) nodeInterfaces(ev model.ElectionView) []string {
	r, ok := c.routes.(interface{ Interfaces([]netip.Addr) []string })
	if !ok {
		return nil
	}
	var addrs []netip.Addr
	for _, p := range ev.Peers {
		var v4, v6 bool
		for _, a := range p.Via {
			if a.Is4() && !v4 || a.Is6() && !v6 {
				addrs = append(addrs, a)
				v4, v6 = v4 || a.Is4(), v6 || a.Is6()
			}
		}
	}
	return r.Interfaces(addrs)
}

// singletons are the Leases electing one node: the global one and the
// tasks'.
func (c *Controller) singletons() []types.NamespacedName {
	out := slices.Clone(c.opts.Singletons)
	if c.opts.Global != nil {
		out = append(out, *c.opts.Global)
	}
	return out
}

// exclusions are the destinations never SNATed, steered or held: the pod
// and Service CIDRs and, unless turned off (kube-vip's behaviour), every
// Node's addresses and the API server's endpoints, so that an egress pod
// reaches the API server through the kubernetes Service with its own
// node's address on any network layout.
func (c *Controller) exclusions(nodeAddrs map[netip.Addr]bool) []netip.Prefix {
	out := slices.Clone(c.cluster.Exclude())
	if !c.opts.ExcludeNodes {
		return out
	}
	for a := range nodeAddrs {
		out = append(out, netip.PrefixFrom(a, a.BitLen()))
	}
	objs, _ := c.sliceIndex.ByIndex(byService, metav1.NamespaceDefault+"/kubernetes")
	for _, o := range objs {
		sl, ok := o.(*discoveryv1.EndpointSlice)
		if !ok {
			continue
		}
		for _, e := range sl.Endpoints {
			for _, s := range e.Addresses {
				if a, err := netip.ParseAddr(s); err == nil {
					a = a.Unmap()
					out = append(out, netip.PrefixFrom(a, a.BitLen()))
				}
			}
		}
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	return slices.Compact(out)
}

// input is the planner's input for a view.
func (c *Controller) input(v view) plan.Input {
	in := plan.Input{
		Node:            c.opts.Node,
		Services:        v.analysed,
		Election:        v.election,
		DaemonNamespace: c.opts.DaemonNamespace,
		Global:          c.opts.Global,
		Singletons:      c.singletons(),
		RetryPeriod:     c.opts.RetryPeriod,
		Grace:           c.opts.Grace,
		Settle:          c.settle,
		Exclude:         v.exclude,
		Host:            model.Host{Own: v.host.Own, Subnets: v.host.Subnets, Gateways: v.host.Gateways, Up: v.host.Up},
		InterfaceErr:    c.interfaceErr,
		InterfaceGrace:  c.opts.RenewDeadline,
		Tunnel:          c.opts.Tunnel,
		KnownPods:       c.knownPodIPs(),
	}
	if n, ok := c.cluster.Node(c.opts.Node); ok {
		for _, s := range n.Spec.PodCIDRs {
			if p, err := netip.ParsePrefix(s); err == nil {
				in.PodCIDRs = append(in.PodCIDRs, p.Masked())
			}
		}
	}
	in.Tunnel = c.tunnel()
	return in
}

// Sync recomputes and applies the whole node state once: snapshot, plan,
// apply, settle, emit. Every decision is the planner's (pkg/plan).
func (c *Controller) Sync(ctx context.Context) error {
	planned, epoch := c.opts.Clock.Now(), c.elections.Epoch()
	v, err := c.snapshot()
	if err != nil {
		return err
	}
	in := c.input(v)
	in.Conflicts = c.takeConflicts()
	p, mem := plan.Decide(c.mem, in)
	p.Datapath.PodCIDRs = c.cluster.PodCIDRs()
	if slices.ContainsFunc(in.Services, func(s model.Service) bool { return s.Egress }) {
		// Other nodes steer to the holder they believe in: until this
		// node SNATs a pod, its traffic arriving here goes nowhere.
		p.Datapath.Transit = p.Datapath.PodCIDRs
	}
	p.Datapath.NodeInterfaces = c.nodeInterfaces(v.election)
	for _, cl := range p.Acquire {
		c.elections.Acquire(cl)
	}
	for _, key := range p.Delete {
		c.elections.Delete(key)
	}
	res := c.apply(ctx, p, planned, epoch)
	now := c.opts.Clock.Now()
	mem, release, events := plan.Settle(mem, p, now, c.opts.RetryPeriod, c.opts.Grace, res)
	// Release only what the kernel no longer holds, so an address is
	// never held by two nodes.
	for _, lease := range release {
		c.log.WithField("lease", lease.String()).Debug("releasing")
		c.elections.Release(lease)
	}
	c.mem = mem
	c.emit(v, append(p.Events, events...))

	// Report only what the kernel holds: not an address it refused, nor
	// one another host answers for.
	unheld := func(ip string) bool {
		a, err := netip.ParseAddr(ip)
		return err != nil || !mem.Kernel[a]
	}
	leaders := map[types.NamespacedName]bool{}
	for key, rep := range p.Reports {
		svc := v.services[key]
		if svc == nil {
			continue
		}
		leaders[key] = true
		if res.Err == nil && res.FailedServices[key.String()] == nil && !slices.ContainsFunc(rep.Ingress, unheld) {
			c.reporter.set(svc, rep)
		}
	}
	c.reporter.retain(leaders)
	if c.opts.Elected != nil {
		c.opts.Elected(p.Elected)
	}
	if m := c.opts.Metrics; m != nil {
		m.OwnedServices.Set(float64(len(p.Reports)))
		m.Addresses.Set(float64(len(mem.Kernel)))
		m.SNATRules.Set(float64(len(p.Datapath.SNAT)))
		m.Steered.Set(float64(p.Steered))
		m.Refused.Set(float64(v.refused))
		m.InUse.Add(float64(len(res.Busy)))
		m.ApplyFailures.Add(float64(len(res.FailedAddrs) + len(res.FailedServices)))
	}
	if !p.Wake.IsZero() {
		c.queue.AddAfter(syncKey, p.Wake.Sub(now))
	}
	return res.Err
}

// apply probes new addresses, then writes addresses, firewall rules and
// routes. A failure of one part (or of one Service) does not stop the
// others; the result says what failed.
//
// A plan rests on the election as it was when the sync began (planned, in
// the heartbeat's epoch): holdings valid then, other nodes' takeovers at
// least a lease duration after the last heartbeat renewal they saw. If the
// heartbeat is no longer fresh when the addresses are written, or came
// back in a new epoch (the process was frozen or starved in between), it
// binds nothing the kernel does not hold: another node may have taken the
// address over meanwhile, and the next sync plans again. A slow sync whose
// heartbeat stayed fresh binds: nobody can have taken over.
func (c *Controller) apply(ctx context.Context, p plan.Plan, planned time.Time, epoch uint64) plan.Result {
	res := plan.Result{FailedAddrs: map[netip.Addr]error{}, FailedServices: map[string]error{}}
	binds := p.Bind
	if len(p.Probe) > 0 {
		busy, err := c.addrs.Probe(ctx, p.Probe, c.opts.ProbeWait)
		if err != nil && !errors.Is(err, netif.ErrInterfaceNotFound) {
			c.log.WithError(err).Warn("cannot probe new addresses before binding them")
		}
		if len(busy) > 0 {
			res.Busy = map[netip.Addr]string{}
			binds = slices.DeleteFunc(slices.Clone(binds), func(b model.Binding) bool { return busy[b.Addr] != nil })
			for a, mac := range busy {
				res.Busy[a] = mac.String()
				c.log.WithFields(map[string]any{"ip": a.String(), "mac": mac.String()}).Warn("another host answers for the address; not binding it")
			}
		}
	}
	// The plan was made with Leases valid in epoch; if the heartbeat lapsed
	// since (this process frozen or starved), other nodes may have taken
	// them over: bind nothing new from it. The next plan, from a fresh
	// view, decides again.
	if fresh, now := c.elections.Fresh(), c.elections.Epoch(); (!fresh || now != epoch) && slices.ContainsFunc(binds, func(b model.Binding) bool { return !b.KeepOnly }) {
		c.log.WithFields(map[string]any{"age": c.opts.Clock.Since(planned).String(), "fresh": fresh, "epoch": now, "planEpoch": epoch}).
			Info("the heartbeat lapsed since the plan was made: binding nothing new this time, keeping what the kernel holds")
		binds = slices.Clone(binds)
		for i := range binds {
			binds[i].KeepOnly = true
		}
	}
	var errs []error
	r, err := c.addrs.Sync(ctx, binds)
	c.interfaceErr = ""
	if err != nil {
		if errors.Is(err, netif.ErrInterfaceNotFound) || errors.Is(err, netif.ErrInterfaceDown) {
			c.interfaceErr = err.Error()
		} else {
			errs = append(errs, fmt.Errorf("addresses: %w", err))
		}
	}
	for a, e := range r.Failed {
		res.FailedAddrs[a] = e
		c.log.WithError(e).WithField("ip", a.String()).Warn("address could not be applied")
	}
	for _, a := range r.Added {
		c.log.WithField("ip", a.String()).Info("address bound")
	}
	for _, a := range r.Removed {
		c.log.WithField("ip", a.String()).Info("address removed")
	}
	if owned, err := c.addrs.Owned(); err == nil {
		res.Kernel, res.KernelKnown = owned, true
	} else if errors.Is(err, netif.ErrInterfaceNotFound) {
		// No interface, no address on it: the Leases that guarded them
		// may go, and another node take the Services over.
		res.KernelKnown = true
	}
	if c.snat != nil {
		failed, err := c.snat.Apply(ctx, p.Datapath)
		if err != nil {
			errs = append(errs, fmt.Errorf("snat: %w", err))
		}
		for s, e := range failed {
			res.FailedServices[s] = e
		}
	}
	if c.routes != nil {
		failed, err := c.routes.Apply(ctx, p.Routes)
		if err != nil {
			errs = append(errs, fmt.Errorf("routes: %w", err))
		}
		for s, e := range failed {
			res.FailedServices[s] = e
		}
	}
	res.Err = errors.Join(errs...)
	return res
}

// emit raises Events and logs them.
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

// shutdown runs once the loop has stopped (SIGTERM). The heartbeat says
// the node is draining; pinned egress keeps Lease, address and rules so
// the next process resumes them without a gap (their lifetime made
// unlimited: a graceful stop hands them over); everything else is removed
// first and then its Leases are released, so another node takes over at
// once. A failed removal keeps its Lease (Settle).
func (c *Controller) shutdown() {
	ctx, cancel := context.WithTimeout(context.Background(), c.opts.RenewDeadline)
	defer cancel()
	c.elections.Drain(ctx)
	v, err := c.snapshot()
	if err != nil {
		c.log.WithError(err).Error("shutdown: cannot read the caches; leaving everything as it is")
		return
	}
	in := c.input(v)
	p := plan.Drain(c.mem, in)
	res := c.apply(ctx, plan.Plan{Bind: p.Bind, Datapath: p.Datapath, Routes: p.Routes}, c.opts.Clock.Now(), c.elections.Epoch())
	if res.Err != nil {
		c.log.WithError(res.Err).Error("shutdown: removing addresses and rules failed; keeping their Leases")
	}
	kept := make([]netip.Addr, 0, len(p.Bind))
	for _, b := range p.Bind {
		kept = append(kept, b.Addr)
	}
	if err := c.addrs.Persist(ctx, kept); err != nil {
		c.log.WithError(err).Warn("shutdown: cannot make the kept addresses outlive this process")
	}
	_, release, _ := plan.Settle(c.mem, p, c.opts.Clock.Now(), c.opts.RetryPeriod, c.opts.Grace, res)
	c.elections.ReleaseNow(ctx, release)
	c.log.WithFields(map[string]any{"kept": len(kept), "released": len(release)}).Info("shutdown complete")
}
