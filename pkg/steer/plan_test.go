package steer

import (
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/egressvip/egressvip/pkg/model"
)

func a(s string) netip.Addr { return netip.MustParseAddr(s) }

func TestPlanRules(t *testing.T) {
	h1 := hop{gw: a("198.51.100.12"), dev: 2}
	h2 := hop{gw: a("198.51.100.13"), dev: 2}
	h6 := hop{gw: a("2001:db8:100::12"), dev: 2}
	resolve := func(s model.SteerRule) (hop, error) {
		switch s.Holder {
		case "n1":
			if s.Pod.Is6() {
				return h6, nil
			}
			return h1, nil
		case "n2":
			return h2, nil
		}
		return hop{}, errors.New("holder " + s.Holder + " is not on-link")
	}
	tests := []struct {
		name   string
		steer  []model.SteerRule
		want   map[netip.Addr]hop
		failed map[string]string
	}{
		{
			name: "both families, one rule per pod",
			steer: []model.SteerRule{
				{Service: "ns/a", Pod: a("10.244.1.5"), Holder: "n1"},
				{Service: "ns/a", Pod: a("fd00:10:244:1::5"), Holder: "n1"},
				{Service: "ns/b", Pod: a("10.244.1.6"), Holder: "n2"},
			},
			want: map[netip.Addr]hop{a("10.244.1.5"): h1, a("fd00:10:244:1::5"): h6, a("10.244.1.6"): h2},
		},
		{
			name: "unreachable holder fails its Service only",
			steer: []model.SteerRule{
				{Service: "ns/a", Pod: a("10.244.1.5"), Holder: "n1"},
				{Service: "ns/far", Pod: a("10.244.1.7"), Holder: "n9"},
			},
			want:   map[netip.Addr]hop{a("10.244.1.5"): h1},
			failed: map[string]string{"ns/far": "holder n9 is not on-link"},
		},
		{
			name: "a pod of two Services with one holder is one rule",
			steer: []model.SteerRule{
				{Service: "ns/b", Pod: a("10.244.1.5"), Holder: "n1"},
				{Service: "ns/a", Pod: a("10.244.1.5"), Holder: "n1"},
			},
			want: map[netip.Addr]hop{a("10.244.1.5"): h1},
		},
		{
			name: "a pod of two Services with two holders: the first Service by name wins",
			steer: []model.SteerRule{
				{Service: "ns/b", Pod: a("10.244.1.5"), Holder: "n2"},
				{Service: "ns/a", Pod: a("10.244.1.5"), Holder: "n1"},
			},
			want:   map[netip.Addr]hop{a("10.244.1.5"): h1},
			failed: map[string]string{"ns/b": "already steered to holder n1 (198.51.100.12) for Service ns/a"},
		},
		{
			name:   "invalid pod",
			steer:  []model.SteerRule{{Service: "ns/a", Holder: "n1"}},
			want:   map[netip.Addr]hop{},
			failed: map[string]string{"ns/a": "not valid"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			failed := map[string]error{}
			got := planRules(tc.steer, resolve, func(s string, err error) { failed[s] = err })
			if len(got) != len(tc.want) {
				t.Fatalf("planned %d rules, want %d", len(got), len(tc.want))
			}
			for pod, h := range tc.want {
				if got[pod] == nil || got[pod].hop != h {
					t.Errorf("pod %s: got %+v, want %v", pod, got[pod], h)
				}
			}
			if len(failed) != len(tc.failed) {
				t.Fatalf("failed = %v, want %v", failed, tc.failed)
			}
			for svc, msg := range tc.failed {
				if failed[svc] == nil || !strings.Contains(failed[svc].Error(), msg) {
					t.Errorf("failed[%s] = %v, want it to contain %q", svc, failed[svc], msg)
				}
			}
		})
	}
}

func TestAssignTables(t *testing.T) {
	h := func(last byte) hop { return hop{gw: netip.AddrFrom4([4]byte{198, 51, 100, last}), dev: 2} }
	tests := []struct {
		name     string
		want     []hop
		have     map[int]hop
		min, max int
		ids      map[hop]int
		full     int
	}{
		{name: "fresh", want: []hop{h(13), h(12)}, min: 100, max: 200, ids: map[hop]int{h(12): 100, h(13): 101}},
		{name: "keeps existing tables", want: []hop{h(12), h(13)}, have: map[int]hop{150: h(13)}, min: 100, max: 200,
			ids: map[hop]int{h(12): 100, h(13): 150}},
		{name: "skips tables in use, also stale ones", want: []hop{h(12)}, have: map[int]hop{100: h(99)}, min: 100, max: 200,
			ids: map[hop]int{h(12): 101}},
		{name: "duplicate tables: the lowest", want: []hop{h(12)}, have: map[int]hop{120: h(12), 110: h(12)}, min: 100, max: 200,
			ids: map[hop]int{h(12): 110}},
		{name: "full", want: []hop{h(12), h(13), h(14)}, have: map[int]hop{100: h(99)}, min: 100, max: 102,
			ids: map[hop]int{h(12): 101, h(13): 102}, full: 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ids, full := assignTables(tc.want, tc.have, tc.min, tc.max)
			if len(full) != tc.full {
				t.Errorf("full = %v, want %d", full, tc.full)
			}
			if len(ids) != len(tc.ids) {
				t.Fatalf("ids = %v, want %v", ids, tc.ids)
			}
			for h, id := range tc.ids {
				if ids[h] != id {
					t.Errorf("table of %v = %d, want %d", h.gw, ids[h], id)
				}
			}
		})
	}
}

func TestTunnelMAC(t *testing.T) {
	m1, m2, m3 := tunnelMAC("node-1"), tunnelMAC("node-1"), tunnelMAC("node-2")
	if m1.String() != m2.String() {
		t.Errorf("not deterministic: %s, %s", m1, m2)
	}
	if m1.String() == m3.String() {
		t.Errorf("two nodes, one MAC: %s", m1)
	}
	for _, m := range []net.HardwareAddr{m1, m3} {
		if m[0]&0x01 != 0 || m[0]&0x02 == 0 {
			t.Errorf("%s is not unicast and locally administered", m)
		}
	}
	if got := linkLocal(net.HardwareAddr{0x66, 0xa6, 0x51, 0xdb, 0xf3, 0x3e}); got != a("fe80::64a6:51ff:fedb:f33e") {
		t.Errorf("linkLocal = %s", got)
	}
}

func TestRouteHopAndRuleKey(t *testing.T) {
	m := &Manager{cfg: Config{Mark: 0x1000, RulePriority: 31000}}
	for _, h := range []hop{{gw: a("198.51.100.12"), dev: 3}, {gw: a("fe80::1"), dev: 4}, {gw: a("2001:db8:100::12"), dev: 3}} {
		r := m.defaultRoute(h, 59136)
		got, ok := routeHop(r)
		if !ok || got != h {
			t.Errorf("routeHop(defaultRoute(%v)) = %v, %v", h, got, ok)
		}
		if wantOnlink := !h.gw.IsLinkLocalUnicast(); (r.Flags&int(netlink.FLAG_ONLINK) != 0) != wantOnlink {
			t.Errorf("%v: onlink = %v, want %v", h.gw, !wantOnlink, wantOnlink)
		}
	}
	// A route egressvip does not write is no hop.
	r := m.defaultRoute(hop{gw: a("198.51.100.12"), dev: 3}, 59136)
	r.Dst = &net.IPNet{IP: net.IPv4(192, 0, 2, 0).To4(), Mask: net.CIDRMask(24, 32)}
	if _, ok := routeHop(r); ok {
		t.Error("a route to 192.0.2.0/24 taken for a default route")
	}
	r = m.defaultRoute(hop{gw: a("198.51.100.12"), dev: 3}, 59136)
	r.Type = unix.RTN_BLACKHOLE
	if _, ok := routeHop(r); ok {
		t.Error("a blackhole route taken for a hop")
	}

	k := ruleKey{family: netlink.FAMILY_V6, priority: 31000, src: netip.MustParsePrefix("fd00:10:244:1::5/128"), mark: 0x1000, mask: 0x1000, table: 59137}
	rule := m.ruleOf(k)
	if rule.Protocol != Proto {
		t.Errorf("rule protocol %d", rule.Protocol)
	}
	if got, ok := keyOf(rule); !ok || got != k {
		t.Errorf("keyOf(ruleOf(k)) = %+v, %v; want %+v", got, ok, k)
	}
	rule.IifName = "eth0"
	if _, ok := keyOf(rule); ok {
		t.Error("a rule with iif taken for one of egressvip's")
	}
}

func TestNewValidates(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		err  string
	}{
		{name: "no node", cfg: Config{}, err: "no node name"},
		{name: "priority after main", cfg: Config{Node: "n", RulePriority: 32766}, err: "rule priority"},
		{name: "empty range", cfg: Config{Node: "n", TableMin: 300, TableMax: 200}, err: "is empty"},
		{name: "kernel tables", cfg: Config{Node: "n", TableMin: 100, TableMax: 300}, err: "253-255"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(tc.cfg)
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("New = %v, want an error with %q", err, tc.err)
			}
		})
	}
	m, err := New(Config{Node: "n"})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if m.cfg.Mark != DefaultMark || m.cfg.RulePriority != DefaultRulePriority || m.cfg.TableMin != DefaultTableMin || m.cfg.TableMax != DefaultTableMax {
		t.Errorf("defaults not applied: %+v", m.cfg)
	}
}

func TestSysctlName(t *testing.T) {
	if got := sysctlName("ipv4", "conf", "egressvip.vx", "rp_filter"); got != "net.ipv4.conf.egressvip/vx.rp_filter" {
		t.Errorf("sysctlName = %s", got)
	}
}
