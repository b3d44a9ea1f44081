package snat

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/pkg/model"
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

// TestNFTTable: every element and rule names its Service, nested
// exclusions are left out, the chains have their priorities.
func TestNFTTable(t *testing.T) {
	d := dualStack(udp5060)
	d.SNAT = append(d.SNAT,
		model.SNATRule{Service: "other/web", Pod: pod4b, Source: lb4b},
		model.SNATRule{Service: "f/f", Pod: podF, Source: lb4, Filter: model.Filter{Allow: prefixes("198.51.100.0/24")}},
	)
	d.Steer = []model.SteerRule{{Service: "s/s", Pod: netip.MustParseAddr("10.244.1.8"), Filter: ports(tcp8080)}}
	d.Exclude = append(d.Exclude, netip.MustParsePrefix("10.244.7.0/24"))
	fakes := nftFakes()
	m := newNFTManager(t, fakes, nil)
	noFail(t)(m.Apply(t.Context(), d))
	t.Logf("IPv4 table:\n%s", fakes[IPv4].Dump())

	fakes[IPv4].RLock()
	for name, mp := range fakes[IPv4].Table.Maps {
		for _, e := range mp.Elements {
			if e.Comment == nil || !slices.Contains([]string{"default/sip", "other/web", "f/f", "s/s"}, *e.Comment) {
				t.Errorf("map %s element %v without its Service as comment", name, e.Key)
			}
		}
	}
	for name, c := range fakes[IPv4].Table.Chains {
		for _, r := range c.Rules {
			if r.Comment == nil {
				t.Errorf("chain %s rule %q without comment", name, r.Rule)
			}
		}
	}
	// The nested 10.244.7.0/24 is not written: an interval set refuses
	// overlapping elements.
	if n := len(fakes[IPv4].Table.Sets[nftExclude].Elements); n != 2 {
		t.Errorf("exclude set has %d elements, want 2", n)
	}
	prio := func(chain string) int {
		c := fakes[IPv4].Table.Chains[chain]
		p, err := knftables.ParsePriority(knftables.IPv4Family, string(*c.Priority))
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	if p := prio(nftPostrouting); p != 90 {
		t.Errorf("nat chain priority %d, want 90: before iptables and kube-proxy (srcnat, 100)", p)
	}
	if p := prio(nftPrerouting); p != 0 {
		t.Errorf("prerouting chain priority %d, want 0: after kube-proxy's DNAT (dstnat, -100)", p)
	}
	if p := prio(nftFence); p != 110 {
		t.Errorf("fence priority %d, want 110: after the source translation (srcnat, 100)", p)
	}
	fakes[IPv4].RUnlock()
	if got, err := m.Services(t.Context()); err != nil || !slices.Equal(got, []string{"default/sip", "f/f", "other/web", "s/s"}) {
		t.Errorf("Services = %v, %v", got, err)
	}
}

func nftTrace(f *FakeNFT, src, dst netip.Addr, proto annotations.Protocol, port uint16) verdict {
	return traceNFT(f, nil, protoPkt(src, dst, proto, port))
}

// TestNFTBeatsIPTablesMasquerade: a CNI's MASQUERADE at position 1 of
// iptables' nat POSTROUTING, inserted after egressvip wrote its table,
// does not win, and excluded destinations still reach it.
func TestNFTBeatsIPTablesMasquerade(t *testing.T) {
	fakes := nftFakes()
	m := newNFTManager(t, fakes, nil)
	noFail(t)(m.Apply(t.Context(), dualStack(udp5060)))
	ipt := NewFake()
	must(t, ipt.Insert("nat", "POSTROUTING", 1, "-s", "10.244.0.0/16", "!", "-d", "10.244.0.0/16", "-j", "MASQUERADE"))
	if got := traceNFT(fakes[IPv4], ipt, udpPkt(pod4, ext4, 5060)); !got.leaves(lb4) {
		t.Errorf("egress packet %s, want source %s", got, lb4)
	}
	if got := traceNFT(fakes[IPv4], ipt, protoPkt(pod4, ext4, annotations.TCP, 443)); !got.masquerade {
		t.Errorf("packet without egress rule %s, want the CNI's MASQUERADE", got)
	}
	if got := traceNFT(fakes[IPv4], ipt, udpPkt(pod4, clusterIP4, 5060)); !got.masquerade {
		t.Errorf("packet to the Service CIDR %s, want the CNI's MASQUERADE (excluded by egressvip)", got)
	}
}

func TestNFTApplyWritesOnlyChanges(t *testing.T) {
	fakes := nftFakes()
	ct := &fakeConntrack{}
	m := newNFTManager(t, fakes, ct)
	ctx := t.Context()
	var d model.Datapath
	d.Exclude = []netip.Prefix{podNet4, svcNet4, podNet6}
	for i := range 50 {
		d.SNAT = append(d.SNAT, model.SNATRule{Service: fmt.Sprintf("ns/svc%d", i), Pod: netip.AddrFrom4([4]byte{10, 244, 2, byte(i)}), Source: lb4, Filter: ports(udp5060)})
	}
	noFail(t)(m.Apply(ctx, d))
	if fakes[IPv4].Runs != 1 || fakes[IPv6].Runs != 1 {
		t.Fatalf("runs %d/%d after the first Apply, want 1/1", fakes[IPv4].Runs, fakes[IPv6].Runs)
	}
	noFail(t)(m.Apply(ctx, d))
	if fakes[IPv4].Runs != 1 {
		t.Fatalf("unchanged Apply ran a transaction")
	}

	// One Service changes its address: one element deleted, one added, in
	// one transaction; nothing else is rewritten.
	d.SNAT[7].Source = lb4b
	noFail(t)(m.Apply(ctx, d))
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
	if got := nftTrace(fakes[IPv4], netip.MustParseAddr("10.244.2.7"), ext4, annotations.UDP, 5060); !got.leaves(lb4b) {
		t.Errorf("changed pod %s", got)
	}
	if got := nftTrace(fakes[IPv4], netip.MustParseAddr("10.244.2.8"), ext4, annotations.UDP, 5060); !got.leaves(lb4) {
		t.Errorf("unchanged pod %s", got)
	}
	calls := ct.calls[netlink.FAMILY_V4]
	if last := calls[len(calls)-1]; len(last) != 1 || last[0].pod != netip.MustParseAddr("10.244.2.7") {
		t.Errorf("conntrack flushed %+v, want only the changed pod", last)
	}

	// A Service renamed with the same translation: the element's comment
	// changes, no conntrack entry goes.
	before := len(ct.calls[netlink.FAMILY_V4])
	d.SNAT[3].Service = "ns/renamed"
	noFail(t)(m.Apply(ctx, d))
	if got, _ := m.Services(ctx); !slices.Contains(got, "ns/renamed") || slices.Contains(got, "ns/svc3") {
		t.Errorf("Services after the rename: %v", got)
	}
	if len(ct.calls[netlink.FAMILY_V4]) != before {
		t.Errorf("a comment change flushed conntrack")
	}

	// Exclusions change: the set is rewritten.
	d.Exclude = append(d.Exclude, netip.MustParsePrefix("198.51.100.0/24"))
	noFail(t)(m.Apply(ctx, d))
	if got := nftTrace(fakes[IPv4], netip.MustParseAddr("10.244.2.8"), ext4, annotations.UDP, 5060); !got.leaves(netip.MustParseAddr("10.244.2.8")) {
		t.Errorf("newly excluded destination %s", got)
	}
}

// TestNFTRestart: a new process reads the elements back (so unchanged pods
// keep their conntrack entries) and replaces the table once, atomically.
func TestNFTRestart(t *testing.T) {
	fakes := nftFakes()
	first := newNFTManager(t, fakes, nil)
	noFail(t)(first.Apply(t.Context(), dualStack(udp5060, tcp8080)))

	ct := &fakeConntrack{}
	m := newNFTManager(t, fakes, ct)
	noFail(t)(m.Apply(t.Context(), dualStack(udp5060, tcp8080)))
	if len(ct.calls) != 0 {
		t.Errorf("restart with unchanged rules flushed conntrack: %+v", ct.calls)
	}
	if fakes[IPv4].Runs != 2 {
		t.Errorf("restart: %d runs, want the table replaced once", fakes[IPv4].Runs)
	}
	noFail(t)(m.Apply(t.Context(), dualStack(udp5060)))
	calls := ct.calls[netlink.FAMILY_V4]
	if len(calls) != 1 || len(calls[0]) != 1 || !slices.Equal(calls[0][0].ports, []annotations.DestinationPort{tcp8080}) {
		t.Errorf("flushes %+v, want pod %s on tcp:8080", calls, pod4)
	}
	// The periodic Recheck of an intact table reads and writes nothing.
	runs := fakes[IPv4].Runs
	m.Recheck()
	noFail(t)(m.Apply(t.Context(), dualStack(udp5060)))
	if ok, err := m.Check(t.Context()); !ok || err != nil {
		t.Fatalf("Check = %v, %v", ok, err)
	}
	m.Recheck()
	noFail(t)(m.Apply(t.Context(), dualStack(udp5060)))
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
			foreignRun(t, f, func(tx *knftables.Transaction) { tx.Flush(&knftables.Chain{Name: nftPostrouting}) })
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
				tx.Insert(&knftables.Rule{Chain: nftPostrouting, Rule: "ip saddr 10.244.0.0/16 masquerade"})
			})
		}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fakes := nftFakes()
			m := newNFTManager(t, fakes, nil)
			ctx := t.Context()
			noFail(t)(m.Apply(ctx, dualStack(udp5060)))
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
			noFail(t)(m.Apply(ctx, dualStack(udp5060)))
			if ok, err := m.Check(ctx); !ok || err != nil {
				t.Fatalf("Check after repair = %v, %v", ok, err)
			}
			if got := nftTrace(fakes[IPv4], pod4, ext4, annotations.UDP, 5060); !got.leaves(lb4) {
				t.Errorf("after repair, packet %s", got)
			}
			if got := nftTrace(fakes[IPv4], pod4, ext4, annotations.TCP, 5060); !got.leaves(pod4) {
				t.Errorf("after repair, foreign rule survived: packet %s", got)
			}
		})
	}
}

// TestNFTDeletedTableIsNotReadBack: the repair of a table deleted by hand
// reads nothing back (an nft run per set, for real): the state is empty, so
// every pod's connections are flushed, as they were set up without rules.
func TestNFTDeletedTableIsNotReadBack(t *testing.T) {
	fakes := nftFakes()
	ct := &fakeConntrack{}
	m := newNFTManager(t, fakes, ct)
	ctx := t.Context()
	noFail(t)(m.Apply(ctx, dualStack(udp5060)))
	foreignRun(t, fakes[IPv4], func(tx *knftables.Transaction) { tx.Delete(&knftables.Table{}) })
	if ok, err := m.Check(ctx); ok || err != nil {
		t.Fatalf("Check after the table was deleted = %v, %v", ok, err)
	}
	m.Recheck()
	lists := fakes[IPv4].Lists
	noFail(t)(m.Apply(ctx, dualStack(udp5060)))
	if n := fakes[IPv4].Lists - lists; n != 0 {
		t.Errorf("the repair listed %d sets and maps of a table that did not exist", n)
	}
	if got := nftTrace(fakes[IPv4], pod4, ext4, annotations.UDP, 5060); !got.leaves(lb4) {
		t.Errorf("after the repair, packet %s", got)
	}
	if !slices.Contains(ct.pods(netlink.FAMILY_V4), pod4) {
		t.Errorf("the connections set up while the table was gone were not flushed: %v", ct.pods(netlink.FAMILY_V4))
	}
	// A table that exists, changed by someone else, is still read back.
	foreignRun(t, fakes[IPv4], func(tx *knftables.Transaction) { tx.Flush(&knftables.Map{Name: nftSNATPorts}) })
	if ok, err := m.Check(ctx); ok || err != nil {
		t.Fatalf("Check after the map was flushed = %v, %v", ok, err)
	}
	m.Recheck()
	lists = fakes[IPv4].Lists
	noFail(t)(m.Apply(ctx, dualStack(udp5060)))
	if fakes[IPv4].Lists == lists {
		t.Error("the changed table was not read back")
	}
}

// TestNFTCheckForeignCommitDuringWrite: when someone commits right after
// our write, before the reference listing, there is nothing to compare
// with: the check answers ErrUnverified once, the next write replaces the
// table and takes a reference (after a Recheck or without one), and later
// commits by others are compared with it.
func TestNFTCheckForeignCommitDuringWrite(t *testing.T) {
	fakes, ct := nftFakes(), &fakeConntrack{}
	m := newNFTManager(t, fakes, ct)
	ctx := t.Context()
	fakes[IPv4].AfterRun = fakes[IPv4].OtherCommit
	noFail(t)(m.Apply(ctx, dualStack()))
	fakes[IPv4].AfterRun = nil
	if ok, err := m.Check(ctx); ok || !errors.Is(err, model.ErrUnverified) {
		t.Fatalf("Check without a reference = %v, %v; want false, ErrUnverified", ok, err)
	}
	// The same datapath again, no Recheck: the table is replaced, and no
	// conntrack entry is swept (nothing is known to have been wrong).
	runs := fakes[IPv4].Runs
	noFail(t)(m.Apply(ctx, dualStack()))
	if fakes[IPv4].Runs != runs+1 {
		t.Fatalf("the unverified table was not rewritten (%d runs)", fakes[IPv4].Runs-runs)
	}
	if n := len(ct.sweeps[netlink.FAMILY_V4]); n != 0 {
		t.Errorf("an unverified check swept conntrack %d times", n)
	}
	must2(m.Check(ctx))(t)

	fakes[IPv4].AfterRun = fakes[IPv4].OtherCommit
	m.Recheck()
	noFail(t)(m.Apply(ctx, dualStack(udp5060)))
	fakes[IPv4].AfterRun = nil
	if ok, err := m.Check(ctx); ok || !errors.Is(err, model.ErrUnverified) {
		t.Fatalf("Check without a reference = %v, %v; want false, ErrUnverified", ok, err)
	}
	m.Recheck()
	noFail(t)(m.Apply(ctx, dualStack()))
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
		failed, err := m.Apply(t.Context(), dualStack())
		if ferr := failed["default/sip"]; err != nil || !errors.Is(ferr, boom) || !strings.Contains(ferr.Error(), "IPv4") || !strings.Contains(ferr.Error(), "ip egressvip") {
			t.Fatalf("Apply = %v, %v", failed, err)
		}
		if len(ct.pods(netlink.FAMILY_V4)) != 0 {
			t.Error("conntrack flushed although nothing was written")
		}
		if ok, _ := m.Check(t.Context()); ok {
			t.Error("Check after a failed write said intact")
		}
		fakes[IPv4].RunErr = nil
		noFail(t)(m.Apply(t.Context(), dualStack()))
		if got := nftTrace(fakes[IPv4], pod4, ext4, annotations.UDP, 5060); !got.leaves(lb4) {
			t.Errorf("after retry, packet %s", got)
		}
	})
	t.Run("IPv6 unusable while no rule needs it", func(t *testing.T) {
		fakes := nftFakes()
		fakes[IPv6].RunErr = errors.New("nft: Error: Could not process rule: Address family not supported by protocol")
		m := newNFTManager(t, fakes, nil)
		ipv4Only := dualStack()
		ipv4Only.SNAT = ipv4Only.SNAT[:1]
		ipv4Only.Fenced = ipv4Only.Fenced[:1]
		noFail(t)(m.Apply(t.Context(), ipv4Only))
		must2(m.Check(t.Context()))(t)
		if failed, err := m.Apply(t.Context(), dualStack()); err != nil || failed["default/sip"] == nil || !strings.Contains(failed["default/sip"].Error(), "IPv6") {
			t.Fatalf("an IPv6 rule that cannot be written must fail its Service, got %v, %v", failed, err)
		}
	})
	t.Run("a write cut short by the caller does not make a family unusable", func(t *testing.T) {
		fakes := nftFakes()
		m := newNFTManager(t, fakes, nil)
		ipv4Only := dualStack()
		ipv4Only.SNAT = ipv4Only.SNAT[:1]
		ipv4Only.Fenced = ipv4Only.Fenced[:1]
		stopping, cancel := context.WithCancel(t.Context())
		cancel()
		fakes[IPv6].RunErr = fmt.Errorf("nft: %w", context.Canceled)
		_, _ = m.Apply(stopping, ipv4Only)
		if m.state[IPv6].unusable {
			t.Error("IPv6 marked unusable by a write the shutdown cut short")
		}
		_, _ = m.Apply(t.Context(), ipv4Only)
		if !m.state[IPv6].unusable {
			t.Error("IPv6 not marked unusable by a write that failed")
		}
	})
	t.Run("a diff that does not apply replaces the table", func(t *testing.T) {
		fakes := nftFakes()
		m := newNFTManager(t, fakes, nil)
		noFail(t)(m.Apply(t.Context(), dualStack(udp5060)))
		// Someone deletes the element the next diff deletes.
		foreignRun(t, fakes[IPv4], func(tx *knftables.Transaction) {
			tx.Delete(&knftables.Element{Map: nftSNATPorts, Key: []string{"10.244.1.5", "17", "5060"}})
		})
		noFail(t)(m.Apply(t.Context(), dualStack(tcp8080)))
		if got := nftTrace(fakes[IPv4], pod4, ext4, annotations.TCP, 8080); !got.leaves(lb4) {
			t.Errorf("packet %s", got)
		}
	})
}

// TestSwitchBackends: the first Apply removes what egressvip owns in the
// other backends, after its own rules are written, and nothing else.
func TestSwitchBackends(t *testing.T) {
	t.Run("iptables to nftables", func(t *testing.T) {
		ipt := iptFakes()
		for _, f := range ipt {
			must(t, f.Append("nat", "POSTROUTING", "-s", "10.244.0.0/16", "-j", "MASQUERADE"))
		}
		before := [2]string{ipt[0].Dump(), ipt[1].Dump()}
		old := newFakeManager(t, ipt, nil)
		noFail(t)(old.Apply(t.Context(), dualStack()))
		must(t, ipt[IPv4].Append("nat", "POSTROUTING", splitWords(natHookSpec())...)) // a second hook
		must(t, ipt[IPv4].Restore(t.Context(), []byte("*nat\n:EGRESSVIP-OLD - [0:0]\nCOMMIT\n")))

		nft := nftFakes()
		m := newNFTManager(t, nft, nil)
		var order []string
		m.others = []leftovers{{name: BackendIPTablesLegacy, w: &orderWriter{writer: &iptablesWriter{runners: [2]Runner{ipt[0], ipt[1]}}, order: &order, nft: nft[IPv4]}}}
		noFail(t)(m.Apply(t.Context(), dualStack()))
		for _, f := range Families {
			got := ipt[f].Dump()
			if strings.Contains(got, ChainPrefix) || !strings.Contains(got, "-A POSTROUTING -s 10.244.0.0/16 -j MASQUERADE") {
				t.Errorf("%s iptables after the switch:\n%s\nwant what was there before:\n%s", f, got, before[f])
			}
		}
		if !slices.Equal(order, []string{"nftables written, then leftovers removed"}) {
			t.Errorf("order: %v", order)
		}
		if got := nftTrace(nft[IPv4], pod4, ext4, annotations.UDP, 5060); !got.leaves(lb4) {
			t.Errorf("packet %s", got)
		}
		// Done once per Manager.
		must(t, ipt[IPv4].Restore(t.Context(), []byte("*nat\n:EGRESSVIP-NEW - [0:0]\nCOMMIT\n")))
		noFail(t)(m.Apply(t.Context(), dualStack()))
		if chains := ipt[IPv4].Chains("nat"); !slices.Contains(chains, "EGRESSVIP-NEW") {
			t.Errorf("leftovers looked for again on a later Apply")
		}
		must(t, m.RemoveOtherBackends(t.Context()))
		if chains := ipt[IPv4].Chains("nat"); slices.Contains(chains, "EGRESSVIP-NEW") {
			t.Errorf("RemoveOtherBackends left %v", chains)
		}
	})
	t.Run("nftables to iptables", func(t *testing.T) {
		nft := nftFakes()
		old := newNFTManager(t, nft, nil)
		noFail(t)(old.Apply(t.Context(), dualStack()))
		ipt := iptFakes()
		m := newFakeManager(t, ipt, nil)
		m.others = []leftovers{{name: BackendNFTables, w: &nftWriter{table: TableName, tables: [2]NFTables{nft[0], nft[1]}}}}
		noFail(t)(m.Apply(t.Context(), dualStack()))
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
	noFail(t)(m.Apply(t.Context(), dualStack()))
	ipt := iptFakes()
	noFail(t)(newFakeManager(t, ipt, nil).Apply(t.Context(), dualStack()))
	must(t, ipt[IPv6].Append("nat", "POSTROUTING", "-j", "MASQUERADE"))
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
		save := ipt[f].Dump()
		if strings.Contains(save, ChainPrefix) {
			t.Errorf("%s: iptables leftovers:\n%s", f, save)
		}
	}
	if rules := ipt[IPv6].List("nat", "POSTROUTING"); len(rules) != 1 {
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
		probe        error  // nil: nft works
		flavour      string // what the node's iptables rules say
		want         string
	}{
		{"", true, nil, BackendIPTablesLegacy, BackendNFTables},
		{"auto", true, nftWorks, BackendIPTablesLegacy, BackendIPTablesLegacy},
		{"", true, nftWorks, BackendIPTablesNFT, BackendIPTablesNFT},
		{"", false, nil, BackendIPTablesNFT, BackendIPTablesNFT},
		{"AUTO", false, nil, BackendIPTablesLegacy, BackendIPTablesLegacy},
		{"nftables", false, nftWorks, BackendIPTablesLegacy, BackendNFTables},
		{"iptables-legacy", true, nil, BackendIPTablesNFT, BackendIPTablesLegacy},
		{" iptables-nft ", false, nil, BackendIPTablesLegacy, BackendIPTablesNFT},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprintf("%q,%v,%v,%s", tc.backend, tc.withNFTables, tc.probe == nil, tc.flavour), func(t *testing.T) {
			orig, origFlavour := probeNFTables, probeIPTablesFlavour
			t.Cleanup(func() { probeNFTables, probeIPTablesFlavour = orig, origFlavour })
			probeNFTables = func() error { return tc.probe }
			probeIPTablesFlavour = func() (string, string) { return tc.flavour, "test" }
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
	in := prefixesOf(IPv4, prefixes("10.0.0.0/8", "10.244.0.0/16", "10.96.0.0/12", "192.168.0.0/24", "192.168.1.0/24", "192.168.0.7/32", "fd00::/8"))
	got := minimalPrefixes(in)
	want := prefixes("10.0.0.0/8", "192.168.0.0/24", "192.168.1.0/24")
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
	ipt := iptFakes()
	noFail(t)(newFakeManager(t, ipt, nil).Apply(t.Context(), dualStack()))
	nft := nftFakes()
	nft[IPv4].RunErr = errors.New("nft: Error: Could not process rule: Operation not supported")
	m := newNFTManager(t, nft, nil)
	m.others = []leftovers{{name: BackendIPTablesLegacy, w: &iptablesWriter{runners: [2]Runner{ipt[0], ipt[1]}}}}
	if failed, err := m.Apply(t.Context(), dualStack()); err == nil && failed == nil {
		t.Fatal("Apply did not fail")
	}
	if got := ipTrace(ipt[IPv4], pod4, ext4, annotations.UDP, 5060); !got.leaves(lb4) {
		t.Fatalf("old iptables rules removed before the new ones worked: packet %s", got)
	}
	nft[IPv4].RunErr = nil
	noFail(t)(m.Apply(t.Context(), dualStack()))
	if chains := ipt[IPv4].Chains("nat"); slices.Contains(chains, Chain) {
		t.Errorf("leftovers kept after the new backend worked: %v", chains)
	}
}

// TestNFTDiffOnlyOnAVerifiedTable: a change someone made to the table is
// not blessed by the next diff: Apply replaces a table it cannot verify.
func TestNFTDiffOnlyOnAVerifiedTable(t *testing.T) {
	fakes := nftFakes()
	m := newNFTManager(t, fakes, nil)
	ctx := t.Context()
	noFail(t)(m.Apply(ctx, dualStack(udp5060)))
	foreignRun(t, fakes[IPv4], func(tx *knftables.Transaction) {
		tx.Add(&knftables.Element{Map: nftSNATAll, Key: []string{"10.244.1.99"}, Value: []string{"203.0.113.99"}})
	})
	noFail(t)(m.Apply(ctx, dualStack(tcp8080))) // before any Check
	if got := nftTrace(fakes[IPv4], netip.MustParseAddr("10.244.1.99"), ext4, annotations.UDP, 53); !got.leaves(netip.MustParseAddr("10.244.1.99")) {
		t.Errorf("someone's element survived the write: packet %s", got)
	}
	must2(m.Check(ctx))(t)
	if got := nftTrace(fakes[IPv4], pod4, ext4, annotations.TCP, 8080); !got.leaves(lb4) {
		t.Errorf("packet %s", got)
	}
}

// TestNFTClauseChains: pods with destination prefixes share a chain per
// clause list; a change adds the new chain and deletes the old one in the
// same transaction, and only the changed pods' entries are flushed.
func TestNFTClauseChains(t *testing.T) {
	fakes := nftFakes()
	ct := &fakeConntrack{}
	m := newNFTManager(t, fakes, ct)
	f := model.Filter{Allow: prefixes("198.51.100.0/24"), Deny: prefixes("198.51.100.9/32")}
	d := model.Datapath{Exclude: []netip.Prefix{podNet4}}
	for i := range 3 {
		d.SNAT = append(d.SNAT, model.SNATRule{Service: "ns/f", Pod: netip.AddrFrom4([4]byte{10, 244, 3, byte(i + 1)}), Source: lb4, Filter: f})
	}
	d.SNAT = append(d.SNAT, model.SNATRule{Service: "ns/g", Pod: pod4, Source: lb4b, Filter: f})
	noFail(t)(m.Apply(t.Context(), d))
	chains := func() []string {
		fakes[IPv4].RLock()
		defer fakes[IPv4].RUnlock()
		var out []string
		for name := range fakes[IPv4].Table.Chains {
			if strings.HasPrefix(name, nftSNATChainPrefix) {
				out = append(out, name)
			}
		}
		slices.Sort(out)
		return out
	}
	before := chains()
	if len(before) != 2 {
		t.Fatalf("clause chains %v, want one for ns/f's three pods and one for ns/g", before)
	}
	d.SNAT[3].Filter.Deny = prefixes("198.51.100.10/32")
	runs := fakes[IPv4].Runs
	calls := len(ct.calls[netlink.FAMILY_V4])
	noFail(t)(m.Apply(t.Context(), d))
	if fakes[IPv4].Runs != runs+1 {
		t.Errorf("%d transactions, want 1", fakes[IPv4].Runs-runs)
	}
	after := chains()
	if len(after) != 2 || !slices.Contains(after, before[0]) == !slices.Contains(after, before[1]) {
		t.Errorf("chains %v -> %v: want ns/g's replaced, ns/f's kept", before, after)
	}
	if got := nftTrace(fakes[IPv4], pod4, ext4, annotations.UDP, 53); !got.leaves(lb4b) {
		t.Errorf("newly allowed destination: %s", got)
	}
	if got := nftTrace(fakes[IPv4], pod4, netip.MustParseAddr("198.51.100.10"), annotations.UDP, 53); got.leaves(lb4b) {
		t.Errorf("newly denied destination: %s", got)
	}
	if c := ct.calls[netlink.FAMILY_V4]; len(c) != calls+1 || len(c[calls]) != 1 || c[calls][0].pod != pod4 || c[calls][0].ports != nil {
		t.Errorf("flushes %+v, want all of %s's entries only", c[calls:], pod4)
	}
}
