package snat

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/egressvip/egressvip/internal/privtest"
	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/pkg/model"
	"github.com/sirupsen/logrus"
	"github.com/vishvananda/netlink"
)

// The privileged tests build, per backend:
//
//	pod ns (A)            node ns                          external ns
//	10.244.1.5/24  eth0 - vpod 10.244.1.1/24
//	fd00:10:244:1::5/64        fd00:10:244:1::1/64
//	pod ns (B)
//	10.244.1.6/32  eth0 - vpodb (routes to B's /32, /128)
//	fd00:10:244:1::6/128       fe80::1
//	                           vext 203.0.113.1/24 - eth0 203.0.113.2/24, .3
//	                                2001:db8:1::1/64       2001:db8:1::2/64, ::3
//	                           LB   203.0.113.10, 2001:db8:1::10
//
// The node forwards and has a CNI-like MASQUERADE rule for the pod CIDR, so
// a packet that misses our rules arrives from the node address 203.0.113.1.
// The external ns runs servers that answer with the peer address they see.
// The steering test adds a holder ns (see TestPrivilegedSteer).

// backendCase is a backend under test, with the iptables flavour of the
// node's other components (the CNI's MASQUERADE rules): the backend's own
// for the iptables ones, iptables-nft next to the nftables backend.
type backendCase struct {
	name                   string
	ipt, ip6t, save, save6 string
}

var backendCases = []backendCase{
	{BackendIPTablesLegacy, "iptables-legacy", "ip6tables-legacy", "iptables-legacy-save", "ip6tables-legacy-save"},
	{BackendIPTablesNFT, "iptables-nft", "ip6tables-nft", "iptables-nft-save", "ip6tables-nft-save"},
	{BackendNFTables, "iptables-nft", "ip6tables-nft", "iptables-nft-save", "ip6tables-nft-save"},
}

func (b backendCase) iptables() bool { return b.name != BackendNFTables }

var (
	node6      = netip.MustParseAddr("2001:db8:1::1")
	extSrv4    = netip.MustParseAddr("203.0.113.2")
	extSrv6    = netip.MustParseAddr("2001:db8:1::2")
	extSrv4b   = netip.MustParseAddr("203.0.113.3")
	extSrv6b   = netip.MustParseAddr("2001:db8:1::3")
	nodePod4   = netip.MustParseAddr("10.244.1.1")
	nodePod6   = netip.MustParseAddr("fd00:10:244:1::1")
	excludeAll = []netip.Prefix{podNet4, svcNet4, podNet6, svcNet6}
)

type topo struct {
	b                    backendCase
	pod, podB, node, ext *privtest.NS
}

func forEachBackend(t *testing.T, fn func(t *testing.T, b backendCase)) {
	for _, b := range backendCases {
		t.Run(b.name, func(t *testing.T) {
			requireBackend(t, b)
			fn(t, b)
		})
	}
}

func requireBackend(t testing.TB, b backendCase) {
	t.Helper()
	bins := []string{b.ipt, b.ip6t, b.save, b.save6, b.ipt + "-restore", b.ip6t + "-restore"}
	if !b.iptables() {
		bins = append(bins, "nft")
	}
	privtest.Require(t, bins...)
}

func newTopo(t testing.TB, b backendCase) *topo {
	t.Helper()
	tp := &topo{b: b, pod: privtest.NewNS(t, "snat-pod"), podB: privtest.NewNS(t, "snat-podb"), node: privtest.NewNS(t, "snat-node"), ext: privtest.NewNS(t, "snat-ext")}
	privtest.Veth(t, tp.pod, "eth0", tp.node, "vpod")
	privtest.Veth(t, tp.podB, "eth0", tp.node, "vpodb")
	privtest.Veth(t, tp.node, "vext", tp.ext, "eth0")

	tp.pod.Exec(t, "ip", "addr", "add", "10.244.1.5/24", "dev", "eth0")
	tp.pod.Exec(t, "ip", "-6", "addr", "add", "fd00:10:244:1::5/64", "dev", "eth0", "nodad")
	tp.pod.Exec(t, "ip", "route", "add", "default", "via", "10.244.1.1")
	tp.pod.Exec(t, "ip", "-6", "route", "add", "default", "via", "fd00:10:244:1::1")

	tp.podB.Exec(t, "ip", "addr", "add", "10.244.1.6/32", "dev", "eth0")
	tp.podB.Exec(t, "ip", "-6", "addr", "add", "fd00:10:244:1::6/128", "dev", "eth0", "nodad")
	tp.podB.Exec(t, "ip", "route", "add", "10.244.1.1", "dev", "eth0")
	tp.podB.Exec(t, "ip", "route", "add", "default", "via", "10.244.1.1")
	tp.podB.Exec(t, "ip", "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0")

	// No reverse path filter of the kernel's own: the forged packets
	// must be stopped by egressvip's rules.
	tp.node.Exec(t, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
		"net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0", "net.ipv4.conf.vpod.rp_filter=0",
		"net.ipv4.conf.vpodb.rp_filter=0", "net.ipv4.conf.vext.rp_filter=0")
	tp.node.Exec(t, "ip", "addr", "add", "10.244.1.1/24", "dev", "vpod")
	tp.node.Exec(t, "ip", "-6", "addr", "add", "fd00:10:244:1::1/64", "dev", "vpod", "nodad")
	tp.node.Exec(t, "ip", "-6", "addr", "add", "fe80::1/64", "dev", "vpodb", "nodad")
	tp.node.Exec(t, "ip", "route", "add", "10.244.1.6/32", "dev", "vpodb")
	tp.node.Exec(t, "ip", "-6", "route", "add", "fd00:10:244:1::6/128", "dev", "vpodb")
	tp.node.Exec(t, "ip", "addr", "add", "203.0.113.1/24", "dev", "vext")
	tp.node.Exec(t, "ip", "addr", "add", "203.0.113.10/32", "dev", "vext")
	tp.node.Exec(t, "ip", "-6", "addr", "add", "2001:db8:1::1/64", "dev", "vext", "nodad")
	// Like a VIP: deprecated, so the kernel never picks it as a source
	// by itself (MASQUERADE must show the node address).
	tp.node.Exec(t, "ip", "-6", "addr", "add", "2001:db8:1::10/128", "dev", "vext", "nodad", "preferred_lft", "0")
	tp.node.Exec(t, b.ipt, "-t", "nat", "-A", "POSTROUTING", "-s", "10.244.0.0/16", "!", "-d", "10.244.0.0/16", "-j", "MASQUERADE")
	tp.node.Exec(t, b.ip6t, "-t", "nat", "-A", "POSTROUTING", "-s", "fd00:10:244::/56", "!", "-d", "fd00:10:244::/56", "-j", "MASQUERADE")

	tp.ext.Exec(t, "ip", "addr", "add", "203.0.113.2/24", "dev", "eth0")
	tp.ext.Exec(t, "ip", "addr", "add", "203.0.113.3/24", "dev", "eth0")
	tp.ext.Exec(t, "ip", "-6", "addr", "add", "2001:db8:1::2/64", "dev", "eth0", "nodad")
	tp.ext.Exec(t, "ip", "-6", "addr", "add", "2001:db8:1::3/64", "dev", "eth0", "nodad")
	tp.startServers(t)
	return tp
}

// startServers listens in the external ns on UDP 5060 and TCP 8080 of both
// families and answers every datagram or connection with the peer address.
func (tp *topo) startServers(t testing.TB) {
	var (
		pcs []net.PacketConn
		lns []net.Listener
		err error
	)
	tp.ext.Do(t, func() {
		for _, a := range []netip.Addr{extSrv4, extSrv6, extSrv4b, extSrv6b} {
			var pc net.PacketConn
			if pc, err = net.ListenPacket("udp", netip.AddrPortFrom(a, 5060).String()); err != nil {
				return
			}
			pcs = append(pcs, pc)
			var ln net.Listener
			if ln, err = net.Listen("tcp", netip.AddrPortFrom(a, 8080).String()); err != nil {
				return
			}
			lns = append(lns, ln)
		}
	})
	t.Cleanup(func() {
		for _, pc := range pcs {
			_ = pc.Close()
		}
		for _, ln := range lns {
			_ = ln.Close()
		}
	})
	if err != nil {
		t.Fatalf("listen in external ns: %v", err)
	}
	for _, pc := range pcs {
		go func() {
			buf := make([]byte, 64)
			for {
				_, peer, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				_, _ = pc.WriteTo([]byte(peer.(*net.UDPAddr).AddrPort().Addr().Unmap().String()), peer)
			}
		}()
	}
	for _, ln := range lns {
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				_, _ = c.Write([]byte(c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap().String()))
				_ = c.Close()
			}
		}()
	}
}

// seenAs sends one request from the pod to dst and returns the source
// address the external server saw.
func (tp *topo) seenAs(t *testing.T, network string, dst netip.AddrPort) netip.Addr {
	t.Helper()
	var (
		reply string
		err   error
	)
	tp.pod.Do(t, func() { reply, err = ask(network, dst) })
	if err != nil {
		t.Fatalf("%s to %s from the pod: %v", network, dst, err)
	}
	a, err := netip.ParseAddr(reply)
	if err != nil {
		t.Fatalf("server reply %q: %v", reply, err)
	}
	return a
}

// ask sends a request and reads the answer; UDP is retried a few times.
func ask(network string, dst netip.AddrPort) (string, error) {
	c, err := net.DialTimeout(network, dst.String(), 3*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	buf := make([]byte, 64)
	for range 3 {
		if _, err = c.Write([]byte("?")); err != nil {
			return "", err
		}
		_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
		var n int
		if n, err = c.Read(buf); err == nil {
			return string(buf[:n]), nil
		}
		if network != "udp" {
			break
		}
	}
	return "", err
}

// sendUDP sends one datagram from the pod without waiting for an answer.
func (tp *topo) sendUDP(t *testing.T, dst netip.AddrPort) {
	t.Helper()
	var err error
	tp.pod.Do(t, func() {
		var c net.Conn
		if c, err = net.Dial("udp", dst.String()); err != nil {
			return
		}
		defer c.Close()
		_, err = c.Write([]byte("?"))
	})
	if err != nil {
		t.Fatalf("udp to %s: %v", dst, err)
	}
}

// manager returns a Manager of the topology's backend, made in the node ns;
// wrap, when set, wraps the runners of an iptables backend.
func (tp *topo) manager(t testing.TB, wrap func(Family, Runner) Runner) *Manager {
	t.Helper()
	return tp.managerFor(t, tp.b.name, wrap)
}

func (tp *topo) managerFor(t testing.TB, backend string, wrap func(Family, Runner) Runner) *Manager {
	t.Helper()
	return tp.managerWith(t, Config{Backend: backend}, wrap)
}

// managerWith returns a Manager of cfg in the node ns (cfg's Log and
// Conntrack are set here).
func (tp *topo) managerWith(t testing.TB, cfg Config, wrap func(Family, Runner) Runner) *Manager {
	t.Helper()
	return newManagerIn(t, tp.node, cfg, wrap)
}

func newManagerIn(t testing.TB, ns *privtest.NS, cfg Config, wrap func(Family, Runner) Runner) *Manager {
	t.Helper()
	h, err := netlink.NewHandleAt(ns.Handle)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	log := logrus.New()
	log.SetOutput(t.Output())
	log.SetLevel(logrus.DebugLevel)
	if _, ok := t.(*testing.B); ok {
		log.SetLevel(logrus.WarnLevel)
	}
	cfg.Log, cfg.Conntrack = logrus.NewEntry(log), h
	var m *Manager
	ns.Do(t, func() {
		if wrap != nil {
			bk := legacyBackend
			if cfg.Backend == BackendIPTablesNFT {
				bk = nftBackend
			}
			for _, f := range Families {
				var r *execRunner
				if r, err = newExecRunner(f, bk.binaries[f]); err != nil {
					return
				}
				cfg.Runners[f] = wrap(f, r)
				// Wrapped runners make New skip the fence's nft: give
				// it its tables.
				if cfg.Tables[f], err = newRealNFT(f, fenceTable(bk)); err != nil {
					return
				}
			}
		}
		m, err = New(cfg)
		if err == nil && wrap != nil {
			// Runners make New skip the other backends: add them.
			opts, _ := cfg.options()
			m.others = realLeftovers(cfg.Backend, opts)
		}
	})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	if m.Backend() != cfg.Backend {
		t.Fatalf("backend %s, want %s", m.Backend(), cfg.Backend)
	}
	return m
}

// inNode runs fn in the node ns and fails the test with its error.
func (tp *topo) inNode(t testing.TB, what string, fn func() error) {
	t.Helper()
	var err error
	tp.node.Do(t, func() { err = fn() })
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

func (tp *topo) apply(t testing.TB, m *Manager, d model.Datapath) {
	t.Helper()
	applyIn(t, tp.node, m, d)
}

func applyIn(t testing.TB, ns *privtest.NS, m *Manager, d model.Datapath) {
	t.Helper()
	var (
		failed map[string]error
		err    error
	)
	ns.Do(t, func() { failed, err = m.Apply(context.Background(), d) })
	applied(t, failed, err)
}

// foreignRules returns the iptables rules of both families that are not
// ours.
func (tp *topo) foreignRules(t *testing.T) []string {
	t.Helper()
	var out []string
	for _, save := range []string{tp.b.save, tp.b.save6} {
		for _, l := range strings.Split(tp.node.Exec(t, save), "\n") {
			if strings.HasPrefix(l, "-A ") && !strings.Contains(l, ChainPrefix) {
				out = append(out, save+": "+l)
			}
		}
	}
	return out
}

// ourLines returns what egressvip owns in the topology's backend: every
// iptables line of both families mentioning our prefix and the fence
// table, or the listing of our nftables tables.
func (tp *topo) ourLines(t *testing.T) []string {
	t.Helper()
	if !tp.b.iptables() {
		return tp.nftLines(t, TableName)
	}
	bk := legacyBackend
	if tp.b.name == BackendIPTablesNFT {
		bk = nftBackend
	}
	return append(tp.iptLines(t, tp.b.save, tp.b.save6), tp.nftLines(t, fenceTable(bk))...)
}

func (tp *topo) iptLines(t *testing.T, saves ...string) []string {
	t.Helper()
	var out []string
	for _, save := range saves {
		for _, l := range strings.Split(tp.node.Exec(t, save), "\n") {
			if strings.Contains(l, ChainPrefix) {
				out = append(out, l)
			}
		}
	}
	return out
}

// nftLines lists nftables tables of both families in the node ns.
func (tp *topo) nftLines(t *testing.T, table string) []string {
	t.Helper()
	var out []string
	for _, fam := range []string{"ip", "ip6"} {
		text, err := tp.node.Try("nft", "list", "table", fam, table)
		if err != nil {
			if strings.Contains(text, "No such file or directory") {
				continue
			}
			t.Fatalf("nft list table %s %s: %v: %s", fam, table, err, text)
		}
		out = append(out, strings.Split(strings.TrimSpace(text), "\n")...)
	}
	return out
}

func rulesFor(ps ...annotations.DestinationPort) model.Datapath {
	return model.Datapath{
		SNAT: []model.SNATRule{
			{Service: "default/sip", Pod: pod4, Source: lb4, Filter: ports(ps...)},
			{Service: "default/sip", Pod: pod6, Source: lb6, Filter: ports(ps...)},
		},
		Exclude: excludeAll,
		Fenced:  []netip.Addr{lb4, lb6},
	}
}

func TestPrivilegedSNATPackets(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backendCase) {
		tp := newTopo(t, b)
		udp4, tcp4 := netip.AddrPortFrom(extSrv4, 5060), netip.AddrPortFrom(extSrv4, 8080)
		udp6, tcp6 := netip.AddrPortFrom(extSrv6, 5060), netip.AddrPortFrom(extSrv6, 8080)
		check := func(what string, network string, dst netip.AddrPort, want netip.Addr) {
			t.Helper()
			if got := tp.seenAs(t, network, dst); got != want {
				t.Errorf("%s: %s packet from pod to %s arrived from %s, want %s", what, network, dst, got, want)
			}
		}
		check("before Apply", "udp", udp4, node4)
		check("before Apply", "udp", udp6, node6)

		m := tp.manager(t, nil)
		tp.apply(t, m, rulesFor())
		check("all traffic", "udp", udp4, lb4)
		check("all traffic", "tcp", tcp4, lb4)
		check("all traffic", "udp", udp6, lb6)
		check("all traffic", "tcp", tcp6, lb6)

		tp.apply(t, m, rulesFor(udp5060))
		check("udp:5060 only", "udp", udp4, lb4)
		check("udp:5060 only", "tcp", tcp4, node4)
		check("udp:5060 only", "udp", udp6, lb6)
		check("udp:5060 only", "tcp", tcp6, node6)

		// A destination inside the exclusions is left to the CNI (its
		// MASQUERADE gives the node address), the others still egress.
		excl := rulesFor(tcp8080, udp5060)
		excl.Exclude = append(excl.Exclude, netip.MustParsePrefix("203.0.113.2/32"), netip.MustParsePrefix("2001:db8:1::/112"))
		tp.apply(t, m, excl)
		check("destination excluded", "udp", udp4, node4)
		check("destination excluded", "tcp", tcp4, node4)
		check("destination excluded", "udp", udp6, node6)
		tp.apply(t, m, rulesFor(tcp8080, udp5060))
		check("exclusion gone", "tcp", tcp4, lb4)
		check("exclusion gone", "tcp", tcp6, lb6)

		tp.apply(t, m, model.Datapath{Exclude: excludeAll})
		check("no rules", "udp", udp4, node4)
		check("no rules", "udp", udp6, node6)
	})
}

// countingRunner counts restores that reach the kernel.
type countingRunner struct {
	Runner
	restores *int
}

func (c countingRunner) Restore(ctx context.Context, payload []byte) error {
	*c.restores++
	return c.Runner.Restore(ctx, payload)
}

func TestPrivilegedSNATStaleAndCleanup(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backendCase) {
		tp := newTopo(t, b)
		tp.node.Exec(t, b.ipt, "-t", "nat", "-A", "POSTROUTING", "-d", "198.51.100.0/24", "-m", "comment", "--comment", "someone-else", "-j", "RETURN")
		tp.node.Exec(t, b.ip6t, "-t", "nat", "-A", "POSTROUTING", "-d", "2001:db8:9::/64", "-m", "comment", "--comment", "someone-else", "-j", "RETURN")
		foreign := tp.foreignRules(t)
		if len(foreign) != 4 {
			t.Fatalf("setup: want 4 foreign rules, got %q", foreign)
		}

		two := rulesFor()
		two.SNAT = append(two.SNAT, model.SNATRule{Service: "other/web", Pod: pod4b, Source: lb4b})
		m := tp.manager(t, nil)
		tp.apply(t, m, two)
		var svcs []string
		tp.inNode(t, "Services", func() (err error) { svcs, err = m.Services(context.Background()); return err })
		if !slices.Equal(svcs, []string{"default/sip", "other/web"}) {
			t.Errorf("Services = %v", svcs)
		}

		tp.apply(t, m, rulesFor())
		tp.inNode(t, "Services", func() (err error) { svcs, err = m.Services(context.Background()); return err })
		if !slices.Equal(svcs, []string{"default/sip"}) {
			t.Errorf("after removing other/web, Services = %v", svcs)
		}
		if got := tp.foreignRules(t); !slices.Equal(got, foreign) {
			t.Errorf("foreign rules changed by Apply:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(foreign, "\n"))
		}

		if b.iptables() {
			// Someone inserts ahead of our hook: the next sync moves it back.
			tp.node.Exec(t, b.ipt, "-t", "nat", "-I", "POSTROUTING", "1", "-s", "10.244.0.0/16", "-j", "MASQUERADE")
			tp.apply(t, m, rulesFor())
			tp.hookFirst(t, b.ipt)
			tp.node.Exec(t, b.ipt, "-t", "nat", "-D", "POSTROUTING", "-s", "10.244.0.0/16", "-j", "MASQUERADE")
		}

		// A restarted daemon with the same rules keeps them (iptables
		// writes nothing; nftables replaces its table once, atomically).
		restores := 0
		var wrap func(Family, Runner) Runner
		if b.iptables() {
			wrap = func(_ Family, r Runner) Runner { return countingRunner{r, &restores} }
		}
		restarted := tp.manager(t, wrap)
		before := tp.ourLines(t)
		tp.apply(t, restarted, rulesFor())
		if restores != 0 {
			t.Errorf("restart with unchanged rules ran iptables-restore %d times", restores)
		}
		if got := tp.ourLines(t); !slices.Equal(got, before) {
			t.Errorf("restart changed our rules:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(before, "\n"))
		}

		tp.inNode(t, "Cleanup", restarted.Cleanup)
		if got := tp.ourLines(t); len(got) != 0 {
			t.Errorf("after Cleanup:\n%s", strings.Join(got, "\n"))
		}
		if got := tp.foreignRules(t); !slices.Equal(got, foreign) {
			t.Errorf("foreign rules changed by Cleanup:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(foreign, "\n"))
		}
	})
}

// hookFirst asserts that nat POSTROUTING of ipt starts with our hook and
// holds it once.
func (tp *topo) hookFirst(t *testing.T, ipt string) {
	t.Helper()
	out := tp.node.Exec(t, ipt, "-t", "nat", "-S", "POSTROUTING")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) < 2 || !strings.Contains(lines[1], "-j "+Chain) {
		t.Errorf("%s: first POSTROUTING rule is not our hook:\n%s", ipt, out)
	}
	if n := strings.Count(out, "-j "+Chain); n != 1 {
		t.Errorf("%s: %d hooks in POSTROUTING, want 1:\n%s", ipt, n, out)
	}
}

// podFlows returns the pod's conntrack entries in the node ns as
// "proto dst:port".
func (tp *topo) podFlows(t *testing.T, f Family, pod netip.Addr) []string {
	t.Helper()
	h, err := netlink.NewHandleAt(tp.node.Handle)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	flows, err := h.ConntrackTableList(netlink.ConntrackTable, netlinkFamily(f))
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		t.Fatalf("conntrack list: %v", err)
	}
	var out []string
	for _, fl := range flows {
		if src, ok := addrFromIP(fl.Forward.SrcIP); ok && src == pod {
			dst, _ := addrFromIP(fl.Forward.DstIP)
			out = append(out, fmt.Sprintf("%d %s", fl.Forward.Protocol, netip.AddrPortFrom(dst, fl.Forward.DstPort)))
		}
	}
	slices.Sort(out)
	return out
}

func TestPrivilegedSNATConntrack(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backendCase) {
		tp := newTopo(t, b)
		m := tp.manager(t, nil)
		tp.apply(t, m, rulesFor())
		cases := []struct {
			f             Family
			pod, lb       netip.Addr
			ext, excluded netip.AddrPort
		}{
			{IPv4, pod4, lb4, netip.AddrPortFrom(extSrv4, 5060), netip.AddrPortFrom(nodePod4, 9999)},
			{IPv6, pod6, lb6, netip.AddrPortFrom(extSrv6, 5060), netip.AddrPortFrom(nodePod6, 9999)},
		}
		for _, c := range cases {
			if got := tp.seenAs(t, "udp", c.ext); got != c.lb {
				t.Fatalf("%s: UDP flow arrived from %s, want %s", c.f, got, c.lb)
			}
			tp.sendUDP(t, c.excluded)
			flows := tp.podFlows(t, c.f, c.pod)
			for _, want := range []netip.AddrPort{c.ext, c.excluded} {
				if !slices.Contains(flows, fmt.Sprintf("17 %s", want)) {
					t.Fatalf("%s: setup: no conntrack entry towards %s in %v", c.f, want, flows)
				}
			}
		}

		// The Service stops egressing: the pod's flows to the outside must
		// go (else they keep the LB IP), in-cluster ones stay.
		tp.apply(t, m, model.Datapath{Exclude: excludeAll})
		for _, c := range cases {
			flows := tp.podFlows(t, c.f, c.pod)
			if slices.Contains(flows, fmt.Sprintf("17 %s", c.ext)) {
				t.Errorf("%s: entry towards %s survived the rule removal: %v", c.f, c.ext, flows)
			}
			if !slices.Contains(flows, fmt.Sprintf("17 %s", c.excluded)) {
				t.Errorf("%s: entry towards excluded %s was deleted: %v", c.f, c.excluded, flows)
			}
		}
	})
}

// kube-vip.io/flush-conntrack: "false": the Service stops egressing and
// its pod's entries stay, in the kernel.
func TestPrivilegedKeepConntrack(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backendCase) {
		tp := newTopo(t, b)
		m := tp.manager(t, nil)
		d := rulesFor()
		for i := range d.SNAT {
			d.SNAT[i].KeepConntrack = true
		}
		tp.apply(t, m, d)
		ext := netip.AddrPortFrom(extSrv4, 5060)
		if got := tp.seenAs(t, "udp", ext); got != lb4 {
			t.Fatalf("UDP flow arrived from %s, want %s", got, lb4)
		}
		want := fmt.Sprintf("17 %s", ext)
		if flows := tp.podFlows(t, IPv4, pod4); !slices.Contains(flows, want) {
			t.Fatalf("setup: no conntrack entry towards %s in %v", ext, flows)
		}
		tp.apply(t, m, model.Datapath{Exclude: excludeAll})
		if flows := tp.podFlows(t, IPv4, pod4); !slices.Contains(flows, want) {
			t.Errorf("the entry towards %s was deleted with flush-conntrack false: %v", ext, flows)
		}
	})
}
