package snat

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/pkg/model"
	"github.com/vishvananda/netlink"
	"sigs.k8s.io/knftables"
)

// The iptables backends on Fake runners (their fence on FakeNFTs).

func newFakeManager(t *testing.T, fakes [2]*Fake, ct Conntrack) *Manager {
	t.Helper()
	if ct == nil {
		ct = &fakeConntrack{}
	}
	m, err := New(Config{Log: testLog(t), Runners: [2]Runner{fakes[IPv4], fakes[IPv6]}, Conntrack: ct})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func iptFakes() [2]*Fake { return [2]*Fake{NewFake(), NewFake()} }

func ipTrace(f *Fake, src, dst netip.Addr, proto annotations.Protocol, port uint16) verdict {
	return traceIPT(f, nil, protoPkt(src, dst, proto, port))
}

// hookFirst asserts that nat POSTROUTING starts with our only hook, and
// the raw and mangle PREROUTING ones too.
func hookFirst(t *testing.T, f *Fake) {
	t.Helper()
	for _, h := range (datapathOptions{}).hooks() {
		rules := f.List(h.table, h.chain)
		var at []int
		for i, r := range rules {
			if strings.Contains(r, "-j "+h.target) {
				at = append(at, i+1)
			}
		}
		if !slices.Equal(at, []int{1}) {
			t.Errorf("want exactly one hook at position 1 of %s %s:\n%s", h.table, h.chain, strings.Join(rules, "\n"))
		}
	}
}

func TestApplyWritesOncePerChange(t *testing.T) {
	fakes := iptFakes()
	ct := &fakeConntrack{}
	m := newFakeManager(t, fakes, ct)
	ctx := t.Context()

	noFail(t)(m.Apply(ctx, dualStack()))
	for _, f := range Families {
		if fakes[f].Restores != 1 {
			t.Errorf("%s: %d restores after first Apply, want 1", f, fakes[f].Restores)
		}
		hookFirst(t, fakes[f])
	}
	if got := ipTrace(fakes[IPv4], pod4, ext4, annotations.UDP, 5060); !got.leaves(lb4) {
		t.Errorf("IPv4 packet %s", got)
	}
	if got := ipTrace(fakes[IPv6], pod6, ext6, annotations.UDP, 5060); !got.leaves(lb6) {
		t.Errorf("IPv6 packet %s", got)
	}
	if got := ct.pods(netlink.FAMILY_V4); !slices.Equal(got, []netip.Addr{pod4}) {
		t.Errorf("new rule flushed IPv4 pods %v, want %v", got, pod4)
	}

	// Same state: no write, no flush.
	noFail(t)(m.Apply(ctx, dualStack()))
	for _, f := range Families {
		if fakes[f].Restores != 1 {
			t.Errorf("%s: unchanged Apply wrote (%d restores)", f, fakes[f].Restores)
		}
	}
	if n := len(ct.pods(netlink.FAMILY_V4)); n != 1 {
		t.Errorf("unchanged Apply flushed conntrack (%d pods in total)", n)
	}

	// Only IPv4 changes: only IPv4 is written, only its nat table.
	d := dualStack()
	d.SNAT[0].Filter = ports(udp5060)
	noFail(t)(m.Apply(ctx, d))
	if fakes[IPv4].Restores != 2 || fakes[IPv6].Restores != 1 {
		t.Errorf("restores = %d/%d, want 2/1", fakes[IPv4].Restores, fakes[IPv6].Restores)
	}
	if got := ipTrace(fakes[IPv4], pod4, ext4, annotations.TCP, 8080); !got.leaves(pod4) {
		t.Errorf("after ports filter, TCP packet %s", got)
	}

	// Everything removed: chains stay, empty, and hooked.
	noFail(t)(m.Apply(ctx, model.Datapath{}))
	for _, f := range Families {
		if rules := fakes[f].List("nat", Chain); len(rules) != 1 || !strings.Contains(rules[0], steeredComment) {
			t.Errorf("%s: stale rules %v", f, rules)
		}
		hookFirst(t, fakes[f])
	}
	if got := ct.pods(netlink.FAMILY_V6); !slices.Equal(got, []netip.Addr{pod6, pod6}) {
		t.Errorf("IPv6 flushes %v, want pod added then removed", got)
	}
}

func TestApplyRepairsHook(t *testing.T) {
	masq := []string{"-s", "10.244.0.0/16", "!", "-d", "10.244.0.0/16", "-j", "MASQUERADE"}
	hook := splitWords(natHookSpec())
	tests := []struct {
		name    string
		breakIt func(t *testing.T, f *Fake)
	}{
		{"rule inserted before the hook", func(t *testing.T, f *Fake) {
			must(t, f.Insert("nat", "POSTROUTING", 1, masq...))
		}},
		{"hook deleted", func(t *testing.T, f *Fake) {
			must(t, f.DeleteAt("nat", "POSTROUTING", 1))
		}},
		{"hook deleted and chain gone", func(t *testing.T, f *Fake) {
			must(t, f.DeleteAt("nat", "POSTROUTING", 1))
			must(t, f.DeleteChain("nat", Chain))
		}},
		{"hook duplicated behind a foreign rule", func(t *testing.T, f *Fake) {
			must(t, f.Insert("nat", "POSTROUTING", 1, masq...))
			must(t, f.Append("nat", "POSTROUTING", hook...))
		}},
		{"raw hook behind a foreign rule", func(t *testing.T, f *Fake) {
			must(t, f.Insert("raw", "PREROUTING", 1, "-j", "ACCEPT"))
		}},
		{"mangle hook deleted", func(t *testing.T, f *Fake) {
			must(t, f.DeleteAt("mangle", "PREROUTING", 1))
		}},
		{"an old hook of ours left in FORWARD", func(t *testing.T, f *Fake) {
			must(t, f.Restore(t.Context(), []byte("*mangle\n:EGRESSVIP-FWD - [0:0]\n-A FORWARD -j EGRESSVIP-FWD\nCOMMIT\n")))
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fakes := iptFakes()
			must(t, fakes[IPv4].Append("nat", "POSTROUTING", "-m", "comment", "--comment", "foreign", "-j", "RETURN"))
			m := newFakeManager(t, fakes, nil)
			noFail(t)(m.Apply(t.Context(), dualStack()))
			tc.breakIt(t, fakes[IPv4])
			noFail(t)(m.Apply(t.Context(), dualStack()))
			hookFirst(t, fakes[IPv4])
			if got := ipTrace(fakes[IPv4], pod4, ext4, annotations.UDP, 5060); !got.leaves(lb4) {
				t.Errorf("packet %s", got)
			}
			if rules := fakes[IPv4].List("nat", "POSTROUTING"); !slices.ContainsFunc(rules, func(r string) bool { return strings.Contains(r, "foreign") }) {
				t.Errorf("foreign rule lost: %v", rules)
			}
			if slices.Contains(fakes[IPv4].Chains("mangle"), ChainFwd) || len(fakes[IPv4].List("mangle", "FORWARD")) != 0 {
				t.Errorf("a chain of ours without a tunnel device left:\n%s", fakes[IPv4].Dump())
			}
		})
	}
}

func TestApplySeedsFromExistingChain(t *testing.T) {
	fakes := iptFakes()
	first := newFakeManager(t, fakes, nil)
	noFail(t)(first.Apply(t.Context(), dualStack(udp5060)))

	t.Run("restart with unchanged rules writes and flushes nothing", func(t *testing.T) {
		ct := &fakeConntrack{}
		m := newFakeManager(t, fakes, ct)
		noFail(t)(m.Apply(t.Context(), dualStack(udp5060)))
		for _, f := range Families {
			if fakes[f].Restores != 1 {
				t.Errorf("%s: restart rewrote the chains (%d restores)", f, fakes[f].Restores)
			}
		}
		if len(ct.calls) != 0 {
			t.Errorf("restart flushed conntrack: %v", ct.calls)
		}
	})
	t.Run("restart with changed ports flushes old and new port", func(t *testing.T) {
		ct := &fakeConntrack{}
		m := newFakeManager(t, fakes, ct)
		noFail(t)(m.Apply(t.Context(), dualStack(tcp8080)))
		calls := ct.calls[netlink.FAMILY_V4]
		if len(calls) != 1 || len(calls[0]) != 1 || !slices.Equal(calls[0][0].ports, []annotations.DestinationPort{tcp8080, udp5060}) {
			t.Errorf("IPv4 flushes %+v, want pod %s on tcp:8080 and udp:5060", calls, pod4)
		}
	})
	t.Run("a chain edited by someone else is rewritten", func(t *testing.T) {
		must(t, fakes[IPv4].Append("nat", Chain, "-s", "10.244.9.9/32", "-j", "ACCEPT"))
		before := fakes[IPv4].Restores
		m := newFakeManager(t, fakes, nil)
		noFail(t)(m.Apply(t.Context(), dualStack(tcp8080)))
		if fakes[IPv4].Restores != before+1 {
			t.Errorf("edited chain not rewritten")
		}
		if rules := fakes[IPv4].List("nat", Chain); slices.ContainsFunc(rules, func(r string) bool { return strings.Contains(r, "10.244.9.9") }) {
			t.Errorf("foreign rule in our chain survived: %v", rules)
		}
	})
}

func TestApplyErrors(t *testing.T) {
	t.Run("restore error is wrapped and retried", func(t *testing.T) {
		fakes := iptFakes()
		ct := &fakeConntrack{}
		m := newFakeManager(t, fakes, ct)
		stderr := errors.New("iptables-restore: line 3 failed")
		fakes[IPv4].RestoreErr = stderr
		failed, err := m.Apply(t.Context(), dualStack())
		if err != nil || !errors.Is(failed["default/sip"], stderr) || !strings.Contains(failed["default/sip"].Error(), "IPv4") {
			t.Fatalf("Apply = %v, %v; want default/sip failed in IPv4", failed, err)
		}
		if len(ct.pods(netlink.FAMILY_V4)) != 0 {
			t.Error("conntrack flushed although the rules were not written")
		}
		if fakes[IPv6].Restores != 1 {
			t.Error("IPv6 not written because IPv4 failed")
		}
		fakes[IPv4].RestoreErr = nil
		noFail(t)(m.Apply(t.Context(), dualStack()))
		if fakes[IPv4].Restores != 1 || len(ct.pods(netlink.FAMILY_V4)) != 1 {
			t.Errorf("retry: %d restores, flushed %v", fakes[IPv4].Restores, ct.pods(netlink.FAMILY_V4))
		}
	})
	t.Run("conntrack error fails the Service and is retried on the next sync", func(t *testing.T) {
		fakes := iptFakes()
		ct := &fakeConntrack{err: errors.New("netlink: permission denied")}
		m := newFakeManager(t, fakes, ct)
		failed, err := m.Apply(t.Context(), dualStack())
		if err != nil || failed["default/sip"] == nil || !strings.Contains(failed["default/sip"].Error(), "permission denied") {
			t.Fatalf("Apply = %v, %v", failed, err)
		}
		ct.err = nil
		noFail(t)(m.Apply(t.Context(), dualStack()))
		if got := ct.pods(netlink.FAMILY_V4); len(got) != 2 {
			t.Errorf("flush not retried: %v", got)
		}
		if fakes[IPv4].Restores != 1 {
			t.Errorf("unchanged payload rewritten on retry")
		}
	})
}

func TestCleanup(t *testing.T) {
	fakes := iptFakes()
	for _, f := range fakes {
		must(t, f.Append("nat", "POSTROUTING", "-j", "MASQUERADE"))
		must(t, f.Append("nat", "POSTROUTING", "-m", "comment", "--comment", "someone-else", "-j", "RETURN"))
		must(t, f.Append("mangle", "PREROUTING", "-m", "comment", "--comment", "someone-else", "-j", "RETURN"))
	}
	before := [2]string{fakes[0].Dump(), fakes[1].Dump()}
	m := newFakeManager(t, fakes, nil)
	d := dualStack()
	d.SNAT = append(d.SNAT, model.SNATRule{Service: "f/f", Pod: podF, Source: lb4, Filter: model.Filter{Allow: prefixes("198.51.100.0/24")}})
	d.Steer = []model.SteerRule{{Service: "s/s", Pod: pod4b, Filter: model.Filter{Deny: prefixes("198.51.100.9/32")}}}
	d.Gate = &model.Gate{PodCIDRs: []netip.Prefix{podNet4}}
	noFail(t)(m.Apply(t.Context(), d))
	if got, err := m.Services(t.Context()); err != nil || !slices.Equal(got, []string{"default/sip", "f/f", "s/s"}) {
		t.Errorf("Services = %v, %v", got, err)
	}
	must(t, m.Cleanup())
	for _, f := range Families {
		got := fakes[f].Dump()
		// Tables egressvip created stay, empty, as in the kernel.
		for _, tbl := range []string{"raw", "mangle", "nat"} {
			for _, c := range fakes[f].Chains(tbl) {
				if strings.HasPrefix(c, ChainPrefix) {
					t.Errorf("%s: %s chain %s left:\n%s", f, tbl, c, got)
				}
			}
		}
		if !strings.Contains(got, before[f][strings.Index(before[f], "-A"):strings.Index(before[f], "COMMIT")]) {
			t.Errorf("%s after Cleanup:\n%s\nwant the foreign rules of:\n%s", f, got, before[f])
		}
	}
	if got, _ := m.Services(t.Context()); len(got) != 0 {
		t.Errorf("Services after Cleanup = %v", got)
	}
	// Cleanup of nothing is fine; Apply afterwards starts again.
	must(t, m.Cleanup())
	noFail(t)(m.Apply(t.Context(), dualStack()))
	hookFirst(t, fakes[IPv4])
}

func TestNewMissingBinary(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	for _, tc := range []struct {
		name     string
		nft      bool
		contains string
	}{
		{"legacy", false, "iptables-legacy"},
		{"nft", true, "iptables-nft"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(Config{NFTables: tc.nft})
			if err == nil || !strings.Contains(err.Error(), tc.contains) || !strings.Contains(err.Error(), "egress_withnftables") {
				t.Errorf("New error = %v, want it to name %s and egress_withnftables", err, tc.contains)
			}
		})
	}
}

func TestRecheckRepairsAFlushedChain(t *testing.T) {
	fakes := iptFakes()
	m := newFakeManager(t, fakes, nil)
	ctx := t.Context()
	noFail(t)(m.Apply(ctx, dualStack()))

	// Someone flushes our chain but leaves the hook; an Apply that is
	// told nothing trusts its last write.
	must(t, fakes[IPv4].Flush("nat", Chain))
	if got := ipTrace(fakes[IPv4], pod4, ext4, annotations.UDP, 5060); got.leaves(lb4) {
		t.Fatal("test setup: the flush did not take")
	}
	m.Recheck()
	noFail(t)(m.Apply(ctx, dualStack()))
	if got := ipTrace(fakes[IPv4], pod4, ext4, annotations.UDP, 5060); !got.leaves(lb4) {
		t.Fatalf("after Recheck, packet %s", got)
	}
	if fakes[IPv6].Restores != 1 {
		t.Fatalf("Recheck rewrote the unchanged IPv6 chains (%d restores)", fakes[IPv6].Restores)
	}
}

func TestApplyIgnoresAnUnusableFamilyWithoutRules(t *testing.T) {
	fakes := iptFakes()
	fakes[IPv6].RestoreErr = errors.New("ip6tables-restore: can't initialize ip6tables table `nat'")
	m := newFakeManager(t, fakes, nil)
	ctx := t.Context()

	ipv4Only := dualStack()
	ipv4Only.SNAT = ipv4Only.SNAT[:1]
	noFail(t)(m.Apply(ctx, ipv4Only))
	if got := ipTrace(fakes[IPv4], pod4, ext4, annotations.UDP, 5060); !got.leaves(lb4) {
		t.Fatalf("IPv4 packet %s", got)
	}
	if ok, err := m.Check(ctx); !ok || err != nil {
		t.Fatalf("Check = %v, %v; the unusable family is not checked", ok, err)
	}
	failed, err := m.Apply(ctx, dualStack())
	if err != nil || failed["default/sip"] == nil || !strings.Contains(failed["default/sip"].Error(), "IPv6") {
		t.Fatalf("an IPv6 rule that cannot be written must fail its Service, got %v, %v", failed, err)
	}
}

// racingRunner inserts a foreign rule at position 1 of nat POSTROUTING
// right after the Manager read the tables, before its restore: a CNI
// writing at the same moment.
type racingRunner struct {
	*Fake
	race func()
}

func (r *racingRunner) Save(ctx context.Context) ([]byte, error) {
	out, err := r.Fake.Save(ctx)
	if r.race != nil {
		r.race()
		r.race = nil
	}
	return out, err
}

// TestApplyRepairsHookBySpec: the hook is repaired by rule spec in the
// restore, never by a position read before it, so a rule a CNI inserts in
// between is kept and one hook is left, first.
func TestApplyRepairsHookBySpec(t *testing.T) {
	masqA := []string{"-s", "10.244.0.0/16", "-m", "comment", "--comment", "cni-a", "-j", "MASQUERADE"}
	masqB := []string{"-s", "10.244.0.0/16", "-m", "comment", "--comment", "cni-b", "-j", "MASQUERADE"}
	fake := NewFake()
	racer := &racingRunner{Fake: fake}
	m, err := New(Config{Log: testLog(t), Runners: [2]Runner{racer, NewFake()}, Conntrack: &fakeConntrack{}})
	must(t, err)
	ctx := t.Context()
	noFail(t)(m.Apply(ctx, dualStack()))
	must(t, fake.Insert("nat", "POSTROUTING", 1, masqA...)) // our hook is now second
	racer.race = func() { must(t, fake.Insert("nat", "POSTROUTING", 1, masqB...)) }
	m.Recheck()
	noFail(t)(m.Apply(ctx, dualStack()))
	hookFirst(t, fake)
	rules := fake.List("nat", "POSTROUTING")
	for _, c := range []string{"cni-a", "cni-b"} {
		if !slices.ContainsFunc(rules, func(r string) bool { return strings.Contains(r, c) }) {
			t.Errorf("rule %s lost by the hook repair:\n%s", c, strings.Join(rules, "\n"))
		}
	}
	if len(rules) != 3 {
		t.Errorf("want hook, cni-b, cni-a:\n%s", strings.Join(rules, "\n"))
	}
	if got := ipTrace(fake, pod4, ext4, annotations.UDP, 5060); !got.leaves(lb4) {
		t.Errorf("packet %s", got)
	}
}

func TestCheckIPTables(t *testing.T) {
	masq := []string{"-s", "10.244.0.0/16", "!", "-d", "10.244.0.0/16", "-j", "MASQUERADE"}
	tests := []struct {
		name    string
		breakIt func(t *testing.T, f *Fake)
	}{
		{"MASQUERADE inserted before the hook", func(t *testing.T, f *Fake) {
			must(t, f.Insert("nat", "POSTROUTING", 1, masq...))
		}},
		{"hook deleted", func(t *testing.T, f *Fake) { must(t, f.DeleteAt("nat", "POSTROUTING", 1)) }},
		{"hook duplicated", func(t *testing.T, f *Fake) {
			must(t, f.Append("nat", "POSTROUTING", splitWords(natHookSpec())...))
		}},
		{"hook and chain deleted", func(t *testing.T, f *Fake) {
			must(t, f.DeleteAt("nat", "POSTROUTING", 1))
			must(t, f.DeleteChain("nat", Chain))
		}},
		{"chain flushed", func(t *testing.T, f *Fake) { must(t, f.Flush("nat", Chain)) }},
		{"a rule deleted", func(t *testing.T, f *Fake) { must(t, f.DeleteAt("nat", Chain, 2)) }},
		{"last rule changed", func(t *testing.T, f *Fake) {
			rules := f.List("nat", Chain)
			must(t, f.DeleteAt("nat", Chain, len(rules)))
			must(t, f.Append("nat", Chain, "-s", "10.244.1.5/32", "-j", "SNAT", "--to-source", "203.0.113.99"))
		}},
		{"anti-spoofing chain flushed", func(t *testing.T, f *Fake) { must(t, f.Flush("raw", ChainRaw)) }},
		{"mangle hook behind a new rule", func(t *testing.T, f *Fake) {
			must(t, f.Insert("mangle", "PREROUTING", 1, "-j", "RETURN"))
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fakes := iptFakes()
			m := newFakeManager(t, fakes, nil)
			ctx := t.Context()
			if ok, err := m.Check(ctx); !ok || err != nil {
				t.Fatalf("Check before any Apply = %v, %v; want true (nothing written)", ok, err)
			}
			noFail(t)(m.Apply(ctx, dualStack(udp5060)))
			if ok, err := m.Check(ctx); !ok || err != nil {
				t.Fatalf("Check after Apply = %v, %v", ok, err)
			}
			tc.breakIt(t, fakes[IPv4])
			if ok, _ := m.Check(ctx); ok {
				t.Fatalf("Check did not notice")
			}
			m.Recheck()
			noFail(t)(m.Apply(ctx, dualStack(udp5060)))
			if ok, err := m.Check(ctx); !ok || err != nil {
				t.Fatalf("Check after repair = %v, %v", ok, err)
			}
			hookFirst(t, fakes[IPv4])
			if got := ipTrace(fakes[IPv4], pod4, ext4, annotations.UDP, 5060); !got.leaves(lb4) {
				t.Errorf("after repair, packet %s", got)
			}
		})
	}
}

// TestIPTablesFence: the iptables backends keep the fence in an nftables
// table of their own; Check covers it, Cleanup removes it.
func TestIPTablesFence(t *testing.T) {
	n := newNode(t, BackendIPTablesLegacy, Config{})
	n.apply(t, dualStack())
	p := udpPkt(pod4, ext4, 53)
	p.local = []netip.Addr{node4}
	if got := n.trace(p); !got.dropped || !strings.Contains(got.rule, "fib saddr type != local") {
		t.Errorf("SNAT to an address the node does not hold: %s", got)
	}
	p.local = append(p.local, lb4)
	if got := n.trace(p); !got.leaves(lb4) {
		t.Errorf("SNAT to an address the node holds: %s", got)
	}
	if ok, err := n.m.Check(t.Context()); !ok || err != nil {
		t.Fatalf("Check = %v, %v", ok, err)
	}
	foreignRun(t, n.nft[IPv4], func(tx *knftables.Transaction) { tx.Flush(&knftables.Chain{Name: nftFence}) })
	if ok, _ := n.m.Check(t.Context()); ok {
		t.Error("Check did not notice the fence flushed")
	}
	must(t, n.m.Cleanup())
	for _, f := range n.nft {
		f.RLock()
		if f.Table != nil {
			t.Errorf("%s: fence table left", f.family)
		}
		f.RUnlock()
	}
}

// TestRepairSweepsMistranslatedEntries: after Check found the rules
// changed by someone else, the Apply that repairs them deletes the
// entries set up meanwhile with another translation, once; an Apply
// without a failed Check does not.
func TestRepairSweepsMistranslatedEntries(t *testing.T) {
	fakes, ct := iptFakes(), &fakeConntrack{}
	m := newFakeManager(t, fakes, ct)
	ctx := t.Context()
	d := dualStack()
	noFail(t)(m.Apply(ctx, d))
	if ok, err := m.Check(ctx); !ok || err != nil {
		t.Fatalf("Check after Apply = %v, %v", ok, err)
	}
	m.Recheck()
	noFail(t)(m.Apply(ctx, d))
	if len(ct.sweeps[netlink.FAMILY_V4]) != 0 {
		t.Fatalf("swept without a failed Check: %v", ct.sweeps)
	}
	must(t, fakes[IPv4].Insert("nat", "POSTROUTING", 1, "-s", "10.244.0.0/16", "-j", "MASQUERADE"))
	if ok, _ := m.Check(ctx); ok {
		t.Fatal("Check did not notice the MASQUERADE inserted first")
	}
	m.Recheck()
	noFail(t)(m.Apply(ctx, d))
	sw := ct.sweeps[netlink.FAMILY_V4]
	if len(sw) != 1 {
		t.Fatalf("sweeps after the repair = %d, want 1", len(sw))
	}
	if cs := sw[0].clauses[pod4]; len(cs) != 1 || cs[0].source != lb4 {
		t.Errorf("sweep clauses of %s = %+v", pod4, cs)
	}
	if !sw[0].MatchConntrackFlow(snatFlow(pod4, ext4, netip.MustParseAddr("203.0.113.1"), 17, 5060)) {
		t.Error("the sweep does not select a MASQUERADEd entry of the pod")
	}
	noFail(t)(m.Apply(ctx, d))
	if len(ct.sweeps[netlink.FAMILY_V4]) != 1 {
		t.Errorf("swept again without a failed Check")
	}

	// A failed sweep is retried by the next Apply.
	must(t, fakes[IPv4].Insert("nat", "POSTROUTING", 1, "-s", "10.244.0.0/16", "-j", "MASQUERADE"))
	if ok, _ := m.Check(ctx); ok {
		t.Fatal("Check did not notice the second MASQUERADE")
	}
	m.Recheck()
	ct.err = errors.New("netlink: no buffer space")
	_, _ = m.Apply(ctx, d)
	ct.err = nil
	before := len(ct.sweeps[netlink.FAMILY_V4])
	noFail(t)(m.Apply(ctx, d))
	if got := len(ct.sweeps[netlink.FAMILY_V4]); got != before+1 {
		t.Errorf("failed sweep not retried: %d sweeps, want %d", got, before+1)
	}
}

// kube-vip.io/flush-conntrack: "false": a change of the pod's translation,
// or its rule going away, deletes none of its entries, and a repair does
// not sweep them; other pods' entries go as usual.
func TestKeepConntrack(t *testing.T) {
	ct := &fakeConntrack{}
	m := newFakeManager(t, iptFakes(), ct)
	ctx := t.Context()
	rules := func(kept, other netip.Addr) model.Datapath {
		return model.Datapath{SNAT: []model.SNATRule{
			{Service: "a/kept", Pod: pod4, Source: kept, KeepConntrack: true},
			{Service: "b/flushed", Pod: pod4b, Source: other},
		}, Exclude: []netip.Prefix{podNet4}}
	}
	noFail(t)(m.Apply(ctx, rules(lb4, lb4)))
	ct.calls = nil
	noFail(t)(m.Apply(ctx, rules(lb4b, lb4b)))
	if got := ct.pods(netlink.FAMILY_V4); !slices.Equal(got, []netip.Addr{pod4b}) {
		t.Errorf("flushed %v after both sources changed, want only %s", got, pod4b)
	}
	ct.calls = nil
	noFail(t)(m.Apply(ctx, model.Datapath{Exclude: []netip.Prefix{podNet4}}))
	if got := ct.pods(netlink.FAMILY_V4); !slices.Equal(got, []netip.Addr{pod4b}) {
		t.Errorf("flushed %v after both rules went, want only %s", got, pod4b)
	}
	noFail(t)(m.Apply(ctx, rules(lb4, lb4)))
	m.state[IPv4].sweep = true
	noFail(t)(m.Apply(ctx, rules(lb4, lb4)))
	sw := ct.sweeps[netlink.FAMILY_V4]
	if len(sw) != 1 || len(sw[0].clauses[pod4]) != 0 || len(sw[0].clauses[pod4b]) != 1 {
		t.Errorf("sweeps %+v: want one, of %s only", sw, pod4b)
	}
}
