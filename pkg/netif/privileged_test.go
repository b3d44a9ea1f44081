package netif

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/egressvip/egressvip/internal/privtest"
	"github.com/egressvip/egressvip/pkg/model"
)

// topology: a "node" namespace whose interface (eth1 unless named) is a
// veth to a "peer" namespace (the external network). The node has its own
// /24 and a foreign /32.
type topology struct {
	node, peer *privtest.NS
	iface      string
	peerMAC    string
	nodeMAC    string
}

func newTopology(t testing.TB) *topology { return newTopologyOn(t, "eth1") }

func newTopologyOn(t testing.TB, iface string) *topology {
	t.Helper()
	privtest.Require(t)
	tp := &topology{node: privtest.NewNS(t, "nif-node"), peer: privtest.NewNS(t, "nif-peer"), iface: iface}
	tp.wire(t)
	return tp
}

// wire creates the veth pair and its addresses (again, after a test
// deleted it).
func (tp *topology) wire(t testing.TB) {
	t.Helper()
	privtest.Veth(t, tp.node, tp.iface, tp.peer, "ext0")
	tp.node.Exec(t, "ip", "addr", "add", "203.0.113.2/24", "dev", tp.iface)
	tp.node.Exec(t, "ip", "addr", "add", "203.0.113.99/32", "dev", tp.iface)
	tp.node.Exec(t, "ip", "addr", "add", "2001:db8:1::2/64", "dev", tp.iface, "nodad")
	tp.peer.Exec(t, "ip", "addr", "add", "203.0.113.250/24", "dev", "ext0")
	tp.peer.Exec(t, "ip", "addr", "add", "2001:db8:1::250/64", "dev", "ext0", "nodad")
	// Let the peer learn neighbours from unsolicited announcements.
	// (accept_untracked_na applies to routers only, hence forwarding.)
	tp.peer.Exec(t, "sysctl", "-qw", "net.ipv4.conf.ext0.arp_accept=1", "net.ipv6.conf.all.forwarding=1", "net.ipv6.conf.ext0.accept_untracked_na=1")
	tp.nodeMAC = linkMAC(t, tp.node, tp.iface)
	// Sync binds nothing on an interface that is not running yet, and
	// a veth reports running a moment after it was set up.
	waitLinkRunning(t, tp.node, tp.iface)
}

// waitLinkRunning waits (at most 5 s) until dev in ns is up and running
// (operationally up, as linkUp wants it).
func waitLinkRunning(t testing.TB, ns *privtest.NS, dev string) {
	t.Helper()
	for end := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		var links []struct {
			Flags     []string `json:"flags"`
			OperState string   `json:"operstate"`
		}
		out := ns.Exec(t, "ip", "-j", "link", "show", "dev", dev)
		if err := json.Unmarshal([]byte(out), &links); err != nil || len(links) != 1 {
			t.Fatalf("link %s: %v", dev, err)
		}
		// IFF_RUNNING is operationally up, or unknown.
		if slices.Contains(links[0].Flags, "UP") && (links[0].OperState == "UP" || links[0].OperState == "UNKNOWN") {
			return
		}
		if time.Now().After(end) {
			t.Fatalf("%s is not running after 5 s: %s", dev, out)
		}
	}
}

// peerLearns waits until the peer's neighbour table maps ip to the node's
// MAC. The peer never talks to the LoadBalancer IPs: only a gratuitous ARP
// or an unsolicited NA can put them there.
func (tp *topology) peerLearns(t testing.TB, ip netip.Addr, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !tp.peerKnows(t, ip) {
		if time.Now().After(deadline) {
			t.Fatalf("peer did not learn %s from an announcement within %v: %q", ip, within,
				tp.peer.Exec(t, "ip", "neigh", "show", ip.String(), "dev", "ext0"))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// peerKnows says whether the peer maps ip to the node's MAC.
func (tp *topology) peerKnows(t testing.TB, ip netip.Addr) bool {
	return strings.Contains(tp.peer.Exec(t, "ip", "neigh", "show", ip.String(), "dev", "ext0"), tp.nodeMAC)
}

func linkMAC(t testing.TB, ns *privtest.NS, dev string) string {
	var links []struct {
		Address string `json:"address"`
	}
	if err := json.Unmarshal([]byte(ns.Exec(t, "ip", "-j", "link", "show", "dev", dev)), &links); err != nil || len(links) != 1 {
		t.Fatalf("link %s: %v", dev, err)
	}
	return links[0].Address
}

type kernelAddr struct {
	Local      string `json:"local"`
	PrefixLen  int    `json:"prefixlen"`
	Label      string `json:"label"`
	Deprecated bool   `json:"deprecated"`
	NoDAD      bool   `json:"nodad"`
	// NoPrefixRoute: IFA_F_NOPREFIXROUTE.
	NoPrefixRoute bool `json:"noprefixroute"`
	// Valid and Preferred are the remaining lifetimes in seconds
	// (4294967295: forever).
	Valid     uint64 `json:"valid_life_time"`
	Preferred uint64 `json:"preferred_life_time"`
}

func kernelAddrs(t testing.TB, ns *privtest.NS, dev string) map[string]kernelAddr {
	t.Helper()
	var ifs []struct {
		AddrInfo []kernelAddr `json:"addr_info"`
	}
	if err := json.Unmarshal([]byte(ns.Exec(t, "ip", "-j", "addr", "show", "dev", dev)), &ifs); err != nil || len(ifs) != 1 {
		t.Fatalf("addresses of %s: %v", dev, err)
	}
	out := map[string]kernelAddr{}
	for _, a := range ifs[0].AddrInfo {
		out[a.Local] = a
	}
	return out
}

func (tp *topology) manager(t testing.TB, iface string, announce bool) *Manager {
	t.Helper()
	return managerIn(t, tp.node, Config{Interface: iface, Announce: announce, AnnounceCount: 3, AnnounceInterval: 200 * time.Millisecond})
}

// managerIn returns a Manager of cfg working in ns, logging to the test
// when it runs verbose.
func managerIn(t testing.TB, ns *privtest.NS, cfg Config) *Manager {
	t.Helper()
	log := logrus.New()
	log.SetOutput(io.Discard)
	if testing.Verbose() {
		log.SetOutput(t.Output())
		log.SetLevel(logrus.DebugLevel)
	}
	cfg.Log, cfg.NetNS = logrus.NewEntry(log), ns.Handle
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Wait)
	return m
}

var (
	lb4 = netip.MustParseAddr("203.0.113.10")
	lb6 = netip.MustParseAddr("2001:db8:1::10")
)

// bindings are Sync's want for addresses it may add.
func bindings(addrs ...netip.Addr) []model.Binding {
	out := make([]model.Binding, len(addrs))
	for i, a := range addrs {
		out[i] = model.Binding{Addr: a}
	}
	return out
}

// syncAddrs is Sync of addresses it may add, reporting as the tests of
// the add/remove behaviour need it: a failed address is an error.
func syncAddrs(ctx context.Context, m *Manager, want []netip.Addr) (added, removed []netip.Addr, err error) {
	res, err := m.Sync(ctx, bindings(want...))
	errs := []error{err}
	for ip, e := range res.Failed {
		errs = append(errs, fmt.Errorf("%s: %w", ip, e))
	}
	return res.Added, res.Removed, errors.Join(errs...)
}

func TestPrivilegedSyncBindsOnlyOwnedAddresses(t *testing.T) {
	tp := newTopology(t)
	m := tp.manager(t, "eth1", false)
	ctx := context.Background()

	added, removed, err := syncAddrs(ctx, m, []netip.Addr{lb6, lb4, lb4})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(added, []netip.Addr{lb4, lb6}) || len(removed) != 0 {
		t.Fatalf("added %v removed %v", added, removed)
	}
	got := kernelAddrs(t, tp.node, "eth1")
	a4, a6 := got["203.0.113.10"], got["2001:db8:1::10"]
	if a4.PrefixLen != 32 || !a4.Deprecated || a4.Label != "eth1:evip" {
		t.Fatalf("IPv4 address %+v: want /32, deprecated (preferred 0), label eth1:evip", a4)
	}
	if a6.PrefixLen != 128 || !a6.Deprecated || !a6.NoDAD || !a6.NoPrefixRoute {
		t.Fatalf("IPv6 address %+v: want /128, deprecated (preferred 0), nodad, noprefixroute", a6)
	}
	if a4.NoPrefixRoute {
		t.Fatalf("IPv4 address %+v: a /32 has no prefix route to suppress", a4)
	}
	for _, foreign := range []string{"203.0.113.2", "203.0.113.99", "2001:db8:1::2"} {
		if _, ok := got[foreign]; !ok {
			t.Fatalf("foreign address %s vanished", foreign)
		}
	}
	owned, err := m.Owned()
	if err != nil || !slices.Equal(owned, []netip.Addr{lb4, lb6}) {
		t.Fatalf("Owned = %v, %v", owned, err)
	}

	// The same set again changes nothing in the kernel.
	added, removed, err = syncAddrs(ctx, m, []netip.Addr{lb4, lb6})
	if err != nil || len(added)+len(removed) != 0 {
		t.Fatalf("idempotent Sync: added %v removed %v err %v", added, removed, err)
	}

	// A smaller set removes only ours; a wanted foreign address is left alone.
	added, removed, err = syncAddrs(ctx, m, []netip.Addr{lb4, netip.MustParseAddr("203.0.113.99")})
	if err != nil || len(added) != 0 || !slices.Equal(removed, []netip.Addr{lb6}) {
		t.Fatalf("shrink: added %v removed %v err %v", added, removed, err)
	}
	got = kernelAddrs(t, tp.node, "eth1")
	if _, ok := got["2001:db8:1::10"]; ok {
		t.Fatal("IPv6 address not removed")
	}
	if a := got["203.0.113.99"]; a.Deprecated {
		t.Fatal("the foreign /32 was replaced by an owned one")
	}

	if err := m.Cleanup(); err != nil {
		t.Fatal(err)
	}
	got = kernelAddrs(t, tp.node, "eth1")
	if _, ok := got["203.0.113.10"]; ok {
		t.Fatal("Cleanup left an owned address")
	}
	for _, foreign := range []string{"203.0.113.2", "203.0.113.99", "2001:db8:1::2"} {
		if _, ok := got[foreign]; !ok {
			t.Fatalf("Cleanup removed foreign address %s", foreign)
		}
	}
}

func TestPrivilegedOwnedAddressIsNotASource(t *testing.T) {
	tp := newTopology(t)
	m := tp.manager(t, "eth1", false)
	if _, _, err := syncAddrs(context.Background(), m, []netip.Addr{lb4}); err != nil {
		t.Fatal(err)
	}
	// The node's own traffic to the external network keeps its /24 address.
	out := tp.node.Exec(t, "ip", "route", "get", "203.0.113.250")
	if !strings.Contains(out, "src 203.0.113.2") {
		t.Fatalf("route source for the node's own traffic: %s", out)
	}
}

func TestPrivilegedMissingInterface(t *testing.T) {
	tp := newTopology(t)
	m := tp.manager(t, "eth9", false)
	_, _, err := syncAddrs(context.Background(), m, []netip.Addr{lb4})
	if !errors.Is(err, ErrInterfaceNotFound) || !strings.Contains(err.Error(), `"eth9"`) {
		t.Fatalf("err = %v, want ErrInterfaceNotFound naming eth9", err)
	}
}

func TestPrivilegedAnnouncementsReachTheNeighbour(t *testing.T) {
	tp := newTopology(t)
	m := tp.manager(t, "eth1", true)
	if _, _, err := syncAddrs(context.Background(), m, []netip.Addr{lb4, lb6}); err != nil {
		t.Fatal(err)
	}
	// The peer never talked to these addresses: only the gratuitous ARP and
	// the unsolicited NA can put them in its neighbour table.
	tp.peerLearns(t, lb4, 5*time.Second)
	tp.peerLearns(t, lb6, 5*time.Second)
}

func BenchmarkSync(b *testing.B) {
	tp := newTopology(b)
	m := tp.manager(b, "eth1", false)
	ctx := context.Background()
	want := make([]netip.Addr, 1000)
	for i := range want {
		want[i] = netip.MustParseAddr(fmt.Sprintf("198.51.%d.%d", 100+i/250, 1+i%250))
	}
	b.Run("add-and-remove-1000", func(b *testing.B) {
		for b.Loop() {
			if _, _, err := syncAddrs(ctx, m, want); err != nil {
				b.Fatal(err)
			}
			if _, _, err := syncAddrs(ctx, m, nil); err != nil {
				b.Fatal(err)
			}
		}
	})
	if _, _, err := syncAddrs(ctx, m, want); err != nil {
		b.Fatal(err)
	}
	b.Run("unchanged-1000", func(b *testing.B) {
		for b.Loop() {
			if _, _, err := syncAddrs(ctx, m, want); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// Host reports the interface's own addresses, subnets and gateway, never
// the addresses egressvip added.
func TestPrivilegedHostReportsTheNodesOwnAddresses(t *testing.T) {
	tp := newTopology(t)
	tp.node.Exec(t, "ip", "link", "set", "eth1", "up")
	tp.node.Exec(t, "ip", "route", "add", "default", "via", "203.0.113.250", "dev", "eth1")
	m := tp.manager(t, "eth1", false)
	if _, _, err := syncAddrs(context.Background(), m, []netip.Addr{lb4, lb6}); err != nil {
		t.Fatal(err)
	}
	h, err := m.Host()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"203.0.113.2", "203.0.113.99", "2001:db8:1::2"} {
		if !slices.Contains(h.Own, netip.MustParseAddr(want)) {
			t.Errorf("Own %v lacks %s", h.Own, want)
		}
	}
	if slices.Contains(h.Own, lb4) || slices.Contains(h.Own, lb6) {
		t.Errorf("Own %v lists an address egressvip added", h.Own)
	}
	if !slices.Contains(h.Subnets, netip.MustParsePrefix("203.0.113.0/24")) {
		t.Errorf("Subnets %v lack 203.0.113.0/24", h.Subnets)
	}
	if !slices.Contains(h.Gateways, netip.MustParseAddr("203.0.113.250")) {
		t.Errorf("Gateways %v lack 203.0.113.250", h.Gateways)
	}
	if got := m.OwnAddresses(); !slices.Equal(got, h.Own) {
		t.Errorf("OwnAddresses %v, Host().Own %v", got, h.Own)
	}
	// A Manager that has not synced lists the interface itself.
	fresh := tp.manager(t, "eth1", false)
	if h2, err := fresh.Host(); err != nil || !slices.Equal(h2.Own, h.Own) {
		t.Errorf("Host before any Sync: %v, %v; want Own %v", h2.Own, err, h.Own)
	}
}
