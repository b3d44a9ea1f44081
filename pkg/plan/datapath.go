package plan

import (
	"net/netip"
	"slices"
	"strconv"

	"github.com/egressvip/egressvip/pkg/election"
	"github.com/egressvip/egressvip/pkg/model"
)

// datapath adds the group's firewall rules. Where this node holds the
// group (or is taking it), every egress pod of it — this node's and the
// ones other nodes steer here — is SNATed to the address; until the address
// is bound, the fence drops that traffic instead of letting it leave with
// a node's address. Where another current node holds it, this node's pods
// are steered there. Where nobody holds it, a strict Service's pods are
// held (dropped); the others keep the node's address, as without egressvip.
func (d *decider) datapath(g *group, dec Decision, own bool) {
	self := d.ev.Self
	// Taking the group (its Lease writes under way, or its turn coming
	// while nobody holds it) counts as holding: this node's pods must not
	// leave with its address meanwhile, and the fence drops their traffic
	// until the address is bound.
	holding := own || dec.Holder == self || dec.Reason == ReasonAcquiring || dec.Reason == ReasonWaitingTurn
	for _, s := range g.services {
		if dec.Leader {
			d.p.Reports[s.Key] = report(s, d.in.Node)
		}
		if !s.Egress || s.Fatal() {
			continue
		}
		if s.PendingLocal {
			d.gate = true
		}
		key := s.Key.String()
		steerTo, via := d.steerTarget(dec.Holder)
		for _, e := range s.Endpoints {
			if e.NoEgress != "" {
				continue
			}
			for _, fam := range []struct {
				pod, lb netip.Addr
				ok      bool
			}{{e.V4, s.LBv4, s.EgressIPv4}, {e.V6, s.LBv6, s.EgressIPv6}} {
				if !fam.ok || !fam.pod.IsValid() || !fam.lb.IsValid() || !allows(s.Filter, fam.pod) {
					continue
				}
				switch {
				case holding && (e.Local || !e.Unverified):
					d.snat = append(d.snat, model.SNATRule{Service: key, Pod: fam.pod, Source: fam.lb, Filter: s.Filter, Remote: !e.Local,
						KeepConntrack: !s.FlushConntrack})
					d.p.owned[s.Key] = true
				case holding:
					// Another node's pod not confirmed yet: its
					// steered traffic is dropped here, not sent
					// with this node's address.
					d.hold = append(d.hold, model.HoldRule{Service: key, Pod: fam.pod, Filter: s.Filter})
					d.p.owned[s.Key] = true
				case !e.Local:
				case steerTo != "" && len(familyOf(via, fam.pod)) > 0 || steerTo != "" && d.in.Tunnel != nil:
					d.steer = append(d.steer, model.SteerRule{Service: key, Pod: fam.pod, Holder: steerTo,
						Via: familyOf(via, fam.pod), Filter: s.Filter, Tunnel: d.in.Tunnel != nil, KeepConntrack: !s.FlushConntrack})
					d.p.owned[s.Key] = true
					d.p.Steered++
				case s.Strict:
					d.hold = append(d.hold, model.HoldRule{Service: key, Pod: fam.pod, Filter: s.Filter})
					d.p.owned[s.Key] = true
				}
			}
		}
	}
	if holding {
		return
	}
	// Addresses this node gave up: the SNAT rules of the pods other nodes
	// steered here stay a while (the fence drops that traffic), so that
	// what arrives before their steering follows the new holder never
	// leaves with this node's address.
	for _, a := range g.addrs {
		if !d.mem.Kernel[a] {
			continue
		}
		var rules []model.SNATRule
		for _, s := range g.services {
			if !s.Egress {
				continue
			}
			for _, e := range s.Endpoints {
				if e.Local || e.NoEgress != "" {
					continue
				}
				for _, pod := range []netip.Addr{e.V4, e.V6} {
					if pod.IsValid() && pod.Is4() == a.Is4() && (pod.Is4() && s.EgressIPv4 || pod.Is6() && s.EgressIPv6) {
						rules = append(rules, model.SNATRule{Service: s.Key.String(), Pod: pod, Source: a, Filter: s.Filter, Remote: true,
							KeepConntrack: !s.FlushConntrack})
					}
				}
			}
		}
		d.p.drained[a] = rules
	}
}

// steerTarget is the node this node's pods are steered to for a group held
// by holder, with its next hops: a live current node other than this one.
func (d *decider) steerTarget(holder string) (string, []netip.Addr) {
	if holder == "" || holder == d.ev.Self {
		return "", nil
	}
	p, ok := d.ev.Peers[holder]
	if !ok || !p.Live || p.Version < election.ProtocolVersion {
		return "", nil
	}
	return holder, p.Via
}

// allows reports whether f lets any destination of pod's family pass: an
// allow-list with networks of the other family only lets none (kube-vip's
// rule): that family is not egressed at all.
func allows(f model.Filter, pod netip.Addr) bool {
	if len(f.Allow) == 0 {
		return true
	}
	return slices.ContainsFunc(f.Allow, func(p netip.Prefix) bool { return p.Addr().Is4() == pod.Is4() })
}

// familyOf keeps the addresses of pod's family.
func familyOf(addrs []netip.Addr, pod netip.Addr) []netip.Addr {
	var out []netip.Addr
	for _, a := range addrs {
		if a.Is4() == pod.Is4() {
			out = append(out, a)
		}
	}
	return out
}

// drainedRules keeps the rules of addresses given up earlier, while their
// grace lasts, unless this plan programs the pod anyway.
func (d *decider) drainedRules() {
	have := map[netip.Addr]bool{}
	for _, r := range d.snat {
		have[r.Pod] = true
	}
	for _, dr := range d.next.Drained {
		for _, r := range dr.Rules {
			if !have[r.Pod] {
				d.snat = append(d.snat, r)
				have[r.Pod] = true
			}
		}
	}
	for _, rules := range d.p.drained {
		for _, r := range rules {
			if !have[r.Pod] {
				d.snat = append(d.snat, r)
				have[r.Pod] = true
			}
		}
	}
}

// finish assembles the datapath and routes.
func (d *decider) finish() {
	dp := &d.p.Datapath
	dp.SNAT, dp.Steer, dp.Hold = d.snat, d.steer, d.hold
	dp.Exclude = d.in.Exclude
	fenced := map[netip.Addr]bool{}
	for _, r := range d.snat {
		fenced[r.Source] = true
	}
	for a := range fenced {
		dp.Fenced = append(dp.Fenced, a)
	}
	slices.SortFunc(dp.Fenced, compareAddrs)
	if d.gate && len(d.in.PodCIDRs) > 0 {
		dp.Gate = &model.Gate{PodCIDRs: d.in.PodCIDRs, Known: d.in.KnownPods}
	}
	d.p.Routes = model.Routes{Steer: d.steer}
	if t := d.in.Tunnel; t != nil {
		tun := *t
		tun.Peers = nil
		for _, n := range sortedPeers(d.ev.Peers) {
			p := d.ev.Peers[n]
			if p.VTEPMAC == "" || !p.VTEPUnderlay.IsValid() {
				continue
			}
			tun.Peers = append(tun.Peers, model.TunnelPeer{Node: n, Underlay: p.VTEPUnderlay, MAC: p.VTEPMAC, Inner: p.Via})
		}
		d.p.Routes.Tunnel = &tun
	}
	slices.SortFunc(d.p.Bind, func(a, b model.Binding) int { return compareAddrs(a.Addr, b.Addr) })
	slices.SortFunc(d.p.Probe, compareAddrs)
}

func sortedPeers(peers map[string]model.Peer) []string {
	out := make([]string, 0, len(peers))
	for n := range peers {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// report is what the holder writes on a Service: its addresses, itself,
// the first egress pod (kube-vip's active-endpoint) and the counts.
func report(s *model.Service, node string) Report {
	r := Report{VIPHost: node}
	for _, a := range s.Addresses() {
		r.Ingress = append(r.Ingress, a.String())
	}
	if !s.Egress {
		return r
	}
	egress, steered := 0, 0
	for _, e := range s.Endpoints {
		if e.NoEgress != "" {
			continue
		}
		egress++
		if e.Node != node {
			steered++
		}
		if r.ActiveEndpoint == "" && s.EgressIPv4 && s.LBv4.IsValid() && e.V4.IsValid() {
			r.ActiveEndpoint = e.V4.String()
		}
		if r.ActiveEndpointIPv6 == "" && s.EgressIPv6 && s.LBv6.IsValid() && e.V6.IsValid() {
			r.ActiveEndpointIPv6 = e.V6.String()
		}
	}
	r.Egress, r.Steered = strconv.Itoa(egress), strconv.Itoa(steered)
	return r
}
