package snat

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/sirupsen/logrus"
	"github.com/vishvananda/netlink"
)

// fakeConntrack records the filters of each delete call.
type fakeConntrack struct {
	mu    sync.Mutex
	calls map[netlink.InetFamily][][]Flush
	err   error
}

func (f *fakeConntrack) ConntrackDeleteFilters(_ netlink.ConntrackTableType, fam netlink.InetFamily, filters ...netlink.CustomConntrackFilter) (uint, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.calls == nil {
		f.calls = map[netlink.InetFamily][][]Flush{}
	}
	var fl []Flush
	for _, x := range filters {
		fl = append(fl, x.(Flush))
	}
	f.calls[fam] = append(f.calls[fam], fl)
	return uint(len(filters)), f.err
}

// pods returns the pods flushed in all calls for a family.
func (f *fakeConntrack) pods(fam netlink.InetFamily) []netip.Addr {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []netip.Addr
	for _, c := range f.calls[fam] {
		for _, fl := range c {
			out = append(out, fl.PodIP)
		}
	}
	return out
}

func newFakeManager(t *testing.T, fakes [2]*Fake, ct Conntrack) *Manager {
	t.Helper()
	if ct == nil {
		ct = &fakeConntrack{}
	}
	log := logrus.New()
	log.SetOutput(t.Output())
	log.SetLevel(logrus.DebugLevel)
	m, err := New(Config{Log: logrus.NewEntry(log), Runners: [2]Runner{fakes[IPv4], fakes[IPv6]}, Conntrack: ct})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func dualStack(ports ...annotations.DestinationPort) Desired {
	return Desired{
		Rules: []Rule{
			{Service: "default/sip", PodIP: pod4, SourceIP: lb4, Ports: ports},
			{Service: "default/sip", PodIP: pod6, SourceIP: lb6, Ports: ports},
		},
		Exclude: []netip.Prefix{podNet4, svcNet4, podNet6},
	}
}

// hookFirst asserts that nat POSTROUTING starts with our only hook.
func hookFirst(t *testing.T, f *Fake) {
	t.Helper()
	rules, _ := f.List("POSTROUTING")
	var hooks []int
	for i, r := range rules {
		if strings.Contains(r, "-j "+Chain) {
			hooks = append(hooks, i+1)
		}
	}
	if !slices.Equal(hooks, []int{1}) {
		t.Errorf("want exactly one hook at position 1, POSTROUTING:\n%s", strings.Join(rules, "\n"))
	}
}

func TestApplyWritesOncePerChange(t *testing.T) {
	fakes := [2]*Fake{NewFake(), NewFake()}
	ct := &fakeConntrack{}
	m := newFakeManager(t, fakes, ct)
	ctx := t.Context()

	must(t, m.Apply(ctx, dualStack()))
	for _, f := range Families {
		if fakes[f].Restores != 1 {
			t.Errorf("%s: %d restores after first Apply, want 1", f, fakes[f].Restores)
		}
		hookFirst(t, fakes[f])
	}
	if got := fakes[IPv4].Trace(pod4, ext4, annotations.UDP, 5060); got.Source != lb4 {
		t.Errorf("IPv4 packet %s", got)
	}
	if got := fakes[IPv6].Trace(pod6, ext6, annotations.UDP, 5060); got.Source != lb6 {
		t.Errorf("IPv6 packet %s", got)
	}
	if got := ct.pods(netlink.FAMILY_V4); !slices.Equal(got, []netip.Addr{pod4}) {
		t.Errorf("new rule flushed IPv4 pods %v, want %v", got, pod4)
	}

	// Same state: no write, no flush.
	must(t, m.Apply(ctx, dualStack()))
	for _, f := range Families {
		if fakes[f].Restores != 1 {
			t.Errorf("%s: unchanged Apply wrote (%d restores)", f, fakes[f].Restores)
		}
	}
	if n := len(ct.pods(netlink.FAMILY_V4)); n != 1 {
		t.Errorf("unchanged Apply flushed conntrack (%d pods in total)", n)
	}

	// Only IPv4 changes: only IPv4 is written.
	d := dualStack()
	d.Rules[0].Ports = []annotations.DestinationPort{udp5060}
	must(t, m.Apply(ctx, d))
	if fakes[IPv4].Restores != 2 || fakes[IPv6].Restores != 1 {
		t.Errorf("restores = %d/%d, want 2/1", fakes[IPv4].Restores, fakes[IPv6].Restores)
	}
	if got := fakes[IPv4].Trace(pod4, ext4, annotations.TCP, 8080); got.Source != pod4 {
		t.Errorf("after ports filter, TCP packet %s", got)
	}

	// Everything removed: chains stay, empty, and hooked.
	must(t, m.Apply(ctx, Desired{}))
	for _, f := range Families {
		if rules, _ := fakes[f].List(Chain); len(rules) != 0 {
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
	tests := []struct {
		name    string
		breakIt func(t *testing.T, f *Fake)
	}{
		{"rule inserted before the hook", func(t *testing.T, f *Fake) {
			must(t, f.Insert("POSTROUTING", 1, masq...))
		}},
		{"hook deleted", func(t *testing.T, f *Fake) {
			must(t, f.DeleteAt("POSTROUTING", 1))
		}},
		{"hook deleted and chain gone", func(t *testing.T, f *Fake) {
			must(t, f.DeleteAt("POSTROUTING", 1))
			must(t, f.DeleteChain(Chain))
		}},
		{"hook duplicated behind a foreign rule", func(t *testing.T, f *Fake) {
			must(t, f.Insert("POSTROUTING", 1, masq...))
			must(t, f.Append("POSTROUTING", hookSpec...))
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fakes := [2]*Fake{NewFake(), NewFake()}
			must(t, fakes[IPv4].Append("POSTROUTING", "-m", "comment", "--comment", "foreign", "-j", "RETURN"))
			m := newFakeManager(t, fakes, nil)
			must(t, m.Apply(t.Context(), dualStack()))
			tc.breakIt(t, fakes[IPv4])
			must(t, m.Apply(t.Context(), dualStack()))
			hookFirst(t, fakes[IPv4])
			if got := fakes[IPv4].Trace(pod4, ext4, annotations.UDP, 5060); got.Source != lb4 {
				t.Errorf("packet %s", got)
			}
			if rules, _ := fakes[IPv4].List("POSTROUTING"); !slices.ContainsFunc(rules, func(r string) bool { return strings.Contains(r, "foreign") }) {
				t.Errorf("foreign rule lost: %v", rules)
			}
		})
	}
}

func TestApplySeedsFromExistingChain(t *testing.T) {
	fakes := [2]*Fake{NewFake(), NewFake()}
	first := newFakeManager(t, fakes, nil)
	must(t, first.Apply(t.Context(), dualStack(udp5060)))

	t.Run("restart with unchanged rules writes and flushes nothing", func(t *testing.T) {
		ct := &fakeConntrack{}
		m := newFakeManager(t, fakes, ct)
		must(t, m.Apply(t.Context(), dualStack(udp5060)))
		for _, f := range Families {
			if fakes[f].Restores != 1 {
				t.Errorf("%s: restart rewrote the chain (%d restores)", f, fakes[f].Restores)
			}
		}
		if len(ct.calls) != 0 {
			t.Errorf("restart flushed conntrack: %v", ct.calls)
		}
	})
	t.Run("restart with changed ports flushes old and new port", func(t *testing.T) {
		ct := &fakeConntrack{}
		m := newFakeManager(t, fakes, ct)
		must(t, m.Apply(t.Context(), dualStack(tcp8080)))
		calls := ct.calls[netlink.FAMILY_V4]
		if len(calls) != 1 || len(calls[0]) != 1 || !slices.Equal(calls[0][0].Ports, []annotations.DestinationPort{tcp8080, udp5060}) {
			t.Errorf("IPv4 flushes %+v, want pod %s on tcp:8080 and udp:5060", calls, pod4)
		}
	})
	t.Run("a chain edited by someone else is rewritten", func(t *testing.T) {
		must(t, fakes[IPv4].Append(Chain, "-s", "10.244.9.9/32", "-j", "ACCEPT"))
		before := fakes[IPv4].Restores
		m := newFakeManager(t, fakes, nil)
		must(t, m.Apply(t.Context(), dualStack(tcp8080)))
		if fakes[IPv4].Restores != before+1 {
			t.Errorf("edited chain not rewritten")
		}
		if rules, _ := fakes[IPv4].List(Chain); slices.ContainsFunc(rules, func(r string) bool { return strings.Contains(r, "10.244.9.9") }) {
			t.Errorf("foreign rule in our chain survived: %v", rules)
		}
	})
}

func TestApplyErrors(t *testing.T) {
	t.Run("restore error is wrapped and retried", func(t *testing.T) {
		fakes := [2]*Fake{NewFake(), NewFake()}
		ct := &fakeConntrack{}
		m := newFakeManager(t, fakes, ct)
		stderr := errors.New("iptables-restore: line 3 failed")
		fakes[IPv4].RestoreErr = stderr
		err := m.Apply(t.Context(), dualStack())
		if !errors.Is(err, stderr) || !strings.Contains(err.Error(), "line 3 failed") || !strings.Contains(err.Error(), "IPv4") {
			t.Fatalf("Apply error = %v", err)
		}
		if len(ct.pods(netlink.FAMILY_V4)) != 0 {
			t.Error("conntrack flushed although the rules were not written")
		}
		if fakes[IPv6].Restores != 1 {
			t.Error("IPv6 not written because IPv4 failed")
		}
		fakes[IPv4].RestoreErr = nil
		must(t, m.Apply(t.Context(), dualStack()))
		if fakes[IPv4].Restores != 1 || len(ct.pods(netlink.FAMILY_V4)) != 1 {
			t.Errorf("retry: %d restores, flushed %v", fakes[IPv4].Restores, ct.pods(netlink.FAMILY_V4))
		}
	})
	t.Run("conntrack error is retried on the next sync", func(t *testing.T) {
		fakes := [2]*Fake{NewFake(), NewFake()}
		ct := &fakeConntrack{err: errors.New("netlink: permission denied")}
		m := newFakeManager(t, fakes, ct)
		if err := m.Apply(t.Context(), dualStack()); err == nil || !strings.Contains(err.Error(), "permission denied") {
			t.Fatalf("Apply error = %v", err)
		}
		ct.err = nil
		must(t, m.Apply(t.Context(), dualStack()))
		if got := ct.pods(netlink.FAMILY_V4); len(got) != 2 {
			t.Errorf("flush not retried: %v", got)
		}
		if fakes[IPv4].Restores != 1 {
			t.Errorf("unchanged payload rewritten on retry")
		}
	})
}

func TestCleanup(t *testing.T) {
	fakes := [2]*Fake{NewFake(), NewFake()}
	for _, f := range fakes {
		must(t, f.Append("POSTROUTING", "-j", "MASQUERADE"))
		must(t, f.Append("POSTROUTING", "-m", "comment", "--comment", "someone-else", "-j", "RETURN"))
	}
	before := [2]string{string(fakes[0].Table().Save()), string(fakes[1].Table().Save())}
	m := newFakeManager(t, fakes, nil)
	must(t, m.Apply(t.Context(), dualStack()))
	if got, err := m.Services(t.Context()); err != nil || !slices.Equal(got, []string{"default/sip"}) {
		t.Errorf("Services = %v, %v", got, err)
	}
	must(t, m.Cleanup())
	for _, f := range Families {
		if got := string(fakes[f].Table().Save()); got != before[f] {
			t.Errorf("%s after Cleanup:\n%s\nwant:\n%s", f, got, before[f])
		}
	}
	if got, _ := m.Services(t.Context()); len(got) != 0 {
		t.Errorf("Services after Cleanup = %v", got)
	}
	// Cleanup of nothing is fine; Apply afterwards starts again.
	must(t, m.Cleanup())
	must(t, m.Apply(t.Context(), dualStack()))
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
	fakes := [2]*Fake{NewFake(), NewFake()}
	m := newFakeManager(t, fakes, nil)
	ctx := t.Context()
	must(t, m.Apply(ctx, dualStack()))

	// Someone flushes our chain but leaves the hook.
	for {
		rules, _ := fakes[IPv4].List(Chain)
		if len(rules) == 0 {
			break
		}
		must(t, fakes[IPv4].DeleteAt(Chain, 1))
	}
	must(t, m.Apply(ctx, dualStack()))
	if got := fakes[IPv4].Trace(pod4, ext4, annotations.UDP, 5060); got.Source == lb4 {
		t.Fatal("test setup: the flush did not take")
	}

	m.Recheck()
	must(t, m.Apply(ctx, dualStack()))
	if got := fakes[IPv4].Trace(pod4, ext4, annotations.UDP, 5060); got.Source != lb4 {
		t.Fatalf("after Recheck, packet %s", got)
	}
	if fakes[IPv6].Restores != 1 {
		t.Fatalf("Recheck rewrote the unchanged IPv6 chain (%d restores)", fakes[IPv6].Restores)
	}
}

func TestApplyIgnoresAnUnusableFamilyWithoutRules(t *testing.T) {
	fakes := [2]*Fake{NewFake(), NewFake()}
	fakes[IPv6].RestoreErr = errors.New("ip6tables-restore: can't initialize ip6tables table `nat'")
	m := newFakeManager(t, fakes, nil)
	ctx := t.Context()

	ipv4Only := dualStack()
	ipv4Only.Rules = ipv4Only.Rules[:1]
	if err := m.Apply(ctx, ipv4Only); err != nil {
		t.Fatalf("IPv4-only rules on a node without IPv6 NAT: %v", err)
	}
	if got := fakes[IPv4].Trace(pod4, ext4, annotations.UDP, 5060); got.Source != lb4 {
		t.Fatalf("IPv4 packet %s", got)
	}
	if err := m.Apply(ctx, dualStack()); err == nil || !strings.Contains(err.Error(), "IPv6") {
		t.Fatalf("an IPv6 rule that cannot be written must fail, got %v", err)
	}
}

// racingRunner inserts a foreign rule at position 1 of nat POSTROUTING
// right after the Manager listed it, before its restore: a CNI writing at
// the same moment.
type racingRunner struct {
	*Fake
	race func()
}

func (r *racingRunner) List(chain string) ([]string, error) {
	rules, err := r.Fake.List(chain)
	if chain == hookChain && r.race != nil {
		r.race()
		r.race = nil
	}
	return rules, err
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
	must(t, m.Apply(ctx, dualStack()))
	must(t, fake.Insert("POSTROUTING", 1, masqA...)) // our hook is now second
	racer.race = func() { must(t, fake.Insert("POSTROUTING", 1, masqB...)) }
	must(t, m.Apply(ctx, dualStack()))
	hookFirst(t, fake)
	rules, _ := fake.List("POSTROUTING")
	for _, c := range []string{"cni-a", "cni-b"} {
		if !slices.ContainsFunc(rules, func(r string) bool { return strings.Contains(r, c) }) {
			t.Errorf("rule %s lost by the hook repair:\n%s", c, strings.Join(rules, "\n"))
		}
	}
	if len(rules) != 3 {
		t.Errorf("want hook, cni-b, cni-a:\n%s", strings.Join(rules, "\n"))
	}
	if got := fake.Trace(pod4, ext4, annotations.UDP, 5060); got.Source != lb4 {
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
			must(t, f.Insert("POSTROUTING", 1, masq...))
		}},
		{"hook deleted", func(t *testing.T, f *Fake) { must(t, f.DeleteAt("POSTROUTING", 1)) }},
		{"hook duplicated", func(t *testing.T, f *Fake) { must(t, f.Append("POSTROUTING", hookSpec...)) }},
		{"hook and chain deleted", func(t *testing.T, f *Fake) {
			must(t, f.DeleteAt("POSTROUTING", 1))
			must(t, f.DeleteChain(Chain))
		}},
		{"chain flushed", func(t *testing.T, f *Fake) {
			for range 10 {
				must(t, f.DeleteAt(Chain, 1))
				if rules, _ := f.List(Chain); len(rules) == 0 {
					return
				}
			}
		}},
		{"last rule deleted", func(t *testing.T, f *Fake) {
			rules, _ := f.List(Chain)
			must(t, f.DeleteAt(Chain, len(rules)))
		}},
		{"last rule changed", func(t *testing.T, f *Fake) {
			rules, _ := f.List(Chain)
			must(t, f.DeleteAt(Chain, len(rules)))
			must(t, f.Append(Chain, "-s", "10.244.1.5/32", "-j", "SNAT", "--to-source", "203.0.113.99"))
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fakes := [2]*Fake{NewFake(), NewFake()}
			m := newFakeManager(t, fakes, nil)
			ctx := t.Context()
			if ok, err := m.Check(ctx); !ok || err != nil {
				t.Fatalf("Check before any Apply = %v, %v; want true (nothing written)", ok, err)
			}
			must(t, m.Apply(ctx, dualStack(udp5060)))
			if ok, err := m.Check(ctx); !ok || err != nil {
				t.Fatalf("Check after Apply = %v, %v", ok, err)
			}
			tc.breakIt(t, fakes[IPv4])
			if ok, _ := m.Check(ctx); ok {
				t.Fatalf("Check did not notice")
			}
			m.Recheck()
			must(t, m.Apply(ctx, dualStack(udp5060)))
			if ok, err := m.Check(ctx); !ok || err != nil {
				t.Fatalf("Check after repair = %v, %v", ok, err)
			}
			hookFirst(t, fakes[IPv4])
			if got := fakes[IPv4].Trace(pod4, ext4, annotations.UDP, 5060); got.Source != lb4 {
				t.Errorf("after repair, packet %s", got)
			}
		})
	}
}

func TestCheckIPTablesEmptyChain(t *testing.T) {
	fakes := [2]*Fake{NewFake(), NewFake()}
	m := newFakeManager(t, fakes, nil)
	ctx := t.Context()
	must(t, m.Apply(ctx, Desired{}))
	if ok, err := m.Check(ctx); !ok || err != nil {
		t.Fatalf("Check = %v, %v", ok, err)
	}
	must(t, fakes[IPv6].DeleteAt("POSTROUTING", 1))
	must(t, fakes[IPv6].DeleteChain(Chain))
	if ok, _ := m.Check(ctx); ok {
		t.Fatal("Check did not notice the empty chain and its hook gone")
	}
}

func testLog(t testing.TB) *logrus.Entry {
	log := logrus.New()
	log.SetOutput(t.Output())
	log.SetLevel(logrus.DebugLevel)
	return logrus.NewEntry(log)
}
