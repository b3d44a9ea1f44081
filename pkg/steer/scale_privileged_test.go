package steer

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/egressvip/egressvip/internal/privtest"
	"github.com/egressvip/egressvip/pkg/model"
)

// scaleRoutes steers n pods of each family (one Service per pod) to three
// holders on the node network; holderShift moves every pod to the next one.
func scaleRoutes(n, holderShift int) model.Routes {
	var r model.Routes
	for i := range n {
		h := (i + holderShift) % 3
		r.Steer = append(r.Steer,
			model.SteerRule{Service: fmt.Sprintf("ns/svc-%d", i), Holder: fmt.Sprintf("node-%d", h),
				Pod: netip.AddrFrom4([4]byte{10, 244, byte(1 + i/250), byte(1 + i%250)}),
				Via: []netip.Addr{netip.AddrFrom4([4]byte{198, 51, 100, byte(12 + h)})}},
			model.SteerRule{Service: fmt.Sprintf("ns/svc-%d", i), Holder: fmt.Sprintf("node-%d", h),
				Pod: netip.AddrFrom16([16]byte{0xfd, 0, 0, 0x10, 0x2, 0x44, 0, 1, 14: byte(i >> 8), 15: byte(i)}),
				Via: []netip.Addr{netip.MustParseAddr(fmt.Sprintf("2001:db8:100::%d", 12+h))}})
	}
	return r
}

// TestPrivilegedSteerScale: a few hundred steered pods cost one dump per
// kind and only the writes of what changed.
func TestPrivilegedSteerScale(t *testing.T) {
	privtest.Require(t)
	node, peer := privtest.NewNS(t, "st-node"), privtest.NewNS(t, "st-peer")
	privtest.Veth(t, node, "eth0", peer, "eth0")
	node.Exec(t, "ip", "addr", "add", "198.51.100.11/24", "dev", "eth0")
	node.Exec(t, "ip", "addr", "add", "2001:db8:100::11/64", "dev", "eth0", "nodad")
	m, err := New(Config{Node: "node-x", NetNS: node.Handle, Log: testLog(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	const n = 300
	step := func(name string, r model.Routes, wantWrites int) {
		t.Helper()
		m.writes = 0
		start := time.Now()
		failed, err := m.Apply(context.Background(), r)
		d := time.Since(start)
		if err != nil || len(failed) != 0 {
			t.Fatalf("%s: Apply: %v %v", name, err, failed)
		}
		t.Logf("%s: %v, %d writes", name, d.Round(10*time.Microsecond), m.writes)
		if m.writes != wantWrites {
			t.Errorf("%s: %d writes, want %d", name, m.writes, wantWrites)
		}
	}
	// 600 rules, 6 tables of two routes (the hop's, the fallback) and
	// the 4 guard rules.
	step(fmt.Sprintf("first Apply, %d pods x 2 families", n), scaleRoutes(n, 0), 2*n+12+4)
	step("unchanged", scaleRoutes(n, 0), 0)
	one := scaleRoutes(n, 0)
	one.Steer[0].Via, one.Steer[0].Holder = []netip.Addr{netip.MustParseAddr("198.51.100.13")}, "node-1"
	step("one pod to another holder", one, 2)
	// Every pod moves (but the one moved already): 599 rules added and 599
	// removed; the tables stay.
	step("every pod to another holder", scaleRoutes(n, 1), 4*n-2)
	step("unchanged", scaleRoutes(n, 1), 0)
	if rules, routes := ownedCount(t, m); rules != 2*n || routes != 12 {
		t.Fatalf("owned rules/routes = %d/%d, want %d/12", rules, routes, 2*n)
	}
	start := time.Now()
	if err := m.Cleanup(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Logf("Cleanup: %v", time.Since(start).Round(10*time.Microsecond))
	if rules, routes := ownedCount(t, m); rules != 0 || routes != 0 {
		t.Fatalf("after Cleanup owned rules/routes = %d/%d", rules, routes)
	}
}

// TestPrivilegedSteerForeignDevice: an interface of the tunnel's name that
// is not egressvip's is neither used nor removed, and the Services that
// need the tunnel fail with a message that says so.
func TestPrivilegedSteerForeignDevice(t *testing.T) {
	privtest.Require(t)
	node, peer := privtest.NewNS(t, "st-node"), privtest.NewNS(t, "st-peer")
	privtest.Veth(t, node, "eth0", peer, "eth0")
	node.Exec(t, "ip", "addr", "add", "198.51.100.11/24", "dev", "eth0")
	node.Exec(t, "ip", "link", "add", vxlanDev, "type", "vxlan", "id", "7", "dstport", "4789", "local", "198.51.100.11", "nolearning")
	m, err := New(Config{Node: "node-x", NetNS: node.Handle, Log: testLog(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	tun := &model.Tunnel{VNI: vni, Port: 4789, Device: vxlanDev, Local: netip.MustParseAddr("198.51.100.11"),
		Peers: []model.TunnelPeer{{Node: "holder", Underlay: netip.MustParseAddr("198.51.100.141"), MAC: "02:00:00:00:00:01",
			Inner: []netip.Addr{netip.MustParseAddr("198.51.100.141")}}}}
	failed, err := m.Apply(context.Background(), model.Routes{Tunnel: tun, Steer: []model.SteerRule{
		{Service: service, Pod: pod4, Holder: "holder", Via: []netip.Addr{netip.MustParseAddr("198.51.100.141")}, Tunnel: true}}})
	if err == nil || !strings.Contains(err.Error(), "exists and is not egressvip's") {
		t.Fatalf("Apply error = %v", err)
	}
	if failed[service] == nil || !strings.Contains(failed[service].Error(), "not egressvip's") {
		t.Fatalf("failed = %v", failed)
	}
	t.Logf("%s: %v", service, failed[service])
	if err := m.Cleanup(context.Background()); err != nil {
		t.Fatal(err)
	}
	if out := node.Exec(t, "ip", "-d", "link", "show", vxlanDev); !strings.Contains(out, "vxlan id 7") {
		t.Fatalf("foreign device changed: %s", out)
	}
}
