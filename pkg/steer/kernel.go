package steer

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// retry runs a dump again when the kernel says it was interrupted (the
// listing changed meanwhile), at most 5 times in all.
func retry(dump func() error) error {
	var err error
	for range 5 {
		if err = dump(); !errors.Is(err, netlink.ErrDumpInterrupted) {
			return err
		}
	}
	return err
}

// ownedRoutes lists egressvip's routes, both families: protocol Proto, in
// the table range. With strict checking the kernel sends only routes of
// that protocol (of every table); otherwise the library drops the others.
func (m *Manager) ownedRoutes() ([]netlink.Route, error) {
	h := m.dumps
	if h == nil {
		h = m.h
	}
	var out []netlink.Route
	filter := &netlink.Route{Protocol: netlink.RouteProtocol(Proto)}
	err := retry(func() error {
		out = out[:0]
		return h.RouteListFilteredIter(netlink.FAMILY_ALL, filter, netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE,
			func(r netlink.Route) bool {
				if r.Table >= m.cfg.TableMin && r.Table <= m.cfg.TableMax {
					out = append(out, r)
				}
				return true
			})
	})
	if err != nil && h == m.dumps && errors.Is(err, unix.EINVAL) {
		// A kernel that refuses the filter: list unfiltered from now on.
		m.dumps.Close()
		m.dumps = nil
		return m.ownedRoutes()
	}
	if err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	return out, nil
}

// defaultRoute is the one route of hop's table.
func (m *Manager) defaultRoute(h hop, table int) *netlink.Route {
	bits := h.gw.BitLen()
	return &netlink.Route{
		Family:    h.family(),
		Table:     table,
		Dst:       &net.IPNet{IP: make(net.IP, bits/8), Mask: net.CIDRMask(0, bits)},
		Gw:        net.IP(h.gw.AsSlice()),
		LinkIndex: h.dev,
		Flags:     h.flags(),
		Protocol:  netlink.RouteProtocol(Proto),
		Scope:     netlink.SCOPE_UNIVERSE,
		Type:      unix.RTN_UNICAST,
	}
}

// fallbackMetric is the metric of each table's unreachable default route:
// the last resort, behind the hop's route.
const fallbackMetric = 0xffffffff

// fallbackRoute is the unreachable default route of a table of family
// fam. It has no device, so it outlives the hop's route when the hop's
// device goes down or away: steered packets are then dropped (and the pod
// told so by ICMP), never sent on to the main table and out with the
// node's address.
func fallbackRoute(fam, table int) *netlink.Route {
	bits := 32
	if fam == netlink.FAMILY_V6 {
		bits = 128
	}
	return &netlink.Route{
		Family:   fam,
		Table:    table,
		Dst:      &net.IPNet{IP: make(net.IP, bits/8), Mask: net.CIDRMask(0, bits)},
		Priority: fallbackMetric,
		Protocol: netlink.RouteProtocol(Proto),
		Scope:    netlink.SCOPE_NOWHERE,
		Type:     unix.RTN_UNREACHABLE,
	}
}

// isFallback says whether r is a table's fallback route.
func isFallback(r *netlink.Route) bool {
	if r.Type != unix.RTN_UNREACHABLE || r.Priority != fallbackMetric {
		return false
	}
	if r.Dst != nil {
		if ones, _ := r.Dst.Mask.Size(); ones != 0 {
			return false
		}
	}
	return true
}

// routeHop says which hop a route of a table is when it is a table's
// default route as defaultRoute writes it.
func routeHop(r *netlink.Route) (hop, bool) {
	if r.Dst != nil {
		if ones, _ := r.Dst.Mask.Size(); ones != 0 {
			return hop{}, false
		}
	}
	gw, ok := netip.AddrFromSlice(r.Gw)
	h := hop{gw: gw.Unmap(), dev: r.LinkIndex}
	if !ok || len(r.MultiPath) != 0 || r.Type != unix.RTN_UNICAST || r.Flags&int(netlink.FLAG_ONLINK) != h.flags() || r.LinkIndex <= 0 {
		return hop{}, false
	}
	return h, true
}

// tables is the outcome of syncTables: the table of each hop written, and
// the owned routes of tables no hop wants any more.
type tables struct {
	ids   map[hop]int
	stale []netlink.Route
}

// syncTables gives every hop of want its table with its one default route,
// reusing the table that already has it. A hop whose route cannot be
// written fails the Services of its rules, and has no table in the result.
func (m *Manager) syncTables(want map[netip.Addr]*wantRule, fail func(string, error)) (tables, error) {
	routes, err := m.ownedRoutes()
	if err != nil {
		return tables{}, err
	}
	byTable := map[int][]int{}
	have := map[int]hop{}
	for i := range routes {
		t := routes[i].Table
		byTable[t] = append(byTable[t], i)
		if h, ok := routeHop(&routes[i]); ok {
			if prev, dup := have[t]; !dup || compareHops(h, prev) < 0 {
				have[t] = h
			}
		}
	}
	hopServices := map[hop][]string{}
	for _, w := range want {
		hopServices[w.hop] = append(hopServices[w.hop], w.services...)
	}
	hops := make([]hop, 0, len(hopServices))
	for h := range hopServices {
		hops = append(hops, h)
	}
	slices.SortFunc(hops, compareHops)
	ids, full := assignTables(hops, have, m.cfg.TableMin, m.cfg.TableMax)
	failHop := func(h hop, err error) {
		delete(ids, h)
		for _, s := range hopServices[h] {
			fail(s, err)
		}
	}
	for _, h := range full {
		failHop(h, fmt.Errorf("no free routing table for next hop %s: the range %d-%d of %s is full", h.gw, m.cfg.TableMin, m.cfg.TableMax, m.cfg.Node))
	}
	var out tables
	kept := map[int]bool{}
	var errs []error
	for _, h := range hops {
		t, ok := ids[h]
		if !ok {
			continue
		}
		kept[t] = true
		found, fallback := false, false
		for _, i := range byTable[t] {
			if rh, ok := routeHop(&routes[i]); ok && rh == h && !found {
				found = true
				continue
			}
			if isFallback(&routes[i]) && routes[i].Family == h.family() && !fallback {
				fallback = true
				continue
			}
			// Anything else in the table goes: it could come first.
			if err := m.delRoute(&routes[i]); err != nil {
				errs = append(errs, err)
			}
		}
		if !fallback {
			// First, so that the table never lacks it.
			if err := m.h.RouteReplace(fallbackRoute(h.family(), t)); err != nil {
				failHop(h, fmt.Errorf("add route unreachable default table %d: %w", t, err))
				continue
			}
			m.writes++
		}
		if found {
			continue
		}
		if err := m.h.RouteReplace(m.defaultRoute(h, t)); err != nil {
			failHop(h, fmt.Errorf("add route default via %s dev %s table %d: %w", h.gw, m.linkName(h.dev), t, err))
			continue
		}
		m.writes++
	}
	for t, idx := range byTable {
		if kept[t] {
			continue
		}
		for _, i := range idx {
			out.stale = append(out.stale, routes[i])
		}
	}
	out.ids = ids
	return out, errors.Join(errs...)
}

// dropTables removes the routes of tables no hop wants: after the rules,
// so that no rule of a steered pod ever points to an empty table (which
// would send its packets on to the main table).
func (m *Manager) dropTables(t tables) error {
	var errs []error
	for i := range t.stale {
		if err := m.delRoute(&t.stale[i]); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (m *Manager) delRoute(r *netlink.Route) error {
	if err := m.h.RouteDel(r); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("remove route %s table %d: %w", r, r.Table, err)
	}
	m.writes++
	return nil
}

func (m *Manager) linkName(index int) string {
	if l, err := m.h.LinkByIndex(index); err == nil {
		return l.Attrs().Name
	}
	return fmt.Sprintf("if%d", index)
}

// ruleKey identifies a rule as egressvip writes it: a steered pod's
// ("from <pod> fwmark <mark>/<mask> lookup <table>"), or one of the two
// guard rules of a family, one and two priorities later:
// "iif lo fwmark <mark>/<mask> lookup main" (packets this node sends, such
// as the VXLAN device's encapsulated ones, which keep the inner packet's
// mark) and "fwmark <mark>/<mask> blackhole" (a marked packet no pod's
// rule takes is dropped, never routed by the main table).
type ruleKey struct {
	family   int
	priority int
	src      netip.Prefix
	mark     uint32
	mask     uint32
	table    int
	// local: the "iif lo" guard; blackhole: the last guard.
	local, blackhole bool
}

// guardKeys are the guard rules of both families.
func (m *Manager) guardKeys() []ruleKey {
	var out []ruleKey
	for _, f := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		out = append(out,
			ruleKey{family: f, priority: m.cfg.RulePriority + 1, mark: m.cfg.Mark, mask: m.cfg.Mark, table: unix.RT_TABLE_MAIN, local: true},
			ruleKey{family: f, priority: m.cfg.RulePriority + 2, mark: m.cfg.Mark, mask: m.cfg.Mark, blackhole: true})
	}
	return out
}

// keyOf returns the key of an owned rule, or false when the rule has
// selectors or actions egressvip never writes.
func keyOf(r *netlink.Rule) (ruleKey, bool) {
	if r.Src == nil && r.Mask != nil && r.Dst == nil && !r.Invert && r.OifName == "" && r.Goto <= 0 && r.Tos == 0 && r.TunID == 0 &&
		r.IPProto == 0 && r.Dport == nil && r.Sport == nil && r.UIDRange == nil && r.SuppressPrefixlen < 0 && r.SuppressIfgroup < 0 && r.Flow <= 0 {
		k := ruleKey{family: r.Family, priority: r.Priority, mark: r.Mark, mask: *r.Mask}
		switch {
		case r.Type == unix.FR_ACT_BLACKHOLE && r.IifName == "" && r.Table <= 0:
			k.blackhole = true
			return k, true
		case (r.Type == unix.FR_ACT_TO_TBL || r.Type == 0) && r.IifName == "lo" && r.Table == unix.RT_TABLE_MAIN:
			k.local, k.table = true, r.Table
			return k, true
		}
		return ruleKey{}, false
	}
	if r.Src == nil || r.Mask == nil || r.Dst != nil || r.Invert || r.IifName != "" || r.OifName != "" ||
		r.Goto > 0 || r.Tos != 0 || r.TunID != 0 || r.IPProto != 0 || r.Dport != nil || r.Sport != nil || r.UIDRange != nil ||
		r.SuppressPrefixlen >= 0 || r.SuppressIfgroup >= 0 || r.Flow > 0 {
		return ruleKey{}, false
	}
	ip, ok := netip.AddrFromSlice(r.Src.IP)
	if !ok {
		return ruleKey{}, false
	}
	ones, _ := r.Src.Mask.Size()
	return ruleKey{family: r.Family, priority: r.Priority, src: netip.PrefixFrom(ip.Unmap(), ones),
		mark: r.Mark, mask: *r.Mask, table: r.Table}, true
}

func (m *Manager) ruleOf(k ruleKey) *netlink.Rule {
	r := netlink.NewRule()
	r.Family = k.family
	r.Priority = k.priority
	r.Mark = k.mark
	mask := k.mask
	r.Mask = &mask
	r.Protocol = Proto
	switch {
	case k.blackhole:
		r.Type = unix.FR_ACT_BLACKHOLE
		return r
	case k.local:
		r.IifName = "lo"
		r.Table = k.table
		return r
	}
	r.Src = &net.IPNet{IP: net.IP(k.src.Addr().AsSlice()), Mask: net.CIDRMask(k.src.Bits(), k.src.Addr().BitLen())}
	r.Table = k.table
	return r
}

// syncRules makes the owned rules exactly one per steered pod whose table
// was written: new ones are added before stale ones are removed, so a pod
// that moves to another holder is steered all along.
func (m *Manager) syncRules(want map[netip.Addr]*wantRule, t tables, fail func(string, error)) error {
	have, odd, err := m.ownedRuleKeys()
	if err != nil {
		return err
	}
	var keys []ruleKey
	wanted := make(map[ruleKey]*wantRule, len(want))
	for pod, w := range want {
		table, ok := t.ids[w.hop]
		if !ok {
			continue
		}
		k := ruleKey{family: family(pod), priority: m.cfg.RulePriority, src: netip.PrefixFrom(pod, pod.BitLen()),
			mark: m.cfg.Mark, mask: m.cfg.Mark, table: table}
		wanted[k] = w
		if have[k] == 0 {
			keys = append(keys, k)
		}
	}
	slices.SortFunc(keys, func(a, b ruleKey) int { return a.src.Addr().Compare(b.src.Addr()) })
	// The guards first: from then on a marked packet that no pod's rule
	// takes is dropped.
	var errs []error
	for _, k := range m.guardKeys() {
		wanted[k] = &wantRule{}
		if have[k] > 0 {
			continue
		}
		if err := m.h.RuleAdd(m.ruleOf(k)); err != nil && !errors.Is(err, unix.EEXIST) {
			if k.family == netlink.FAMILY_V6 && errors.Is(err, unix.EAFNOSUPPORT) {
				continue // IPv6 disabled: nothing to steer either
			}
			errs = append(errs, fmt.Errorf("add guard rule %s: %w", m.ruleOf(k), err))
			continue
		}
		m.writes++
	}
	for _, k := range keys {
		if err := m.h.RuleAdd(m.ruleOf(k)); err != nil && !errors.Is(err, unix.EEXIST) {
			w := wanted[k]
			fail(w.services[0], fmt.Errorf("add rule from %s fwmark %#x/%#x lookup %d: %w", k.src, k.mark, k.mask, k.table, err))
			continue
		}
		m.writes++
	}
	for k, n := range have {
		if wanted[k] != nil {
			n-- // keep one
		}
		for range n {
			if err := m.delRule(m.ruleOf(k)); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if odd {
		if err := m.removeOdd(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (m *Manager) delRule(r *netlink.Rule) error {
	if err := m.h.RuleDel(r); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("remove %s: %w", r, err)
	}
	m.writes++
	return nil
}
