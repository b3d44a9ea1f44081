package snat

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/vishvananda/netlink"
	"sigs.k8s.io/knftables"
)

func newNFTManager(t testing.TB, fakes [2]*FakeNFT, ct Conntrack) *Manager {
	t.Helper()
	if ct == nil {
		ct = &fakeConntrack{}
	}
	m, err := New(Config{Log: testLog(t), Tables: [2]NFTables{fakes[IPv4], fakes[IPv6]}, Conntrack: ct})
	if err != nil {
		t.Fatal(err)
	}
	if m.Backend() != BackendNFTables {
		t.Fatalf("backend %s", m.Backend())
	}
	return m
}

func nftFakes() [2]*FakeNFT { return [2]*FakeNFT{NewFakeNFT(IPv4), NewFakeNFT(IPv6)} }

// foreignRun runs a transaction on the fake as another process would.
func foreignRun(t *testing.T, f *FakeNFT, fill func(tx *knftables.Transaction)) {
	t.Helper()
	tx := f.NewTransaction()
	fill(tx)
	must(t, f.Run(t.Context(), tx))
}

// TestNFTTrace walks packets through the table egressvip writes, like
// TestTrace does for the iptables chain.
func TestNFTTrace(t *testing.T) {
	d := Desired{
		Rules: []Rule{
			{Service: "default/sip", PodIP: pod4, SourceIP: lb4, Ports: []annotations.DestinationPort{udp5060, {Protocol: annotations.SCTP, Port: 5060}}},
			{Service: "other/web", PodIP: pod4b, SourceIP: lb4b},
			{Service: "default/sip", PodIP: pod6, SourceIP: lb6},
		},
		Exclude: []netip.Prefix{podNet4, svcNet4, podNet6, netip.MustParsePrefix("10.244.7.0/24")},
	}
	fakes := nftFakes()
	m := newNFTManager(t, fakes, nil)
	must(t, m.Apply(t.Context(), d))
	t.Logf("IPv4 table:\n%s", fakes[IPv4].Dump())

	tests := []struct {
		name     string
		src, dst netip.Addr
		proto    annotations.Protocol
		port     uint16
		want     netip.Addr
	}{
		{"a packet from pod 10.244.1.5 to 198.51.100.9:5060/udp leaves with source 203.0.113.10", pod4, ext4, annotations.UDP, 5060, lb4},
		{"SCTP port", pod4, ext4, annotations.SCTP, 5060, lb4},
		{"other port is left alone", pod4, ext4, annotations.TCP, 8080, pod4},
		{"same port, other protocol", pod4, ext4, annotations.TCP, 5060, pod4},
		{"all-traffic rule", pod4b, ext4, annotations.TCP, 443, lb4b},
		{"pod CIDR excluded", pod4b, netip.MustParseAddr("10.244.2.7"), annotations.TCP, 80, pod4b},
		{"Service CIDR excluded", pod4b, netip.MustParseAddr("10.96.0.10"), annotations.UDP, 53, pod4b},
		{"pod without rule", netip.MustParseAddr("10.244.1.99"), ext4, annotations.UDP, 5060, netip.MustParseAddr("10.244.1.99")},
		{"IPv6 all traffic", pod6, ext6, annotations.UDP, 5060, lb6},
		{"IPv6 pod CIDR excluded", pod6, netip.MustParseAddr("fd00:10:244:2::3"), annotations.UDP, 5060, pod6},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := fakes[familyOf(tc.src)].Trace(tc.src, tc.dst, tc.proto, tc.port)
			if got.Source != tc.want || got.Masquerade {
				t.Errorf("packet from %s to %s:%d/%s %s; want source %s", tc.src, tc.dst, tc.port, tc.proto, got, tc.want)
			}
		})
	}

	// Every element names its Service, and Services reads them back.
	fakes[IPv4].RLock()
	for _, name := range []string{nftSNATAll, nftSNATPorts} {
		for _, e := range fakes[IPv4].Table.Maps[name].Elements {
			if e.Comment == nil || (*e.Comment != "default/sip" && *e.Comment != "other/web") {
				t.Errorf("map %s element %v without its Service as comment", name, e.Key)
			}
		}
	}
	// The nested 10.244.7.0/24 is not written: an interval set refuses
	// overlapping elements.
	if n := len(fakes[IPv4].Table.Sets[nftExclude].Elements); n != 2 {
		t.Errorf("exclude set has %d elements, want 2", n)
	}
	chain := fakes[IPv4].Table.Chains[nftChain]
	fakes[IPv4].RUnlock()
	if prio, err := knftables.ParsePriority(knftables.IPv4Family, string(*chain.Priority)); err != nil || prio != 90 {
		t.Errorf("chain priority %s (%d, %v), want 90: before iptables and kube-proxy (srcnat, 100)", *chain.Priority, prio, err)
	}
	if got, err := m.Services(t.Context()); err != nil || !slices.Equal(got, []string{"default/sip", "other/web"}) {
		t.Errorf("Services = %v, %v", got, err)
	}
}

// traceNode traces a packet through the node's nat postrouting hook: the
// egressvip table (priority 90) first, then iptables' nat POSTROUTING
// (priority 100) when it did not translate the source.
func traceNode(nft *FakeNFT, ipt *Fake, src, dst netip.Addr, proto annotations.Protocol, port uint16) Verdict {
	if v := nft.Trace(src, dst, proto, port); v.Rule != "" {
		return v
	}
	return ipt.Trace(src, dst, proto, port)
}

// TestNFTBeatsIPTablesMasquerade: a CNI's MASQUERADE at position 1 of
// iptables' nat POSTROUTING, inserted after egressvip wrote its table,
// does not win, and excluded destinations still reach it.
func TestNFTBeatsIPTablesMasquerade(t *testing.T) {
	fakes := nftFakes()
	m := newNFTManager(t, fakes, nil)
	must(t, m.Apply(t.Context(), dualStack(udp5060)))
	ipt := NewFake()
	must(t, ipt.Insert("POSTROUTING", 1, "-s", "10.244.0.0/16", "!", "-d", "10.244.0.0/16", "-j", "MASQUERADE"))
	if got := traceNode(fakes[IPv4], ipt, pod4, ext4, annotations.UDP, 5060); got.Source != lb4 || got.Masquerade {
		t.Errorf("egress packet %s, want source %s", got, lb4)
	}
	if got := traceNode(fakes[IPv4], ipt, pod4, ext4, annotations.TCP, 443); !got.Masquerade {
		t.Errorf("packet without egress rule %s, want the CNI's MASQUERADE", got)
	}
	if got := traceNode(fakes[IPv4], ipt, pod4, netip.MustParseAddr("10.96.0.10"), annotations.UDP, 5060); !got.Masquerade {
		t.Errorf("packet to the Service CIDR %s, want the CNI's MASQUERADE (excluded by egressvip)", got)
	}
}

// TestNFTSameAsIPTables applies random states to both backends and traces
// random packets through both: the nftables maps must translate exactly
// like the first-match iptables chain, and seeding from either must
// produce the same conntrack flushes.
func TestNFTSameAsIPTables(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 11))
	pods := []netip.Addr{pod4, pod4b, netip.MustParseAddr("10.244.1.7"), pod6, netip.MustParseAddr("fd00:10:244:1::6")}
	lbs := map[Family][]netip.Addr{IPv4: {lb4, lb4b}, IPv6: {lb6, netip.MustParseAddr("2001:db8:1::11")}}
	ports := []annotations.DestinationPort{udp5060, tcp8080, {Protocol: annotations.SCTP, Port: 5060}, {Protocol: annotations.TCP, Port: 5060}}
	services := []string{"a/one", "b/two", "c/three"}
	dsts := []netip.Addr{ext4, netip.MustParseAddr("10.96.0.10"), netip.MustParseAddr("10.244.9.9"), ext6, netip.MustParseAddr("fd00:10:244:3::3")}
	ipt := [2]*Fake{NewFake(), NewFake()}
	nft := nftFakes()
	mi := newFakeManager(t, ipt, nil)
	mn := newNFTManager(t, nft, nil)
	for round := range 40 {
		var d Desired
		d.Exclude = []netip.Prefix{podNet4, svcNet4, podNet6}
		for range rng.IntN(8) {
			pod := pods[rng.IntN(len(pods))]
			r := Rule{Service: services[rng.IntN(len(services))], PodIP: pod, SourceIP: lbs[familyOf(pod)][rng.IntN(2)]}
			for range rng.IntN(3) {
				r.Ports = append(r.Ports, ports[rng.IntN(len(ports))])
			}
			d.Rules = append(d.Rules, r)
		}
		must(t, mi.Apply(t.Context(), d))
		must(t, mn.Apply(t.Context(), d))
		for _, src := range pods {
			for _, dst := range dsts {
				if familyOf(src) != familyOf(dst) {
					continue
				}
				for _, p := range ports {
					f := familyOf(src)
					a, b := ipt[f].Trace(src, dst, p.Protocol, p.Port), nft[f].Trace(src, dst, p.Protocol, p.Port)
					if a.Source != b.Source {
						t.Fatalf("round %d: packet from %s to %s:%d/%s: iptables %s, nftables %s\nrules %+v", round, src, dst, p.Port, p.Protocol, a, b, d.Rules)
					}
				}
			}
		}
		// A restarted nftables Manager reads back a state with the same
		// translations: no conntrack entry of an unchanged pod goes.
		for _, f := range Families {
			read, err := nftRead(t.Context(), nft[f], f)
			must(t, err)
			if fl := ConntrackFlushes(read, d.forFamily(f)); len(fl) != 0 {
				t.Fatalf("round %d %s: state read back differs in translation: flushes %+v", round, f, fl)
			}
		}
	}
}

func TestNFTApplyWritesOnlyChanges(t *testing.T) {
	fakes := nftFakes()
	ct := &fakeConntrack{}
	m := newNFTManager(t, fakes, ct)
	ctx := t.Context()
	var d Desired
	d.Exclude = []netip.Prefix{podNet4, svcNet4, podNet6}
	for i := range 50 {
		d.Rules = append(d.Rules, Rule{Service: fmt.Sprintf("ns/svc%d", i), PodIP: netip.AddrFrom4([4]byte{10, 244, 2, byte(i)}), SourceIP: lb4, Ports: []annotations.DestinationPort{udp5060}})
	}
	must(t, m.Apply(ctx, d))
	if fakes[IPv4].Runs != 1 || fakes[IPv6].Runs != 1 {
		t.Fatalf("runs %d/%d after the first Apply, want 1/1", fakes[IPv4].Runs, fakes[IPv6].Runs)
	}
	must(t, m.Apply(ctx, d))
	if fakes[IPv4].Runs != 1 {
		t.Fatalf("unchanged Apply ran a transaction")
	}

	// One Service changes its address: one element deleted, one added, in
	// one transaction; nothing else is rewritten.
	d.Rules[7].SourceIP = lb4b
	must(t, m.Apply(ctx, d))
	fakes[IPv4].RLock()
	tx := fakes[IPv4].LastTransaction.String()
	fakes[IPv4].RUnlock()
	if fakes[IPv4].Runs != 2 || fakes[IPv6].Runs != 1 {
		t.Errorf("runs %d/%d, want 2/1", fakes[IPv4].Runs, fakes[IPv6].Runs)
	}
	want := "delete element ip egressvip snat-ports { 10.244.2.7 . 17 . 5060 }\n" +
		`add element ip egressvip snat-ports { 10.244.2.7 . 17 . 5060 comment "ns/svc7" : 203.0.113.11 }` + "\n"
	if tx != want {
		t.Errorf("transaction for one changed Service:\n%s\nwant:\n%s", tx, want)
	}
	if got := fakes[IPv4].Trace(netip.MustParseAddr("10.244.2.7"), ext4, annotations.UDP, 5060); got.Source != lb4b {
		t.Errorf("changed pod %s", got)
	}
	if got := fakes[IPv4].Trace(netip.MustParseAddr("10.244.2.8"), ext4, annotations.UDP, 5060); got.Source != lb4 {
		t.Errorf("unchanged pod %s", got)
	}
	calls := ct.calls[netlink.FAMILY_V4]
	if last := calls[len(calls)-1]; len(last) != 1 || last[0].PodIP != netip.MustParseAddr("10.244.2.7") {
		t.Errorf("conntrack flushed %+v, want only the changed pod", last)
	}

	// A Service renamed with the same translation: the element's comment
	// changes, no conntrack entry goes.
	before := len(ct.calls[netlink.FAMILY_V4])
	d.Rules[3].Service = "ns/renamed"
	must(t, m.Apply(ctx, d))
	if got, _ := m.Services(ctx); !slices.Contains(got, "ns/renamed") || slices.Contains(got, "ns/svc3") {
		t.Errorf("Services after the rename: %v", got)
	}
	if len(ct.calls[netlink.FAMILY_V4]) != before {
		t.Errorf("a comment change flushed conntrack")
	}

	// Exclusions change: the set is rewritten.
	d.Exclude = append(d.Exclude, netip.MustParsePrefix("192.0.2.0/24"))
	must(t, m.Apply(ctx, d))
	if got := fakes[IPv4].Trace(netip.MustParseAddr("10.244.2.8"), netip.MustParseAddr("192.0.2.1"), annotations.UDP, 5060); got.Source != netip.MustParseAddr("10.244.2.8") {
		t.Errorf("newly excluded destination %s", got)
	}
}

// TestNFTRestart: a new process reads the elements back (so unchanged pods
// keep their conntrack entries) and replaces the table once, atomically.
func TestNFTRestart(t *testing.T) {
	fakes := nftFakes()
	first := newNFTManager(t, fakes, nil)
	must(t, first.Apply(t.Context(), dualStack(udp5060, tcp8080)))

	ct := &fakeConntrack{}
	m := newNFTManager(t, fakes, ct)
	must(t, m.Apply(t.Context(), dualStack(udp5060, tcp8080)))
	if len(ct.calls) != 0 {
		t.Errorf("restart with unchanged rules flushed conntrack: %+v", ct.calls)
	}
	if fakes[IPv4].Runs != 2 {
		t.Errorf("restart: %d runs, want the table replaced once", fakes[IPv4].Runs)
	}
	must(t, m.Apply(t.Context(), dualStack(udp5060)))
	calls := ct.calls[netlink.FAMILY_V4]
	if len(calls) != 1 || len(calls[0]) != 1 || !slices.Equal(calls[0][0].Ports, []annotations.DestinationPort{tcp8080}) {
		t.Errorf("flushes %+v, want pod %s on tcp:8080", calls, pod4)
	}
	// The periodic Recheck of an intact table reads and writes nothing.
	runs := fakes[IPv4].Runs
	m.Recheck()
	must(t, m.Apply(t.Context(), dualStack(udp5060)))
	if ok, err := m.Check(t.Context()); !ok || err != nil {
		t.Fatalf("Check = %v, %v", ok, err)
	}
	m.Recheck()
	must(t, m.Apply(t.Context(), dualStack(udp5060)))
	if fakes[IPv4].Runs != runs {
		t.Errorf("Recheck of an intact table rewrote it")
	}
}

func TestNFTCheck(t *testing.T) {
	tests := []struct {
		name    string
		breakIt func(t *testing.T, f *FakeNFT)
		intact  bool
	}{
		{"someone else's table changes", func(t *testing.T, f *FakeNFT) { f.OtherCommit() }, true},
		{"table deleted", func(t *testing.T, f *FakeNFT) {
			foreignRun(t, f, func(tx *knftables.Transaction) { tx.Delete(&knftables.Table{}) })
		}, false},
		{"chain flushed", func(t *testing.T, f *FakeNFT) {
			foreignRun(t, f, func(tx *knftables.Transaction) { tx.Flush(&knftables.Chain{Name: nftChain}) })
		}, false},
		{"map flushed", func(t *testing.T, f *FakeNFT) {
			foreignRun(t, f, func(tx *knftables.Transaction) { tx.Flush(&knftables.Map{Name: nftSNATPorts}) })
		}, false},
		{"element changed", func(t *testing.T, f *FakeNFT) {
			foreignRun(t, f, func(tx *knftables.Transaction) {
				tx.Delete(&knftables.Element{Map: nftSNATPorts, Key: []string{"10.244.1.5", "17", "5060"}})
				tx.Add(&knftables.Element{Map: nftSNATPorts, Key: []string{"10.244.1.5", "17", "5060"}, Value: []string{"203.0.113.99"}})
			})
		}, false},
		{"rule added", func(t *testing.T, f *FakeNFT) {
			foreignRun(t, f, func(tx *knftables.Transaction) {
				tx.Insert(&knftables.Rule{Chain: nftChain, Rule: "ip saddr 10.244.0.0/16 masquerade"})
			})
		}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fakes := nftFakes()
			m := newNFTManager(t, fakes, nil)
			ctx := t.Context()
			must(t, m.Apply(ctx, dualStack(udp5060)))
			// The first check after a write takes the reference listing.
			for range 2 {
				if ok, err := m.Check(ctx); !ok || err != nil {
					t.Fatalf("Check after Apply = %v, %v", ok, err)
				}
			}
			tc.breakIt(t, fakes[IPv4])
			if ok, err := m.Check(ctx); ok != tc.intact || err != nil {
				t.Fatalf("Check = %v, %v; want %v", ok, err, tc.intact)
			}
			if tc.intact {
				return
			}
			m.Recheck()
			must(t, m.Apply(ctx, dualStack(udp5060)))
			if ok, err := m.Check(ctx); !ok || err != nil {
				t.Fatalf("Check after repair = %v, %v", ok, err)
			}
			if got := fakes[IPv4].Trace(pod4, ext4, annotations.UDP, 5060); got.Source != lb4 {
				t.Errorf("after repair, packet %s", got)
			}
			if got := fakes[IPv4].Trace(pod4, ext4, annotations.TCP, 5060); got.Source != pod4 {
				t.Errorf("after repair, foreign rule survived: packet %s", got)
			}
		})
	}
}

// TestNFTCheckForeignCommitDuringWrite: when someone commits right after
// our write, before the reference listing, there is nothing to compare
// with: the check fails once, the rewrite takes a reference, and later
// commits by others are compared with it.
func TestNFTCheckForeignCommitDuringWrite(t *testing.T) {
	fakes := nftFakes()
	m := newNFTManager(t, fakes, nil)
	ctx := t.Context()
	fakes[IPv4].AfterRun = fakes[IPv4].OtherCommit
	must(t, m.Apply(ctx, dualStack()))
	fakes[IPv4].AfterRun = nil
	if ok, _ := m.Check(ctx); ok {
		t.Fatal("Check without a reference said intact")
	}
	m.Recheck()
	must(t, m.Apply(ctx, dualStack()))
	must2(m.Check(ctx))(t)
	fakes[IPv4].OtherCommit()
	must2(m.Check(ctx))(t)
	must2(m.Check(ctx))(t)
}

func must2(ok bool, err error) func(t *testing.T) {
	return func(t *testing.T) {
		t.Helper()
		if !ok || err != nil {
			t.Fatalf("Check = %v, %v", ok, err)
		}
	}
}

func TestNFTErrors(t *testing.T) {
	t.Run("run error is wrapped and retried", func(t *testing.T) {
		fakes := nftFakes()
		ct := &fakeConntrack{}
		m := newNFTManager(t, fakes, ct)
		boom := errors.New("nft: Error: Could not process rule: Operation not permitted")
		fakes[IPv4].RunErr = boom
		err := m.Apply(t.Context(), dualStack())
		if !errors.Is(err, boom) || !strings.Contains(err.Error(), "IPv4") || !strings.Contains(err.Error(), "ip egressvip") {
			t.Fatalf("Apply error = %v", err)
		}
		if len(ct.pods(netlink.FAMILY_V4)) != 0 {
			t.Error("conntrack flushed although nothing was written")
		}
		if ok, _ := m.Check(t.Context()); ok {
			t.Error("Check after a failed write said intact")
		}
		fakes[IPv4].RunErr = nil
		must(t, m.Apply(t.Context(), dualStack()))
		if got := fakes[IPv4].Trace(pod4, ext4, annotations.UDP, 5060); got.Source != lb4 {
			t.Errorf("after retry, packet %s", got)
		}
	})
	t.Run("IPv6 unusable while no rule needs it", func(t *testing.T) {
		fakes := nftFakes()
		fakes[IPv6].RunErr = errors.New("nft: Error: Could not process rule: Address family not supported by protocol")
		m := newNFTManager(t, fakes, nil)
		ipv4Only := dualStack()
		ipv4Only.Rules = ipv4Only.Rules[:1]
		must(t, m.Apply(t.Context(), ipv4Only))
		must2(m.Check(t.Context()))(t)
		if err := m.Apply(t.Context(), dualStack()); err == nil || !strings.Contains(err.Error(), "IPv6") {
			t.Fatalf("an IPv6 rule that cannot be written must fail, got %v", err)
		}
	})
	t.Run("a diff that does not apply replaces the table", func(t *testing.T) {
		fakes := nftFakes()
		m := newNFTManager(t, fakes, nil)
		must(t, m.Apply(t.Context(), dualStack(udp5060)))
		// Someone deletes the element the next diff deletes.
		foreignRun(t, fakes[IPv4], func(tx *knftables.Transaction) {
			tx.Delete(&knftables.Element{Map: nftSNATPorts, Key: []string{"10.244.1.5", "17", "5060"}})
		})
		must(t, m.Apply(t.Context(), dualStack(tcp8080)))
		if got := fakes[IPv4].Trace(pod4, ext4, annotations.TCP, 8080); got.Source != lb4 {
			t.Errorf("packet %s", got)
		}
	})
}

// TestSwitchBackends: the first Apply removes what egressvip owns in the
// other backends, after its own rules are written, and nothing else.
func TestSwitchBackends(t *testing.T) {
	t.Run("iptables to nftables", func(t *testing.T) {
		ipt := [2]*Fake{NewFake(), NewFake()}
		for _, f := range ipt {
			must(t, f.Append("POSTROUTING", "-s", "10.244.0.0/16", "-j", "MASQUERADE"))
		}
		before := [2]string{string(ipt[0].Table().Save()), string(ipt[1].Table().Save())}
		old := newFakeManager(t, ipt, nil)
		must(t, old.Apply(t.Context(), dualStack()))
		must(t, ipt[IPv4].Append("POSTROUTING", hookSpec...)) // a second hook
		must(t, ipt[IPv4].Restore(t.Context(), []byte("*nat\n:EGRESSVIP-OLD - [0:0]\nCOMMIT\n")))

		nft := nftFakes()
		m := newNFTManager(t, nft, nil)
		var order []string
		m.others = []leftovers{{name: BackendIPTablesLegacy, w: &orderWriter{writer: &iptablesWriter{runners: [2]Runner{ipt[0], ipt[1]}}, order: &order, nft: nft[IPv4]}}}
		must(t, m.Apply(t.Context(), dualStack()))
		for _, f := range Families {
			if got := string(ipt[f].Table().Save()); got != before[f] {
				t.Errorf("%s iptables after the switch:\n%s\nwant:\n%s", f, got, before[f])
			}
		}
		if !slices.Equal(order, []string{"nftables written, then leftovers removed"}) {
			t.Errorf("order: %v", order)
		}
		if got := nft[IPv4].Trace(pod4, ext4, annotations.UDP, 5060); got.Source != lb4 {
			t.Errorf("packet %s", got)
		}
		// Done once per Manager.
		must(t, ipt[IPv4].Restore(t.Context(), []byte("*nat\n:EGRESSVIP-NEW - [0:0]\nCOMMIT\n")))
		must(t, m.Apply(t.Context(), dualStack()))
		if chains, _ := ipt[IPv4].ListChains(); !slices.Contains(chains, "EGRESSVIP-NEW") {
			t.Errorf("leftovers looked for again on a later Apply")
		}
		must(t, m.RemoveOtherBackends(t.Context()))
		if chains, _ := ipt[IPv4].ListChains(); slices.Contains(chains, "EGRESSVIP-NEW") {
			t.Errorf("RemoveOtherBackends left %v", chains)
		}
	})
	t.Run("nftables to iptables", func(t *testing.T) {
		nft := nftFakes()
		old := newNFTManager(t, nft, nil)
		must(t, old.Apply(t.Context(), dualStack()))
		ipt := [2]*Fake{NewFake(), NewFake()}
		m := newFakeManager(t, ipt, nil)
		m.others = []leftovers{{name: BackendNFTables, w: &nftWriter{tables: [2]NFTables{nft[0], nft[1]}}}}
		must(t, m.Apply(t.Context(), dualStack()))
		for _, f := range nft {
			f.RLock()
			if f.Table != nil {
				t.Errorf("%s: egressvip table left", f.family)
			}
			f.RUnlock()
		}
		hookFirst(t, ipt[IPv4])
	})
}

// orderWriter records whether the nftables table existed when the
// leftovers were removed.
type orderWriter struct {
	writer
	order *[]string
	nft   *FakeNFT
}

func (o *orderWriter) cleanup(ctx context.Context) error {
	o.nft.RLock()
	written := o.nft.Table != nil
	o.nft.RUnlock()
	if written {
		*o.order = append(*o.order, "nftables written, then leftovers removed")
	} else {
		*o.order = append(*o.order, "leftovers removed before nftables was written")
	}
	return o.writer.cleanup(ctx)
}

// TestCleanupEveryBackend: Cleanup removes egressvip's table and chains in
// every backend, nothing else.
func TestCleanupEveryBackend(t *testing.T) {
	nft := nftFakes()
	m := newNFTManager(t, nft, nil)
	must(t, m.Apply(t.Context(), dualStack()))
	ipt := [2]*Fake{NewFake(), NewFake()}
	must(t, newFakeManager(t, ipt, nil).Apply(t.Context(), dualStack()))
	must(t, ipt[IPv6].Append("POSTROUTING", "-j", "MASQUERADE"))
	m.others = []leftovers{{name: BackendIPTablesNFT, w: &iptablesWriter{runners: [2]Runner{ipt[0], ipt[1]}}}}
	must(t, m.Cleanup())
	for _, f := range nft {
		f.RLock()
		if f.Table != nil {
			t.Errorf("%s table left", f.family)
		}
		f.RUnlock()
	}
	for _, f := range Families {
		save := string(ipt[f].Table().Save())
		if strings.Contains(save, ChainPrefix) {
			t.Errorf("%s: iptables leftovers:\n%s", f, save)
		}
	}
	if rules, _ := ipt[IPv6].List("POSTROUTING"); len(rules) != 1 {
		t.Errorf("foreign rule lost: %v", rules)
	}
	if got, err := m.Services(t.Context()); err != nil || len(got) != 0 {
		t.Errorf("Services after Cleanup = %v, %v", got, err)
	}
	must(t, m.Cleanup()) // nothing left: fine
}

func TestSelectBackend(t *testing.T) {
	nftWorks := errors.New("")
	tests := []struct {
		backend      string
		withNFTables bool
		probe        error // nil: nft works
		want         string
	}{
		{"", false, nil, BackendNFTables},
		{"auto", false, nftWorks, BackendIPTablesLegacy},
		{"", true, nil, BackendIPTablesNFT},
		{"AUTO", true, nftWorks, BackendIPTablesNFT},
		{"nftables", true, nftWorks, BackendNFTables},
		{"iptables-legacy", true, nil, BackendIPTablesLegacy},
		{" iptables-nft ", false, nil, BackendIPTablesNFT},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprintf("%q,%v,%v", tc.backend, tc.withNFTables, tc.probe == nil), func(t *testing.T) {
			orig := probeNFTables
			t.Cleanup(func() { probeNFTables = orig })
			probeNFTables = func() error { return tc.probe }
			got, err := SelectBackend(tc.backend, tc.withNFTables)
			if err != nil || got != tc.want {
				t.Errorf("SelectBackend = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
	if _, err := SelectBackend("ebpf", false); err == nil || !strings.Contains(err.Error(), "egress_backend") || !strings.Contains(err.Error(), "ebpf") {
		t.Errorf("unknown backend error = %v", err)
	}
	if _, err := New(Config{Backend: "ebpf"}); err == nil || !strings.Contains(err.Error(), "egress_backend") {
		t.Errorf("New with an unknown backend: %v", err)
	}
}

func TestNewNFTablesMissing(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	_, err := New(Config{Backend: BackendNFTables})
	if err == nil || !strings.Contains(err.Error(), "nft") || !strings.Contains(err.Error(), "egress_backend") {
		t.Errorf("New error = %v, want it to name nft and egress_backend", err)
	}
}

func TestMinimalPrefixes(t *testing.T) {
	in := Desired{Exclude: []netip.Prefix{
		netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("10.96.0.0/12"),
		netip.MustParsePrefix("192.168.0.0/24"), netip.MustParsePrefix("192.168.1.0/24"), netip.MustParsePrefix("192.168.0.7/32"),
	}}.forFamily(IPv4)
	got := minimalPrefixes(in.Exclude)
	want := []string{"10.0.0.0/8", "192.168.0.0/24", "192.168.1.0/24"}
	if !slices.Equal(got, want) {
		t.Errorf("minimalPrefixes = %v, want %v", got, want)
	}
}

func TestParseGenID(t *testing.T) {
	// nfgenmsg, then NFTA_GEN_ID (type 1) = 0x01020304, NFTA_GEN_PROC_PID.
	msg := []byte{0, 0, 0, 0, 8, 0, 1, 0, 1, 2, 3, 4, 8, 0, 2, 0, 0, 0, 0, 9}
	if id, ok := parseGenID(msg); !ok || id != 0x01020304 {
		t.Errorf("parseGenID = %#x, %v", id, ok)
	}
	if _, ok := parseGenID(msg[:6]); ok {
		t.Error("truncated message parsed")
	}
}

// TestSwitchBackendsKeepsOldRulesUntilNewOnesWork: leftovers stay while the
// new backend cannot write, so egress keeps working through them.
func TestSwitchBackendsKeepsOldRulesUntilNewOnesWork(t *testing.T) {
	ipt := [2]*Fake{NewFake(), NewFake()}
	must(t, newFakeManager(t, ipt, nil).Apply(t.Context(), dualStack()))
	nft := nftFakes()
	nft[IPv4].RunErr = errors.New("nft: Error: Could not process rule: Operation not supported")
	m := newNFTManager(t, nft, nil)
	m.others = []leftovers{{name: BackendIPTablesLegacy, w: &iptablesWriter{runners: [2]Runner{ipt[0], ipt[1]}}}}
	if err := m.Apply(t.Context(), dualStack()); err == nil {
		t.Fatal("Apply did not fail")
	}
	if got := ipt[IPv4].Trace(pod4, ext4, annotations.UDP, 5060); got.Source != lb4 {
		t.Fatalf("old iptables rules removed before the new ones worked: packet %s", got)
	}
	nft[IPv4].RunErr = nil
	must(t, m.Apply(t.Context(), dualStack()))
	if chains, _ := ipt[IPv4].ListChains(); slices.Contains(chains, Chain) {
		t.Errorf("leftovers kept after the new backend worked: %v", chains)
	}
}

// TestNFTDiffOnlyOnAVerifiedTable: a change someone made to the table is
// not blessed by the next diff: Apply replaces a table it cannot verify.
func TestNFTDiffOnlyOnAVerifiedTable(t *testing.T) {
	fakes := nftFakes()
	m := newNFTManager(t, fakes, nil)
	ctx := t.Context()
	must(t, m.Apply(ctx, dualStack(udp5060)))
	foreignRun(t, fakes[IPv4], func(tx *knftables.Transaction) {
		tx.Add(&knftables.Element{Map: nftSNATAll, Key: []string{"10.244.1.99"}, Value: []string{"203.0.113.99"}})
	})
	must(t, m.Apply(ctx, dualStack(tcp8080))) // before any Check
	if got := fakes[IPv4].Trace(netip.MustParseAddr("10.244.1.99"), ext4, annotations.UDP, 53); got.Source != netip.MustParseAddr("10.244.1.99") {
		t.Errorf("someone's element survived the write: packet %s", got)
	}
	must2(m.Check(ctx))(t)
	if got := fakes[IPv4].Trace(pod4, ext4, annotations.TCP, 8080); got.Source != lb4 {
		t.Errorf("packet %s", got)
	}
}
