package netif

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/egressvip/egressvip/internal/privtest"
)

// manyIPv6 are n addresses in 2001:db8:5::/64.
func manyIPv6(n int) []netip.Addr {
	out := make([]netip.Addr, n)
	for i := range out {
		out[i] = netip.MustParseAddr(fmt.Sprintf("2001:db8:5::%x:%x", 1+i/256, 1+i%256))
	}
	return out
}

// withDefaultRoutes routes both families' default through the peer.
func (tp *topology) withDefaultRoutes(t testing.TB) {
	t.Helper()
	tp.node.Exec(t, "ip", "route", "add", "default", "via", "203.0.113.250", "dev", tp.iface)
	tp.node.Exec(t, "ip", "-6", "route", "add", "default", "via", "2001:db8:1::250", "dev", tp.iface)
}

// withSecondInterface adds a second veth, eth2 (peer end ext1), with
// addresses of its own, and routes through both interfaces that Host must
// tell apart: multipath routes with one next hop on each, routes through
// eth2 only and, in another table, through eth1.
func (tp *topology) withSecondInterface(t testing.TB) {
	t.Helper()
	privtest.Veth(t, tp.node, "eth2", tp.peer, "ext1")
	tp.node.Exec(t, "ip", "addr", "add", "198.51.100.130/25", "dev", "eth2")
	tp.node.Exec(t, "ip", "addr", "add", "2001:db8:2::2/64", "dev", "eth2", "nodad")
	// Looks like an owned address, but on another interface.
	tp.node.Exec(t, "ip", "addr", "add", "2001:db8:2::99/128", "dev", "eth2", "nodad", "preferred_lft", "0")
	tp.peer.Exec(t, "ip", "addr", "add", "198.51.100.129/25", "dev", "ext1")
	tp.peer.Exec(t, "ip", "addr", "add", "2001:db8:2::1/64", "dev", "ext1", "nodad")
	for _, r := range [][]string{
		{"ip", "route", "add", "198.51.100.0/26", "nexthop", "via", "203.0.113.251", "dev", tp.iface, "nexthop", "via", "198.51.100.129", "dev", "eth2"},
		{"ip", "-6", "route", "add", "2001:db8:77::/48", "nexthop", "via", "2001:db8:1::251", "dev", tp.iface, "nexthop", "via", "2001:db8:2::1", "dev", "eth2"},
		{"ip", "route", "add", "198.51.100.64/26", "via", "198.51.100.129", "dev", "eth2"},
		{"ip", "-6", "route", "add", "2001:db8:78::/48", "via", "2001:db8:2::1", "dev", "eth2"},
		{"ip", "route", "add", "default", "via", "203.0.113.253", "dev", tp.iface, "table", "100"},
		{"ip", "-6", "route", "add", "default", "via", "2001:db8:1::253", "dev", tp.iface, "table", "100"},
	} {
		tp.node.Exec(t, r...)
	}
}

type kernelRoute struct {
	Dst      string `json:"dst"`
	Dev      string `json:"dev"`
	Protocol string `json:"protocol"`
}

// kernelRoutes lists a routing table of the node for one family ("-4",
// "-6").
func kernelRoutes(t testing.TB, ns *privtest.NS, family, table string) []kernelRoute {
	t.Helper()
	var out []kernelRoute
	if err := json.Unmarshal([]byte(ns.Exec(t, "ip", "-j", family, "route", "show", "table", table)), &out); err != nil {
		t.Fatalf("routes of table %s: %v", table, err)
	}
	return out
}

// host is the address a route's destination names, when it names one
// (a full-length prefix, which ip prints without its length).
func (r kernelRoute) host() (netip.Addr, bool) {
	if p, err := netip.ParsePrefix(r.Dst); err == nil {
		return p.Addr(), p.IsSingleIP()
	}
	ip, err := netip.ParseAddr(r.Dst)
	return ip, err == nil
}

// udpEcho checks that ip answers from the peer: a datagram the peer sends
// to ip reaches a socket bound to ip in the node, and the echo comes back
// from ip. The peer resolves ip itself (it has it on link), as a router in
// front of a LoadBalancer IP would.
func (tp *topology) udpEcho(t testing.TB, ip netip.Addr) {
	t.Helper()
	var (
		srv, c *net.UDPConn
		err    error
	)
	tp.node.Do(t, func() { srv, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(ip, 0))) })
	if err != nil {
		t.Fatalf("bind to %s in the node: %v", ip, err)
	}
	defer srv.Close()
	go func() {
		buf := make([]byte, 64)
		for {
			n, from, err := srv.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			_, _ = srv.WriteToUDPAddrPort(buf[:n], from)
		}
	}()
	to := srv.LocalAddr().(*net.UDPAddr).AddrPort()
	tp.peer.Do(t, func() { c, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(to)) })
	if err != nil {
		t.Fatalf("peer: %v", err)
	}
	defer c.Close()
	msg := "hello " + ip.String()
	buf := make([]byte, 64)
	for try := range 5 {
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatalf("send to %s: %v", to, err)
		}
		_ = c.SetReadDeadline(time.Now().Add(time.Second))
		n, err := c.Read(buf) // a connected socket takes only what comes from ip
		if err == nil && string(buf[:n]) == msg {
			return
		}
		t.Logf("try %d: no echo from %s: %v", try, to, err)
	}
	t.Fatalf("%s does not answer the peer: %s", ip, tp.peer.Exec(t, "ip", "-6", "neigh", "show", "dev", "ext0"))
}

// With many owned IPv6 addresses the main table gets no route per
// address, the node still answers on them, and Host finds exactly the
// gateways through the interface, whether the kernel filters dumps
// (strict checking) or not.
func TestPrivilegedManyIPv6WithoutPrefixRoutes(t *testing.T) {
	for _, strict := range []bool{true, false} {
		name := "kernel-filtered"
		if !strict {
			name = "unfiltered"
		}
		t.Run(name, func(t *testing.T) {
			tp := newTopology(t)
			tp.withDefaultRoutes(t)
			tp.withSecondInterface(t)
			tp.peer.Exec(t, "ip", "-6", "route", "add", "2001:db8:5::/64", "dev", "ext0")
			m := tp.manager(t, "eth1", false)
			if strict && !m.strict.Load() {
				t.Skip("the kernel has no strict checking of dumps")
			}
			m.strict.Store(strict)
			ctx := context.Background()

			many := manyIPv6(200)
			want := append([]netip.Addr{lb4}, many...)
			added, removed, err := syncAddrs(ctx, m, want)
			if err != nil || len(added) != len(want) || len(removed) != 0 {
				t.Fatalf("Sync: added %d of %d, removed %v, err %v", len(added), len(want), removed, err)
			}
			got := kernelAddrs(t, tp.node, "eth1")
			for _, ip := range many {
				if a := got[ip.String()]; a.PrefixLen != 128 || !a.Deprecated || !a.NoDAD || !a.NoPrefixRoute {
					t.Fatalf("%s: %+v: want /128, deprecated, nodad, noprefixroute", ip, a)
				}
			}

			// No route per address in the main table, IPv4 /32 included;
			// the local table has each one, so the node accepts them.
			for _, family := range []string{"-4", "-6"} {
				for _, r := range kernelRoutes(t, tp.node, family, "main") {
					if ip, ok := r.host(); ok && slices.Contains(want, ip) {
						t.Fatalf("main table has a route for owned %s: %+v", ip, r)
					}
				}
			}
			if n := len(kernelRoutes(t, tp.node, "-6", "main")); n > 10 {
				t.Fatalf("main table has %d IPv6 routes", n)
			}
			local := map[netip.Addr]bool{}
			for _, family := range []string{"-4", "-6"} {
				for _, r := range kernelRoutes(t, tp.node, family, "local") {
					if ip, ok := r.host(); ok && r.Dev == "eth1" {
						local[ip] = true
					}
				}
			}
			for _, ip := range want {
				if !local[ip] {
					t.Fatalf("no local route for %s", ip)
				}
			}

			// Recognised as owned with the flag, and kept as they are.
			if owned, err := m.Owned(); err != nil || !slices.Equal(owned, want) {
				t.Fatalf("Owned: %d addresses, err %v; want %d", len(owned), err, len(want))
			}
			if added, removed, err := syncAddrs(ctx, m, want); err != nil || len(added)+len(removed) != 0 {
				t.Fatalf("idempotent Sync: added %v removed %v err %v", added, removed, err)
			}

			h, err := m.Host()
			if err != nil {
				t.Fatal(err)
			}
			wantGw := []netip.Addr{
				netip.MustParseAddr("203.0.113.250"), netip.MustParseAddr("203.0.113.251"),
				netip.MustParseAddr("2001:db8:1::250"), netip.MustParseAddr("2001:db8:1::251"),
			}
			if !slices.Equal(h.Gateways, wantGw) {
				t.Errorf("Gateways %v, want %v (defaults and multipath next hops through eth1; not eth2's, not table 100's)", h.Gateways, wantGw)
			}
			wantOwn := []netip.Addr{netip.MustParseAddr("203.0.113.2"), netip.MustParseAddr("203.0.113.99"), netip.MustParseAddr("2001:db8:1::2")}
			for _, ip := range wantOwn {
				if !slices.Contains(h.Own, ip) {
					t.Errorf("Own %v lacks %s", h.Own, ip)
				}
			}
			for _, ip := range h.Own {
				if slices.Contains(want, ip) || ip.Is6() && netip.MustParsePrefix("2001:db8:2::/64").Contains(ip) {
					t.Errorf("Own %v has %s: owned, or eth2's", h.Own, ip)
				}
			}
			// Sync's listing ignored eth2; Host before any Sync too.
			if h2, err := tp.manager(t, "eth1", false).Host(); err != nil || !slices.Equal(h2.Own, h.Own) || !slices.Equal(h2.Gateways, h.Gateways) {
				t.Errorf("Host before any Sync: %+v, %v; want %+v", h2, err, h)
			}

			// The node answers on them.
			for _, ip := range []netip.Addr{many[0], many[len(many)/2], many[len(many)-1], lb4} {
				tp.udpEcho(t, ip)
			}

			// Cleanup leaves eth2 alone.
			if err := m.Cleanup(); err != nil {
				t.Fatal(err)
			}
			if owned, err := m.Owned(); err != nil || len(owned) != 0 {
				t.Fatalf("after Cleanup: Owned %d, %v", len(owned), err)
			}
			if _, ok := kernelAddrs(t, tp.node, "eth2")["2001:db8:2::99"]; !ok {
				t.Fatal("Cleanup removed eth2's address")
			}
		})
	}
}

// Owned IPv6 addresses an earlier version bound without
// IFA_F_NOPREFIXROUTE get the flag in place, at the first Sync that keeps
// them: their /128 routes go, the addresses stay bound (Watch sees no
// deletion). Foreign addresses keep theirs.
func TestPrivilegedLegacyPrefixRoutesRemovedInPlace(t *testing.T) {
	tp := newTopology(t)
	kept, gone := netip.MustParseAddr("2001:db8:1::11"), netip.MustParseAddr("2001:db8:1::12")
	foreign := netip.MustParseAddr("2001:db8:1::98") // deprecated, but DAD: not ours
	for _, ip := range []netip.Addr{kept, gone} {
		tp.node.Exec(t, "ip", "addr", "add", ip.String()+"/128", "dev", "eth1", "nodad", "preferred_lft", "0")
	}
	tp.node.Exec(t, "ip", "addr", "add", foreign.String()+"/128", "dev", "eth1", "preferred_lft", "0")
	prefixRoutes := func() map[netip.Addr]bool {
		out := map[netip.Addr]bool{}
		for _, r := range kernelRoutes(t, tp.node, "-6", "main") {
			if ip, ok := r.host(); ok && r.Dev == "eth1" {
				out[ip] = true
			}
		}
		return out
	}
	if r := prefixRoutes(); !r[kept] || !r[gone] || !r[foreign] {
		t.Fatalf("setup: prefix routes %v", r)
	}
	m := tp.manager(t, "eth1", false)
	p := watch(t, m)
	ctx := context.Background()

	added, removed, err := syncAddrs(ctx, m, []netip.Addr{kept, lb6})
	if err != nil || !slices.Equal(added, []netip.Addr{lb6}) || !slices.Equal(removed, []netip.Addr{gone}) {
		t.Fatalf("Sync: added %v removed %v err %v", added, removed, err)
	}
	a := kernelAddrs(t, tp.node, "eth1")
	if k := a[kept.String()]; !k.NoPrefixRoute || !k.NoDAD || !k.Deprecated || k.PrefixLen != 128 {
		t.Fatalf("kept legacy address %+v: want it flagged noprefixroute, still nodad and deprecated", k)
	}
	if f := a[foreign.String()]; f.NoPrefixRoute || f.PrefixLen != 128 {
		t.Fatalf("foreign address %+v was changed", f)
	}
	r := prefixRoutes()
	if r[kept] || r[lb6] || r[gone] {
		t.Fatalf("prefix routes of owned addresses left: %v", r)
	}
	if !r[foreign] {
		t.Fatalf("the foreign address lost its prefix route: %v", r)
	}
	if owned, err := m.Owned(); err != nil || !slices.Equal(owned, []netip.Addr{lb6, kept}) {
		t.Fatalf("Owned = %v, %v", owned, err)
	}
	// The replacement also stamps the protocol.
	if proto, _ := kernelProto(t, m, kept); kernelHasAddrProto() && proto != AddrProto {
		t.Fatalf("upgraded legacy address: protocol %#x, want %#x", proto, AddrProto)
	}
	// Only the deletion of an address Sync removed itself happened.
	p.expectNone(t, 300*time.Millisecond, "the in-place upgrade")
	if added, removed, err := syncAddrs(ctx, m, []netip.Addr{kept, lb6}); err != nil || len(added)+len(removed) != 0 {
		t.Fatalf("second Sync: added %v removed %v err %v", added, removed, err)
	}
	tp.udpEcho(t, kept)
}

// A kernel that checks dumps strictly but refuses their filters gets
// unfiltered dumps from then on.
func TestPrivilegedDumpFallsBackWhenTheKernelRefusesFilters(t *testing.T) {
	tp := newTopology(t)
	m := tp.manager(t, "eth1", false)
	if !m.strict.Load() {
		t.Skip("the kernel has no strict checking of dumps")
	}
	n := 0
	// Strict checking accepts only RTA_TABLE and RTA_OIF in a route dump.
	err := m.dump(unix.RTM_GETROUTE, unix.RTM_NEWROUTE, func(req *nl.NetlinkRequest) {
		req.AddData(&nl.RtMsg{RtMsg: unix.RtMsg{Family: unix.AF_INET6}})
		req.AddData(nl.NewRtAttr(unix.RTA_DST, net.ParseIP("2001:db8:1::")))
	}, func() { n = 0 }, func([]byte) error { n++; return nil })
	if err != nil || n == 0 {
		t.Fatalf("dump: %d routes, err %v", n, err)
	}
	if m.strict.Load() {
		t.Fatal("still strict after the kernel refused a filter")
	}
	if _, _, err := syncAddrs(context.Background(), m, []netip.Addr{lb4, lb6}); err != nil {
		t.Fatal(err)
	}
	if owned, err := m.Owned(); err != nil || !slices.Equal(owned, []netip.Addr{lb4, lb6}) {
		t.Fatalf("Owned = %v, %v", owned, err)
	}
}

// BenchmarkManyIPv6 measures what every sync of the daemon costs with
// 2,000 owned IPv6 addresses: Host (the gateways) and a Sync that changes
// nothing.
func BenchmarkManyIPv6(b *testing.B) {
	tp := newTopology(b)
	tp.withDefaultRoutes(b)
	m := tp.manager(b, "eth1", false)
	ctx := context.Background()
	want := manyIPv6(2000)
	if added, _, err := syncAddrs(ctx, m, want); err != nil || len(added) != len(want) {
		b.Fatalf("Sync: added %d, err %v", len(added), err)
	}
	b.Run("Host", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			h, err := m.Host()
			if err != nil || len(h.Gateways) != 2 {
				b.Fatalf("Host: gateways %v, err %v", h.Gateways, err)
			}
		}
	})
	b.Run("Sync-unchanged", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if added, removed, err := syncAddrs(ctx, m, want); err != nil || len(added)+len(removed) != 0 {
				b.Fatalf("Sync: added %v removed %v err %v", added, removed, err)
			}
		}
	})
}
