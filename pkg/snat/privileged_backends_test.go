package snat

import (
	"context"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/egressvip/egressvip/internal/privtest"
	"github.com/egressvip/egressvip/pkg/model"
)

func backendCaseOf(t *testing.T, name string) backendCase {
	t.Helper()
	for _, b := range backendCases {
		if b.name == name {
			requireBackend(t, b)
			return b
		}
	}
	t.Fatalf("no backend case %s", name)
	return backendCase{}
}

// TestPrivilegedNFTBeatsIPTables: with egressvip's nftables table in place,
// a MASQUERADE rule inserted at position 1 of nat POSTROUTING, in
// iptables-legacy and in iptables-nft, both families, does not win: the
// table's chain (priority 90) sets up the translation before iptables'
// nat chains (100) run. Excluded destinations still reach the CNI's rule.
func TestPrivilegedNFTBeatsIPTables(t *testing.T) {
	b := backendCaseOf(t, BackendNFTables)
	privtest.Require(t, "iptables-legacy", "ip6tables-legacy")
	tp := newTopo(t, b)
	m := tp.manager(t, nil)
	d := rulesFor()
	d.Exclude = append(d.Exclude, netip.MustParsePrefix("203.0.113.2/32"), netip.MustParsePrefix("2001:db8:1::2/128"))
	tp.apply(t, m, rulesFor())
	for _, ipt := range []string{"iptables-legacy", "iptables-nft"} {
		tp.node.Exec(t, ipt, "-t", "nat", "-I", "POSTROUTING", "1", "-s", "10.244.0.0/16", "-j", "MASQUERADE")
		ip6t := "ip6" + strings.TrimPrefix(ipt, "ip")
		tp.node.Exec(t, ip6t, "-t", "nat", "-I", "POSTROUTING", "1", "-s", "fd00:10:244::/56", "-j", "MASQUERADE")
	}
	for _, c := range []struct {
		network string
		dst     netip.AddrPort
		want    netip.Addr
	}{
		{"udp", netip.AddrPortFrom(extSrv4, 5060), lb4},
		{"tcp", netip.AddrPortFrom(extSrv4, 8080), lb4},
		{"udp", netip.AddrPortFrom(extSrv6, 5060), lb6},
		{"tcp", netip.AddrPortFrom(extSrv6, 8080), lb6},
	} {
		if got := tp.seenAs(t, c.network, c.dst); got != c.want {
			t.Errorf("%s to %s arrived from %s, want %s: a MASQUERADE at position 1 of iptables won", c.network, c.dst, got, c.want)
		}
	}
	// The check says intact: iptables-nft's commits moved the generation,
	// but our table's listing is unchanged.
	var ok bool
	tp.inNode(t, "Check", func() (err error) { ok, err = m.Check(context.Background()); return err })
	if !ok {
		t.Error("Check failed after commits to other tables")
	}
	tp.apply(t, m, d)
	if got := tp.seenAs(t, "udp", netip.AddrPortFrom(extSrv4, 5060)); got != node4 {
		t.Errorf("excluded destination arrived from %s, want the CNI's MASQUERADE (%s)", got, node4)
	}
	if got := tp.seenAs(t, "udp", netip.AddrPortFrom(extSrv6, 5060)); got != node6 {
		t.Errorf("excluded IPv6 destination arrived from %s, want the CNI's MASQUERADE (%s)", got, node6)
	}
}

func (tp *topo) check(t *testing.T, m *Manager) bool {
	t.Helper()
	var ok bool
	tp.inNode(t, "Check", func() (err error) { ok, err = m.Check(context.Background()); return err })
	return ok
}

// repair is what the sync loop does when Check fails.
func (tp *topo) repair(t *testing.T, m *Manager, d model.Datapath) {
	t.Helper()
	m.Recheck()
	tp.apply(t, m, d)
	if !tp.check(t, m) {
		t.Fatal("Check still fails after Recheck and Apply")
	}
}

// TestPrivilegedCheck: Check notices, in the kernel, what others do to our
// state, and only that.
func TestPrivilegedCheck(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backendCase) {
		tp := newTopo(t, b)
		m := tp.manager(t, nil)
		d := rulesFor(udp5060)
		tp.apply(t, m, d)
		for range 2 {
			if !tp.check(t, m) {
				t.Fatal("Check after Apply failed")
			}
		}
		udp4 := netip.AddrPortFrom(extSrv4, 5060)
		type breakage struct {
			name string
			cmd  []string
		}
		var cases []breakage
		if b.iptables() {
			cases = []breakage{
				{"MASQUERADE inserted at position 1", []string{b.ipt, "-t", "nat", "-I", "POSTROUTING", "1", "-s", "10.244.0.0/16", "-j", "MASQUERADE"}},
				{"chain flushed", []string{b.ipt, "-t", "nat", "-F", Chain}},
				{"hook deleted", []string{b.ipt, "-t", "nat", "-D", "POSTROUTING", "-m", "comment", "--comment", HookComment, "-j", Chain}},
				{"IPv6 hook behind a new rule", []string{b.ip6t, "-t", "nat", "-I", "POSTROUTING", "1", "-d", "2001:db8:9::/64", "-j", "RETURN"}},
				{"anti-spoofing chain flushed", []string{b.ipt, "-t", "raw", "-F", ChainRaw}},
				{"mangle hook behind a new rule", []string{b.ipt, "-t", "mangle", "-I", "PREROUTING", "1", "-j", "RETURN"}},
				{"fence table deleted", []string{"nft", "delete", "table", "ip", fenceTable(map[bool]backend{true: nftBackend, false: legacyBackend}[b.name == BackendIPTablesNFT])}},
			}
		} else {
			cases = []breakage{
				{"table deleted", []string{"nft", "delete", "table", "ip", TableName}},
				{"chain flushed", []string{"nft", "flush", "chain", "ip", TableName, nftPostrouting}},
				{"prerouting chain flushed", []string{"nft", "flush", "chain", "ip", TableName, nftPrerouting}},
				{"map flushed", []string{"nft", "flush", "map", "ip6", TableName, nftSNATPorts}},
				{"element deleted", []string{"nft", "delete", "element", "ip", TableName, nftSNATPorts, "{ 10.244.1.5 . udp . 5060 }"}},
				{"fence flushed", []string{"nft", "flush", "chain", "ip6", TableName, nftFence}},
			}
		}
		for _, c := range cases {
			tp.node.Exec(t, c.cmd...)
			if tp.check(t, m) {
				t.Errorf("%s: Check did not notice", c.name)
			}
			tp.repair(t, m, d)
			if got := tp.seenAs(t, "udp", udp4); got != lb4 {
				t.Errorf("%s: after repair, packet arrived from %s", c.name, got)
			}
			if b.iptables() {
				tp.hookFirst(t, b.ipt)
				tp.hookFirst(t, b.ip6t)
			}
		}
		// Others' changes elsewhere are not ours.
		tp.node.Exec(t, "iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-d", "198.51.100.0/24", "-j", "RETURN")
		tp.node.Exec(t, "iptables-nft", "-t", "filter", "-A", "FORWARD", "-j", "ACCEPT")
		if !tp.check(t, m) {
			t.Error("Check failed after foreign rules were appended")
		}
	})
}

// racingExecRunner wraps a real runner: right after the Manager read the
// tables, a CNI inserts a rule at position 1 of nat POSTROUTING.
type racingExecRunner struct {
	Runner
	race func()
}

func (r *racingExecRunner) Save(ctx context.Context) ([]byte, error) {
	out, err := r.Runner.Save(ctx)
	if r.race != nil {
		r.race()
		r.race = nil
	}
	return out, err
}

// TestPrivilegedHookRepairBySpec: the hook is repaired by rule spec inside
// the restore, so a rule inserted between the Manager's reading and its
// restore is kept, and one hook is left, first.
func TestPrivilegedHookRepairBySpec(t *testing.T) {
	for _, name := range []string{BackendIPTablesLegacy, BackendIPTablesNFT} {
		t.Run(name, func(t *testing.T) {
			b := backendCaseOf(t, name)
			tp := newTopo(t, b)
			var racer *racingExecRunner
			m := tp.manager(t, func(f Family, r Runner) Runner {
				if f == IPv6 {
					return r
				}
				racer = &racingExecRunner{Runner: r}
				return racer
			})
			tp.apply(t, m, rulesFor())
			tp.node.Exec(t, b.ipt, "-t", "nat", "-I", "POSTROUTING", "1", "-s", "10.244.0.0/16", "-m", "comment", "--comment", "cni-a", "-j", "MASQUERADE")
			racer.race = func() {
				// The Manager's thread is in the node ns; this runs the
				// binary there too.
				if out, err := tp.node.Try(b.ipt, "-t", "nat", "-I", "POSTROUTING", "1", "-s", "10.244.0.0/16", "-m", "comment", "--comment", "cni-b", "-j", "MASQUERADE"); err != nil {
					t.Errorf("race insert: %v: %s", err, out)
				}
			}
			tp.apply(t, m, rulesFor())
			tp.hookFirst(t, b.ipt)
			out := tp.node.Exec(t, b.ipt, "-t", "nat", "-S", "POSTROUTING")
			for _, c := range []string{"cni-a", "cni-b"} {
				if !strings.Contains(out, c) {
					t.Errorf("rule %s lost by the hook repair:\n%s", c, out)
				}
			}
			if got := tp.seenAs(t, "udp", netip.AddrPortFrom(extSrv4, 5060)); got != lb4 {
				t.Errorf("packet arrived from %s", got)
			}
		})
	}
}

// TestPrivilegedSwitchBackends: a Manager of another backend takes over
// without a gap and removes what the previous one left, nothing else;
// Cleanup removes everything egressvip owns in every backend.
func TestPrivilegedSwitchBackends(t *testing.T) {
	b := backendCaseOf(t, BackendNFTables)
	requireBackend(t, backendCaseOf(t, BackendIPTablesLegacy))
	tp := newTopo(t, b)
	udp4, udp6 := netip.AddrPortFrom(extSrv4, 5060), netip.AddrPortFrom(extSrv6, 5060)
	foreign := tp.foreignRules(t)
	legacyLines := func() []string {
		return append(tp.iptLines(t, "iptables-legacy-save", "ip6tables-legacy-save"), tp.nftLines(t, fenceTable(legacyBackend))...)
	}
	nftLines := func() []string {
		return append(tp.iptLines(t, "iptables-nft-save", "ip6tables-nft-save"), tp.nftLines(t, fenceTable(nftBackend))...)
	}

	steps := []string{BackendIPTablesLegacy, BackendNFTables, BackendIPTablesNFT, BackendIPTablesLegacy, BackendNFTables}
	var last *Manager
	for i, backend := range steps {
		m := tp.managerFor(t, backend, nil)
		tp.apply(t, m, rulesFor())
		if got := tp.seenAs(t, "udp", udp4); got != lb4 {
			t.Errorf("step %d (%s): packet arrived from %s", i, backend, got)
		}
		if got := tp.seenAs(t, "udp", udp6); got != lb6 {
			t.Errorf("step %d (%s): IPv6 packet arrived from %s", i, backend, got)
		}
		owned := map[string][]string{
			BackendIPTablesLegacy: legacyLines(),
			BackendIPTablesNFT:    nftLines(),
			BackendNFTables:       tp.nftLines(t, TableName),
		}
		for other, lines := range owned {
			if (other == backend) != (len(lines) > 0) {
				t.Errorf("step %d (%s): %s holds %q", i, backend, other, lines)
			}
		}
		if got := tp.foreignRules(t); !slices.Equal(got, foreign) {
			t.Errorf("step %d (%s): foreign rules changed:\n%s", i, backend, strings.Join(got, "\n"))
		}
		last = m
	}

	// Leftovers everywhere (as after a crash mid-switch): Cleanup removes
	// them all.
	for _, backend := range []string{BackendIPTablesLegacy, BackendIPTablesNFT} {
		m := tp.managerFor(t, backend, nil)
		m.othersRemoved = true // keep the others' state
		tp.apply(t, m, rulesFor())
	}
	tp.inNode(t, "Cleanup", last.Cleanup)
	for name, lines := range map[string][]string{"iptables-legacy": legacyLines(), "iptables-nft": nftLines(), "nftables": tp.nftLines(t, TableName)} {
		if len(lines) > 0 {
			t.Errorf("after Cleanup, %s holds:\n%s", name, strings.Join(lines, "\n"))
		}
	}
	if got := tp.foreignRules(t); !slices.Equal(got, foreign) {
		t.Errorf("foreign rules changed by Cleanup:\n%s", strings.Join(got, "\n"))
	}
	if got := tp.seenAs(t, "udp", udp4); got != node4 {
		t.Errorf("after Cleanup, packet arrived from %s, want the CNI's %s", got, node4)
	}
}

// TestPrivilegedRepairEndsMistranslatedFlows: a flow set up while someone
// else's rule ran before ours (a MASQUERADE inserted first, our table
// deleted) leaves from the node's address; once Check noticed and the
// rules were repaired, its next datagram leaves with the LoadBalancer IP,
// in both families, while a flow set up before keeps its translation.
func TestPrivilegedRepairEndsMistranslatedFlows(t *testing.T) {
	forEachBackend(t, func(t *testing.T, b backendCase) {
		tp := newTopo(t, b)
		m := tp.manager(t, nil)
		d := rulesFor()
		tp.apply(t, m, d)
		cases := []struct {
			f        Family
			ext      netip.AddrPort
			lb, node netip.Addr
		}{
			{IPv4, netip.AddrPortFrom(extSrv4, 5060), lb4, netip.MustParseAddr("203.0.113.1")},
			{IPv6, netip.AddrPortFrom(extSrv6, 5060), lb6, node6},
		}
		dial := func(dst netip.AddrPort) net.Conn {
			var (
				c   net.Conn
				err error
			)
			tp.pod.Do(t, func() { c, err = net.Dial("udp", dst.String()) })
			if err != nil {
				t.Fatalf("udp to %s: %v", dst, err)
			}
			t.Cleanup(func() { _ = c.Close() })
			return c
		}
		seen := func(c net.Conn) netip.Addr {
			t.Helper()
			buf := make([]byte, 64)
			for range 3 {
				if _, err := c.Write([]byte("?")); err != nil {
					t.Fatalf("send: %v", err)
				}
				_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
				if n, err := c.Read(buf); err == nil {
					return netip.MustParseAddr(string(buf[:n]))
				}
			}
			t.Fatalf("no answer from %s", c.RemoteAddr())
			return netip.Addr{}
		}
		before := make([]net.Conn, len(cases))
		for i, c := range cases {
			before[i] = dial(c.ext)
			if got := seen(before[i]); got != c.lb {
				t.Fatalf("%s: flow set up under our rules arrived from %s, want %s", c.f, got, c.lb)
			}
		}
		if b.iptables() {
			tp.node.Exec(t, b.ipt, "-t", "nat", "-I", "POSTROUTING", "1", "-s", "10.244.0.0/16", "-j", "MASQUERADE")
			tp.node.Exec(t, b.ip6t, "-t", "nat", "-I", "POSTROUTING", "1", "-s", "fd00:10:244::/56", "-j", "MASQUERADE")
		} else {
			tp.node.Exec(t, "nft", "delete", "table", "ip", TableName)
			tp.node.Exec(t, "nft", "delete", "table", "ip6", TableName)
		}
		during := make([]net.Conn, len(cases))
		for i, c := range cases {
			during[i] = dial(c.ext)
			if got := seen(during[i]); got != c.node {
				t.Fatalf("%s: setup: flow set up while our rules were bypassed arrived from %s, want the node's %s", c.f, got, c.node)
			}
		}
		if tp.check(t, m) {
			t.Fatal("Check did not notice")
		}
		tp.repair(t, m, d)
		for i, c := range cases {
			if got := seen(during[i]); got != c.lb {
				t.Errorf("%s: after the repair, the flow set up meanwhile still arrives from %s, want %s", c.f, got, c.lb)
			}
			if got := seen(before[i]); got != c.lb {
				t.Errorf("%s: after the repair, the flow set up before arrives from %s, want %s", c.f, got, c.lb)
			}
		}
	})
}
