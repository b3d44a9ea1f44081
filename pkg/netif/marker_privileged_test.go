package netif

import (
	"context"
	"net/netip"
	"slices"
	"testing"
)

// kernelProto reads the address protocol of ip on the manager's interface
// (iproute2 before 6.3 does not show it).
func kernelProto(t testing.TB, m *Manager, ip netip.Addr) (proto uint8, found bool) {
	t.Helper()
	l, err := m.link()
	if err != nil {
		t.Fatal(err)
	}
	err = m.eachAddr(l.Attrs().Index, func() { found = false }, func(a ifAddr, _ []byte) error {
		if a.ip == ip {
			proto, found = a.proto, true
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return proto, found
}

// An interface whose name leaves no room for the label: the address
// protocol marks egressvip's addresses, so every path that removes them
// (shrinking want, restart, cleanup) finds them, and nothing else.
func TestPrivilegedLongInterfaceName(t *testing.T) {
	const iface = "enp1s0f0.100" // 12 characters: "enp1s0f0.100:evip" would be 17
	if !kernelHasAddrProto() {
		t.Skip("kernel before 5.18: no address protocol; TestPrivilegedLegacyMarkers covers the label")
	}
	tp := newTopologyOn(t, iface)
	// Foreign full-length addresses that look like old owned ones but for
	// the marker: deprecated IPv4 with the default label, deprecated IPv6
	// without NODAD.
	tp.node.Exec(t, "ip", "addr", "add", "203.0.113.98/32", "dev", iface, "preferred_lft", "0")
	tp.node.Exec(t, "ip", "addr", "add", "2001:db8:1::98/128", "dev", iface, "preferred_lft", "0")
	foreign := []string{"203.0.113.2", "203.0.113.99", "203.0.113.98", "2001:db8:1::2", "2001:db8:1::98"}
	checkForeign := func(when string) {
		t.Helper()
		got := kernelAddrs(t, tp.node, iface)
		for _, f := range foreign {
			if _, ok := got[f]; !ok {
				t.Fatalf("%s: foreign address %s vanished", when, f)
			}
		}
	}
	m := tp.manager(t, iface, false)
	ctx := context.Background()

	added, _, err := syncAddrs(ctx, m, []netip.Addr{lb4, lb6})
	if err != nil || !slices.Equal(added, []netip.Addr{lb4, lb6}) {
		t.Fatalf("Sync: added %v, err %v", added, err)
	}
	got := kernelAddrs(t, tp.node, iface)
	if a := got[lb4.String()]; a.PrefixLen != 32 || !a.Deprecated {
		t.Fatalf("IPv4 address %+v: want /32, deprecated", a)
	}
	if a := got[lb6.String()]; a.PrefixLen != 128 || !a.Deprecated || !a.NoDAD {
		t.Fatalf("IPv6 address %+v: want /128, deprecated, nodad", a)
	}
	for _, ip := range []netip.Addr{lb4, lb6} {
		if p, _ := kernelProto(t, m, ip); p != AddrProto {
			t.Fatalf("%s has protocol %#x, want %#x", ip, p, AddrProto)
		}
	}
	if owned, err := m.Owned(); err != nil || !slices.Equal(owned, []netip.Addr{lb4, lb6}) {
		t.Fatalf("Owned = %v, %v", owned, err)
	}
	// A new process finds them.
	if owned, err := tp.manager(t, iface, false).Owned(); err != nil || !slices.Equal(owned, []netip.Addr{lb4, lb6}) {
		t.Fatalf("Owned after a restart = %v, %v", owned, err)
	}
	h, err := m.Host()
	if err != nil || slices.Contains(h.Own, lb4) || !slices.Contains(h.Own, netip.MustParseAddr("203.0.113.98")) {
		t.Fatalf("Host().Own = %v, %v: want the foreign addresses, not ours", h.Own, err)
	}
	if added, removed, err := syncAddrs(ctx, m, []netip.Addr{lb4, lb6}); err != nil || len(added)+len(removed) != 0 {
		t.Fatalf("idempotent Sync: added %v removed %v err %v", added, removed, err)
	}

	// Failover / Service deletion: the IPv4 address goes.
	_, removed, err := syncAddrs(ctx, m, []netip.Addr{lb6})
	if err != nil || !slices.Equal(removed, []netip.Addr{lb4}) {
		t.Fatalf("shrink: removed %v, err %v", removed, err)
	}
	if _, ok := kernelAddrs(t, tp.node, iface)[lb4.String()]; ok {
		t.Fatal("the IPv4 address stayed")
	}
	checkForeign("after shrinking")

	// `egressvip cleanup` (a new process) removes the rest.
	if _, _, err := syncAddrs(ctx, m, []netip.Addr{lb4, lb6}); err != nil {
		t.Fatal(err)
	}
	if err := tp.manager(t, iface, false).Cleanup(); err != nil {
		t.Fatal(err)
	}
	got = kernelAddrs(t, tp.node, iface)
	for _, ip := range []netip.Addr{lb4, lb6} {
		if _, ok := got[ip.String()]; ok {
			t.Fatalf("Cleanup left %s", ip)
		}
	}
	checkForeign("after Cleanup")
}

// Addresses bound by a version before the address protocol (label, NODAD)
// are still found, kept while wanted and removed when not; and a Manager
// on a kernel without IFA_PROTO (forced here) binds addresses a current one
// recognises.
func TestPrivilegedLegacyMarkers(t *testing.T) {
	tp := newTopology(t)
	old4, old6 := netip.MustParseAddr("203.0.113.11"), netip.MustParseAddr("2001:db8:1::11")
	tp.node.Exec(t, "ip", "addr", "add", old4.String()+"/32", "dev", "eth1", "label", "eth1:evip", "preferred_lft", "0")
	tp.node.Exec(t, "ip", "addr", "add", old6.String()+"/128", "dev", "eth1", "nodad", "preferred_lft", "0")
	m := tp.manager(t, "eth1", false)
	ctx := context.Background()
	if owned, err := m.Owned(); err != nil || !slices.Equal(owned, []netip.Addr{old4, old6}) {
		t.Fatalf("Owned = %v, %v: want the addresses an older version bound", owned, err)
	}
	// Still wanted after the upgrade: kept as they are, not re-added.
	added, removed, err := syncAddrs(ctx, m, []netip.Addr{old4, old6})
	if err != nil || len(added)+len(removed) != 0 {
		t.Fatalf("upgrade Sync: added %v removed %v err %v", added, removed, err)
	}
	_, removed, err = syncAddrs(ctx, m, nil)
	if err != nil || !slices.Equal(removed, []netip.Addr{old4, old6}) {
		t.Fatalf("removed %v, err %v", removed, err)
	}

	// Fallback: no protocol, the label and NODAD only.
	legacy := tp.manager(t, "eth1", false)
	legacy.proto = false
	if _, _, err := syncAddrs(ctx, legacy, []netip.Addr{lb4, lb6}); err != nil {
		t.Fatal(err)
	}
	got := kernelAddrs(t, tp.node, "eth1")
	if a := got[lb4.String()]; a.Label != "eth1:evip" || !a.Deprecated {
		t.Fatalf("fallback IPv4 address %+v: want label eth1:evip, deprecated", a)
	}
	if p, _ := kernelProto(t, m, lb4); p != 0 {
		t.Fatalf("fallback address has protocol %#x", p)
	}
	if owned, err := m.Owned(); err != nil || !slices.Equal(owned, []netip.Addr{lb4, lb6}) {
		t.Fatalf("Owned = %v, %v", owned, err)
	}
	if err := m.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if owned, err := m.Owned(); err != nil || len(owned) != 0 {
		t.Fatalf("after Cleanup: Owned = %v, %v", owned, err)
	}
	// New addresses carry both markers while the label fits, so that a
	// downgraded egressvip still finds them.
	if kernelHasAddrProto() {
		if _, _, err := syncAddrs(ctx, m, []netip.Addr{lb4}); err != nil {
			t.Fatal(err)
		}
		if a := kernelAddrs(t, tp.node, "eth1")[lb4.String()]; a.Label != "eth1:evip" {
			t.Fatalf("IPv4 address %+v lacks the label", a)
		}
		if p, _ := kernelProto(t, m, lb4); p != AddrProto {
			t.Fatalf("protocol %#x", p)
		}
	}
}
