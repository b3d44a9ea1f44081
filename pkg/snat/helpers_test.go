package snat

import (
	"context"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/pkg/model"
	"github.com/sirupsen/logrus"
	"github.com/vishvananda/netlink"
)

var (
	pod4    = netip.MustParseAddr("10.244.1.5")
	pod4b   = netip.MustParseAddr("10.244.1.6")
	pod6    = netip.MustParseAddr("fd00:10:244:1::5")
	pod6b   = netip.MustParseAddr("fd00:10:244:1::6")
	lb4     = netip.MustParseAddr("203.0.113.10")
	lb4b    = netip.MustParseAddr("203.0.113.11")
	lb6     = netip.MustParseAddr("2001:db8:1::10")
	lb6b    = netip.MustParseAddr("2001:db8:1::11")
	ext4    = netip.MustParseAddr("198.51.100.9")
	ext6    = netip.MustParseAddr("2001:db8:2::9")
	podNet4 = netip.MustParsePrefix("10.244.0.0/16")
	svcNet4 = netip.MustParsePrefix("10.96.0.0/12")
	podNet6 = netip.MustParsePrefix("fd00:10:244::/56")
	svcNet6 = netip.MustParsePrefix("fd00:10:96::/112")
	udp5060 = annotations.DestinationPort{Protocol: annotations.UDP, Port: 5060}
	tcp8080 = annotations.DestinationPort{Protocol: annotations.TCP, Port: 8080}
)

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// applied fails the test unless Apply wrote everything.
func applied(t testing.TB, failed map[string]error, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("Apply: %v", err)
	}
	if len(failed) > 0 {
		t.Fatalf("Apply: failed Services %v", failed)
	}
}

// noFail is applied for Apply's results: noFail(t)(m.Apply(ctx, d)).
func noFail(t testing.TB) func(map[string]error, error) {
	return func(failed map[string]error, err error) {
		t.Helper()
		applied(t, failed, err)
	}
}

func testLog(t testing.TB) *logrus.Entry {
	log := logrus.New()
	log.SetOutput(t.Output())
	log.SetLevel(logrus.DebugLevel)
	return logrus.NewEntry(log)
}

// fakeConntrack records the filters of each delete call: flushes in
// calls, sweeps of mistranslated entries in sweeps.
type fakeConntrack struct {
	mu     sync.Mutex
	calls  map[netlink.InetFamily][][]flush
	sweeps map[netlink.InetFamily][]mistranslated
	err    error
}

func (f *fakeConntrack) ConntrackDeleteFilters(_ netlink.ConntrackTableType, fam netlink.InetFamily, filters ...netlink.CustomConntrackFilter) (uint, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.calls == nil {
		f.calls = map[netlink.InetFamily][][]flush{}
	}
	if f.sweeps == nil {
		f.sweeps = map[netlink.InetFamily][]mistranslated{}
	}
	var fl []flush
	for _, x := range filters {
		if m, ok := x.(mistranslated); ok {
			f.sweeps[fam] = append(f.sweeps[fam], m)
			continue
		}
		fl = append(fl, x.(flush))
	}
	if len(fl) > 0 {
		f.calls[fam] = append(f.calls[fam], fl)
	}
	return uint(len(filters)), f.err
}

// pods returns the pods flushed in all calls for a family.
func (f *fakeConntrack) pods(fam netlink.InetFamily) []netip.Addr {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []netip.Addr
	for _, c := range f.calls[fam] {
		for _, fl := range c {
			out = append(out, fl.pod)
		}
	}
	return out
}

func ports(ps ...annotations.DestinationPort) model.Filter { return model.Filter{Ports: ps} }

func prefixes(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

// dualStack is one Service SNATing a pod of each family, with the filter
// of ports.
func dualStack(ps ...annotations.DestinationPort) model.Datapath {
	return model.Datapath{
		SNAT: []model.SNATRule{
			{Service: "default/sip", Pod: pod4, Source: lb4, Filter: ports(ps...)},
			{Service: "default/sip", Pod: pod6, Source: lb6, Filter: ports(ps...)},
		},
		Exclude: []netip.Prefix{podNet4, svcNet4, podNet6},
		Fenced:  []netip.Addr{lb4, lb6},
	}
}

// node is a Manager on fakes, with the node's CNI MASQUERADE rules in
// iptables' nat POSTROUTING, and a way to trace packets through it.
type node struct {
	backend string
	m       *Manager
	ipt     [2]*Fake
	nft     [2]*FakeNFT
	ct      *fakeConntrack
}

// newNode returns a node of backend (nftables, or iptables-legacy on Fake
// runners with its fence on FakeNFTs); cfg's Backend, Runners, Tables, Log
// and Conntrack are set here.
func newNode(t testing.TB, backend string, cfg Config) *node {
	t.Helper()
	n := &node{backend: backend, ipt: [2]*Fake{NewFake(), NewFake()}, ct: &fakeConntrack{}}
	must(t, n.ipt[IPv4].Append("nat", "POSTROUTING", "-s", "10.244.0.0/16", "!", "-d", "10.244.0.0/16", "-m", "comment", "--comment", "cni", "-j", "MASQUERADE"))
	must(t, n.ipt[IPv6].Append("nat", "POSTROUTING", "-s", "fd00:10:244::/56", "!", "-d", "fd00:10:244::/56", "-m", "comment", "--comment", "cni", "-j", "MASQUERADE"))
	cfg.Backend, cfg.Log, cfg.Conntrack = backend, testLog(t), n.ct
	if backend == BackendNFTables {
		n.nft = [2]*FakeNFT{NewFakeNFT(IPv4), NewFakeNFT(IPv6)}
	} else {
		n.nft = [2]*FakeNFT{newFakeNFTTable(IPv4, fenceTable(legacyBackend)), newFakeNFTTable(IPv6, fenceTable(legacyBackend))}
		cfg.Runners = [2]Runner{n.ipt[IPv4], n.ipt[IPv6]}
	}
	cfg.Tables = [2]NFTables{n.nft[IPv4], n.nft[IPv6]}
	m, err := New(cfg)
	must(t, err)
	if m.Backend() != backend {
		t.Fatalf("backend %s, want %s", m.Backend(), backend)
	}
	n.m = m
	return n
}

// fakeBackends are the backends the fake nodes cover: nftables, and the
// iptables backends' rules (both flavours write the same).
var fakeBackends = []string{BackendNFTables, BackendIPTablesLegacy}

func forEachFake(t *testing.T, fn func(t *testing.T, backend string)) {
	for _, b := range fakeBackends {
		t.Run(b, func(t *testing.T) { fn(t, b) })
	}
}

func (n *node) apply(t testing.TB, d model.Datapath) {
	t.Helper()
	failed, err := n.m.Apply(context.Background(), d)
	applied(t, failed, err)
}

// trace walks p through the node's rules.
func (n *node) trace(p pkt) verdict {
	f := familyOf(p.src)
	if n.backend == BackendNFTables {
		return traceNFT(n.nft[f], n.ipt[f], p)
	}
	return traceIPT(n.ipt[f], n.nft[f], p)
}

// dump returns what the node's backend holds, for failure messages.
func (n *node) dump() string {
	var b strings.Builder
	for _, f := range Families {
		b.WriteString(n.ipt[f].Dump())
		b.WriteString(n.nft[f].Dump())
	}
	return b.String()
}

// natHookSpec is the rule spec of the jump from nat POSTROUTING.
func natHookSpec() string {
	for _, h := range (datapathOptions{}).hooks() {
		if h.table == "nat" {
			return h.spec()
		}
	}
	return ""
}
