package allocator

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// Family is an IP family.
type Family uint8

// The two families.
const (
	IPv4 Family = iota
	IPv6
)

func (f Family) String() string {
	if f == IPv6 {
		return "ipv6"
	}
	return "ipv4"
}

func familyOf(a netip.Addr) Family {
	if a.Is4() {
		return IPv4
	}
	return IPv6
}

// Families is what a Service asks for, as kube-vip-cloud-provider reads
// spec.ipFamilyPolicy and spec.ipFamilies: single-stack (or no policy) one
// address of ipFamilies[0] (without ipFamilies: IPv4 if the pool has any,
// else IPv6); PreferDualStack one of each family the pool has, at least one
// needed; RequireDualStack one of each, both needed. The first family is
// ipFamilies[0]; the annotation lists the addresses in this order.
func Families(svc *corev1.Service, p Pool) (fams []Family, all bool, err error) {
	primary, secondary := IPv4, IPv6
	if len(svc.Spec.IPFamilies) > 0 && svc.Spec.IPFamilies[0] == corev1.IPv6Protocol {
		primary, secondary = IPv6, IPv4
	}
	policy := corev1.IPFamilyPolicySingleStack
	if svc.Spec.IPFamilyPolicy != nil {
		policy = *svc.Spec.IPFamilyPolicy
	}
	switch policy {
	case corev1.IPFamilyPolicyRequireDualStack:
		for _, f := range []Family{primary, secondary} {
			if !p.has(f) {
				return nil, false, fmt.Errorf("RequireDualStack, but pool %s has no %s addresses", p.Key, f)
			}
		}
		return []Family{primary, secondary}, true, nil
	case corev1.IPFamilyPolicyPreferDualStack:
		for _, f := range []Family{primary, secondary} {
			if p.has(f) {
				fams = append(fams, f)
			}
		}
		return fams, false, nil
	}
	f := primary
	if len(svc.Spec.IPFamilies) == 0 && !p.has(IPv4) {
		f = IPv6
	}
	if !p.has(f) {
		return nil, false, fmt.Errorf("pool %s has no %s addresses", p.Key, f)
	}
	return []Family{f}, true, nil
}

// holder is a Service that carries an address.
type holder struct {
	namespace, name string
	// ports are its spec.ports; nil makes the address unshareable.
	ports []int32
}

// holding is everything known to use one address.
type holding struct {
	holders []holder
	// claim is the address's claim Lease, nil without one.
	claim *claim
	// taken marks an address whose claim exists but is not known yet (a
	// Create answered AlreadyExists).
	taken bool
	// touched: the claim is written in this pass; one write per claim
	// and pass, since each needs the claim's latest resourceVersion.
	touched bool
}

// Usage is every address in use: carried by a Service (its annotation,
// spec.loadBalancerIP or status, of any class and type) or claimed.
type Usage struct {
	addrs    map[netip.Addr]*holding
	services []*corev1.Service
	// ports of every Service by namespace/name, for the members of
	// claims; built on first use (sharing only).
	ports map[string][]int32
}

// NewUsage builds the usage from Services and claims.
func NewUsage(services []*corev1.Service, claims []*claim) *Usage {
	u := &Usage{addrs: make(map[netip.Addr]*holding, len(services)+len(claims)), services: services}
	var buf [4]netip.Addr
	for _, svc := range services {
		as := carried(svc, buf[:0])
		if len(as) == 0 {
			continue
		}
		ports := servicePorts(svc)
		for _, a := range as {
			h := u.get(a)
			h.holders = append(h.holders, holder{namespace: svc.Namespace, name: svc.Name, ports: ports})
		}
	}
	for _, c := range claims {
		u.get(c.addr).claim = c
	}
	return u
}

// portsOf is the ports of the Service namespace/name, if known.
func (u *Usage) portsOf(key string) ([]int32, bool) {
	if u.ports == nil {
		u.ports = make(map[string][]int32, len(u.services))
		for _, svc := range u.services {
			u.ports[svc.Namespace+"/"+svc.Name] = servicePorts(svc)
		}
	}
	p, ok := u.ports[key]
	return p, ok
}

func (u *Usage) get(a netip.Addr) *holding {
	h := u.addrs[a]
	if h == nil {
		h = &holding{}
		u.addrs[a] = h
	}
	return h
}

// Used tells whether anything uses a.
func (u *Usage) Used(a netip.Addr) bool { return u.addrs[a] != nil }

func servicePorts(svc *corev1.Service) []int32 {
	if len(svc.Spec.Ports) == 0 {
		return nil
	}
	out := make([]int32, 0, len(svc.Spec.Ports))
	for _, p := range svc.Spec.Ports {
		out = append(out, p.Port)
	}
	return out
}

// carried appends to buf the addresses a Service carries:
// kube-vip.io/loadbalancerIPs, spec.loadBalancerIP and
// status.loadBalancer.ingress, whatever their class, type or validity
// elsewhere. Items that are no address are skipped: they use nothing.
func carried(svc *corev1.Service, buf []netip.Addr) []netip.Addr {
	out := buf
	add := func(s string) {
		if s == "" {
			return
		}
		if a, err := netip.ParseAddr(strings.TrimSpace(s)); err == nil && !slices.Contains(out, a.Unmap()) {
			out = append(out, a.Unmap())
		}
	}
	for rest := svc.Annotations[AnnotationLoadBalancerIPs]; rest != ""; {
		var item string
		item, rest, _ = strings.Cut(rest, ",")
		add(item)
	}
	add(svc.Spec.LoadBalancerIP)
	for _, in := range svc.Status.LoadBalancer.Ingress {
		add(in.IP)
	}
	return out
}

// Pending tells whether a Service asks for an address: neither
// kube-vip.io/loadbalancerIPs nor spec.loadBalancerIP is set.
func Pending(svc *corev1.Service) bool {
	return svc.DeletionTimestamp == nil && strings.TrimSpace(svc.Annotations[AnnotationLoadBalancerIPs]) == "" &&
		strings.TrimSpace(svc.Spec.LoadBalancerIP) == ""
}

// maxRefusedRun bounds one search through refused addresses (an IPv6 /64
// inside the pod CIDR would otherwise be searched for ever).
const maxRefusedRun = 1 << 16

// NextFree is the first address of ranges (all of one family) in search
// order (ascending, or descending with desc), starting at start if it is
// valid, that is not used, not refused, and for IPv4 not x.x.x.0 or
// x.x.x.255 (which kube-vip-cloud-provider never hands out). stop is where
// the search ended: every address before it, in search order, is
// unavailable. reason, when nothing was found after maxRefusedRun refused
// addresses, names the last.
func NextFree(ranges []Range, desc bool, start netip.Addr, used func(netip.Addr) bool, refuse func(netip.Addr) string) (found, stop netip.Addr, reason string) {
	refused := 0
	n := len(ranges)
	for k := range n {
		r := ranges[k]
		if desc {
			r = ranges[n-1-k]
		}
		a, end := r.From, r.To
		if desc {
			a, end = r.To, r.From
		}
		if start.IsValid() {
			if !desc {
				if r.To.Less(start) {
					continue
				}
				if a.Less(start) {
					a = start
				}
			} else {
				if start.Less(r.From) {
					continue
				}
				if start.Less(a) {
					a = start
				}
			}
		}
		for {
			if !skippedEnd(a) && !used(a) {
				why := ""
				if refuse != nil {
					why = refuse(a)
				}
				if why == "" {
					return a, a, ""
				}
				if refused++; refused >= maxRefusedRun {
					return netip.Addr{}, step(a, desc), fmt.Sprintf("%d addresses in a row are refused, the last %s: %s", refused, a, why)
				}
			}
			if a == end {
				break
			}
			a = step(a, desc)
		}
	}
	return netip.Addr{}, netip.Addr{}, ""
}

func step(a netip.Addr, desc bool) netip.Addr {
	if desc {
		return a.Prev()
	}
	return a.Next()
}

// skippedEnd is kube-vip-cloud-provider's rule: an IPv4 address ending in
// .0 or .255 is never handed out, in CIDRs and ranges alike.
func skippedEnd(a netip.Addr) bool {
	if !a.Is4() {
		return false
	}
	b := a.As4()
	return b[3] == 0 || b[3] == 255
}

// Choice is the addresses planned for one Service.
type Choice struct {
	// Addrs in annotation order.
	Addrs []netip.Addr
	// Join is, per address, the claim to update to share it; nil means
	// create one.
	Join []*claim
	// Members is, per address, the Services (names in the namespace) to
	// record on its claim, this one included.
	Members [][]string
	// Shared is, per address, whether other Services already carry it.
	Shared []bool
}

// Planner chooses addresses for the Services of one pass. It is pure: the
// same usage, pools and Services give the same choices on every node.
type Planner struct {
	usage  *Usage
	refuse func(netip.Addr) string
	// cursor is where each pool's search in each family resumes: every
	// address before it is unavailable, and stays so within a pass
	// (nothing is freed during a pass).
	cursor map[cursorKey]netip.Addr
	// full remembers searches that found nothing, with their reason.
	full map[cursorKey]string
	// byNamespace lists, per namespace, the IPv4 addresses only that
	// namespace uses, for sharing; built on first use.
	byNamespace map[string][]netip.Addr
}

type cursorKey struct {
	pool string
	fam  Family
}

// NewPlanner plans on usage, which it updates with every choice.
func NewPlanner(u *Usage, refuse func(netip.Addr) string) *Planner {
	return &Planner{usage: u, refuse: refuse, cursor: map[cursorKey]netip.Addr{}, full: map[cursorKey]string{}}
}

// deferred is one's answer when svc should share an address whose claim
// is written in this pass.
const deferred = "\x00deferred"

// Choose picks the addresses of svc from pool p, or says why it cannot. No
// address and no reason means: plan it again in the next pass (it shares an
// address whose claim this pass writes).
func (pl *Planner) Choose(svc *corev1.Service, p Pool) (Choice, string) {
	fams, all, err := Families(svc, p)
	if err != nil {
		return Choice{}, err.Error()
	}
	var c Choice
	var missing []string
	for _, f := range fams {
		a, join, members, shared, why := pl.one(svc, p, f)
		if why == deferred {
			return Choice{}, ""
		}
		if !a.IsValid() {
			if all {
				return Choice{}, why
			}
			missing = append(missing, why)
			continue
		}
		c.Addrs = append(c.Addrs, a)
		c.Join = append(c.Join, join)
		c.Members = append(c.Members, members)
		c.Shared = append(c.Shared, shared)
	}
	if len(c.Addrs) == 0 {
		return Choice{}, strings.Join(missing, "; ")
	}
	// Commit: the addresses are used from now on in this pass.
	for i, a := range c.Addrs {
		h := pl.usage.get(a)
		h.holders = append(h.holders, holder{namespace: svc.Namespace, name: svc.Name, ports: servicePorts(svc)})
		// Its claim is written in this pass; another Service can share
		// it in the next, with the claim's new resourceVersion.
		h.touched = true
		if familyOf(a) == IPv4 && pl.byNamespace != nil && !c.Shared[i] {
			pl.byNamespace[svc.Namespace] = insertSorted(pl.byNamespace[svc.Namespace], a)
		}
	}
	if pl.usage.ports != nil {
		pl.usage.ports[svc.Namespace+"/"+svc.Name] = servicePorts(svc)
	}
	return c, ""
}

// one picks one address of family f: a shared one if the pool allows it,
// else the next free one.
func (pl *Planner) one(svc *corev1.Service, p Pool, f Family) (a netip.Addr, join *claim, members []string, shared bool, why string) {
	if f == IPv4 && p.Share {
		a, join, members, wait := pl.shareable(svc, p)
		if wait {
			return netip.Addr{}, nil, nil, false, deferred
		}
		if a.IsValid() {
			return a, join, members, true, ""
		}
	}
	k := cursorKey{p.Key, f}
	if why, ok := pl.full[k]; ok {
		return netip.Addr{}, nil, nil, false, why
	}
	start := pl.cursor[k]
	found, stop, reason := NextFree(p.rangesOf(f), p.Desc, start, pl.usage.Used, pl.refuse)
	if !found.IsValid() {
		why = fmt.Sprintf("pool %s has no free %s address", p.Key, f)
		if reason != "" {
			why += " (" + reason + ")"
			pl.cursor[k] = stop
		} else {
			pl.full[k] = why
		}
		return netip.Addr{}, nil, nil, false, why
	}
	pl.cursor[k] = found
	return found, nil, []string{svc.Name}, false, ""
}

// shareable is the first IPv4 address of p, in search order, that only
// Services of svc's namespace carry, none of them without ports, none
// with a port of svc (kube-vip-cloud-provider compares port numbers, not
// protocols), whose claim (if any) names that namespace and that is not
// refused.
func (pl *Planner) shareable(svc *corev1.Service, p Pool) (_ netip.Addr, _ *claim, _ []string, wait bool) {
	mine := servicePorts(svc)
	if len(mine) == 0 {
		return netip.Addr{}, nil, nil, false
	}
	if pl.byNamespace == nil {
		pl.byNamespace = pl.exclusive()
	}
	cands := pl.byNamespace[svc.Namespace]
	for i := range cands {
		a := cands[i]
		if p.Desc {
			a = cands[len(cands)-1-i]
		}
		if !p.contains(a) {
			continue
		}
		h := pl.usage.addrs[a]
		if h == nil || h.taken || len(h.holders) == 0 {
			continue
		}
		if h.claim != nil && h.claim.namespace != svc.Namespace {
			continue
		}
		members := map[string]bool{svc.Name: true}
		clash := false
		check := func(ports []int32) {
			if ports == nil || slices.ContainsFunc(ports, func(p int32) bool { return slices.Contains(mine, p) }) {
				clash = true
			}
		}
		for _, ho := range h.holders {
			if ho.namespace != svc.Namespace {
				clash = true
				break
			}
			members[ho.name] = true
			check(ho.ports)
		}
		if h.claim != nil {
			for _, m := range h.claim.members {
				// A member this node does not know (deleted, or too
				// new to be seen) only loses its port check.
				if ports, ok := pl.usage.portsOf(svc.Namespace + "/" + m); ok && !members[m] {
					check(ports)
				}
			}
		}
		if clash || (pl.refuse != nil && pl.refuse(a) != "") {
			continue
		}
		if h.touched {
			// Its claim is written in this pass: share it in the next.
			return netip.Addr{}, nil, nil, true
		}
		names := make([]string, 0, len(members))
		for m := range members {
			names = append(names, m)
		}
		slices.Sort(names)
		return a, h.claim, names, false
	}
	return netip.Addr{}, nil, nil, false
}

// exclusive lists, per namespace and sorted, the IPv4 addresses whose
// holders and claim are all of that namespace.
func (pl *Planner) exclusive() map[string][]netip.Addr {
	out := map[string][]netip.Addr{}
	for a, h := range pl.usage.addrs {
		if !a.Is4() || len(h.holders) == 0 {
			continue
		}
		ns := h.holders[0].namespace
		if h.claim != nil && h.claim.namespace != ns {
			continue
		}
		if slices.ContainsFunc(h.holders, func(x holder) bool { return x.namespace != ns }) {
			continue
		}
		out[ns] = append(out[ns], a)
	}
	for _, l := range out {
		slices.SortFunc(l, netip.Addr.Compare)
	}
	return out
}

func insertSorted(l []netip.Addr, a netip.Addr) []netip.Addr {
	i, found := slices.BinarySearchFunc(l, a, netip.Addr.Compare)
	if found {
		return l
	}
	return slices.Insert(l, i, a)
}

// sortPending orders the Services waiting for an address: oldest first,
// then by namespace and name, so every allocator plans alike.
func sortPending(l []*corev1.Service) {
	slices.SortFunc(l, func(a, b *corev1.Service) int {
		if c := a.CreationTimestamp.Compare(b.CreationTimestamp.Time); c != 0 {
			return c
		}
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})
}
