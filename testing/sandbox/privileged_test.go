package sandbox

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/egressvip/egressvip/internal/privtest"
)

// withNamespaces takes this process's sandbox lock (so that no other
// sandbox run removes the namespaces as leftovers) and creates namespaces
// named after roles, deleted after the test.
func withNamespaces(t *testing.T, roles ...string) []string {
	t.Helper()
	privtest.Require(t)
	lock, err := lockRun()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	t.Cleanup(func() {
		for _, ns := range names {
			delNS(ns)
		}
		unlockRun(lock)
	})
	for _, r := range roles {
		ns := nsName("t-" + r)
		delNS(ns)
		if err := addNS(ns); err != nil {
			t.Fatal(err)
		}
		names = append(names, ns)
	}
	return names
}

// Addresses read over netlink: full-length ones on any interface for
// Holders, deprecated ones on eth1 for LBAddresses; a dump of a node's
// addresses costs well under a millisecond.
func TestPrivilegedAddressReads(t *testing.T) {
	names := withNamespaces(t, "a", "b")
	if err := veth(names[0], "eth1", names[1], "eth1"); err != nil {
		t.Fatal(err)
	}
	c := &Cluster{Nodes: []*Node{{Name: "node-a", NS: names[0]}, {Name: "node-b", NS: names[1]}}}
	t.Cleanup(func() {
		for _, n := range c.Nodes {
			n.closeHandle()
		}
	})
	a, b := c.Nodes[0], c.Nodes[1]
	lb4, lb6, own := netip.MustParseAddr("203.0.113.77"), netip.MustParseAddr("2001:db8:1::77"), netip.MustParseAddr("203.0.113.11")
	if err := shAll(
		[]string{"ip", "-n", a.NS, "addr", "add", own.String() + "/24", "dev", "eth1"},
		[]string{"ip", "-n", a.NS, "addr", "add", lb4.String() + "/32", "dev", "eth1", "preferred_lft", "0"},
		[]string{"ip", "-n", a.NS, "addr", "add", lb6.String() + "/128", "dev", "eth1", "nodad", "preferred_lft", "0"},
		// Full length but not deprecated, on another interface: held, not
		// an LBAddress.
		[]string{"ip", "-n", b.NS, "addr", "add", lb4.String() + "/32", "dev", "lo"},
	); err != nil {
		t.Fatal(err)
	}
	if got := c.Holders(lb4); !slices.Equal(got, []string{"node-a", "node-b"}) {
		t.Errorf("Holders(%s) = %v", lb4, got)
	}
	if got := c.Holders(lb6); !slices.Equal(got, []string{"node-a"}) {
		t.Errorf("Holders(%s) = %v", lb6, got)
	}
	if got := c.Holders(own); len(got) != 0 {
		t.Errorf("a /24 address counts as held: %v", got)
	}
	got, err := a.LBAddresses()
	if err != nil || !slices.Equal(got, []netip.Addr{lb4, lb6}) {
		t.Errorf("LBAddresses = %v, %v", got, err)
	}
	if !a.HasAddress(lb6) || b.HasAddress(lb4) {
		t.Errorf("HasAddress: a %v b %v", a.HasAddress(lb6), b.HasAddress(lb4))
	}
	const n = 500
	start := time.Now()
	for range n {
		c.Holders(lb4)
	}
	per := time.Since(start) / (n * 2)
	t.Logf("one node's address dump: %s", per)
	if per > 2*time.Millisecond {
		t.Errorf("one node's address dump takes %s, want well under a millisecond", per)
	}
}

// The sampler sees an address move from one node to another, with the
// moment it was on both.
func TestPrivilegedSampler(t *testing.T) {
	names := withNamespaces(t, "c", "d")
	c := &Cluster{Nodes: []*Node{{Name: "node-c", NS: names[0]}, {Name: "node-d", NS: names[1]}}}
	t.Cleanup(func() {
		for _, n := range c.Nodes {
			n.closeHandle()
		}
	})
	lb := netip.MustParseAddr("203.0.113.78")
	addr := func(n *Node, op string) {
		t.Helper()
		if _, err := sh("ip", "-n", n.NS, "addr", op, lb.String()+"/32", "dev", "lo"); err != nil {
			t.Fatal(err)
		}
	}
	s := c.StartSampler(5*time.Millisecond, time.Minute, lb)
	wait := func(want ...string) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for r := s.Report(); !slices.Equal(r.Of(lb).Last.Holders, want); r = s.Report() {
			if time.Now().After(deadline) {
				t.Fatalf("the sampler never saw %v: %s", want, r.Of(lb))
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	wait()
	addr(c.Nodes[0], "add")
	wait("node-c")
	addr(c.Nodes[1], "add")
	wait("node-c", "node-d")
	addr(c.Nodes[0], "del")
	wait("node-d")
	r := s.Stop()
	s.Stop() // a second Stop is harmless
	got := r.Of(lb)
	t.Logf("%s", &r)
	var changes []string
	for _, ch := range got.Changes {
		changes = append(changes, fmt.Sprint(ch.Holders))
	}
	if want := []string{"[node-c]", "[node-c node-d]", "[node-d]"}; !slices.Equal(changes, want) {
		t.Errorf("changes %v, want %v", changes, want)
	}
	if len(got.Double) == 0 || got.None == 0 || r.Errors != 0 {
		t.Errorf("double %d none %d errors %d (%v)", len(got.Double), got.None, r.Errors, r.Err)
	}
}

// A pod's server answers the external host with the pod's name and the
// source it saw, over TCP and UDP, both families.
func TestPrivilegedServeAndRequest(t *testing.T) {
	names := withNamespaces(t, "pod", "ext")
	if err := veth(names[0], "eth0", names[1], "eth0"); err != nil {
		t.Fatal(err)
	}
	podIP4, extIP4 := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2")
	podIP6, extIP6 := netip.MustParseAddr("2001:db8:ff::1"), netip.MustParseAddr("2001:db8:ff::2")
	if err := shAll(
		[]string{"ip", "-n", names[0], "addr", "add", podIP4.String() + "/24", "dev", "eth0"},
		[]string{"ip", "-n", names[0], "addr", "add", podIP6.String() + "/64", "dev", "eth0", "nodad"},
		[]string{"ip", "-n", names[1], "addr", "add", extIP4.String() + "/24", "dev", "eth0"},
		[]string{"ip", "-n", names[1], "addr", "add", extIP6.String() + "/64", "dev", "eth0", "nodad"},
	); err != nil {
		t.Fatal(err)
	}
	p := &Pod{Name: "web-1", NS: names[0]}
	if err := p.Serve("tcp", 8080); err == nil {
		t.Fatal("a pod that was not started serves")
	}
	p.started = true
	t.Cleanup(p.closeServers)
	for _, proto := range []string{"tcp", "udp"} {
		if err := p.Serve(proto, 8080); err != nil {
			t.Fatal(err)
		}
	}
	e := &External{ns: names[1]}
	for _, proto := range []string{"tcp", "udp"} {
		for _, tc := range []struct{ dst, src netip.Addr }{{podIP4, extIP4}, {podIP6, extIP6}} {
			dst := netip.AddrPortFrom(tc.dst, 8080)
			r, err := e.Request(proto, dst, 3*time.Second)
			if err != nil {
				t.Fatalf("%s to %s: %v", proto, dst, err)
			}
			if r.Pod != "web-1" || r.Seen.Addr() != tc.src || r.From != dst {
				t.Errorf("%s to %s: %+v, want pod web-1, seen from %s, answered from %s", proto, dst, r, tc.src, dst)
			}
		}
	}
	p.closeServers()
	if _, err := e.Request("tcp", netip.AddrPortFrom(podIP4, 8080), time.Second); err == nil {
		t.Error("a closed server answered")
	}
}
