package netif

import (
	"net"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

func ipnet(t *testing.T, s string) *net.IPNet {
	t.Helper()
	ip, n, err := net.ParseCIDR(s)
	if err != nil {
		t.Fatal(err)
	}
	n.IP = ip
	return n
}

func TestOwned(t *testing.T) {
	na := func(s string, label string, flags int) netlink.Addr {
		return netlink.Addr{IPNet: ipnet(t, s), Label: label, Flags: flags, ValidLft: infinity}
	}
	const dep = unix.IFA_F_DEPRECATED
	for _, tc := range []struct {
		name  string
		iface string
		addr  Addr
		want  bool
	}{
		{name: "ours v4", addr: Addr{Addr: na("203.0.113.10/32", "eth1:evip", dep|unix.IFA_F_PERMANENT), Protocol: AddrProto}, want: true},
		{name: "ours v6", addr: Addr{Addr: na("2001:db8:1::10/128", "", unix.IFA_F_NODAD|dep), Protocol: AddrProto}, want: true},
		{name: "ours v4, long name, no label", iface: "enp1s0f0.100", addr: Addr{Addr: na("203.0.113.10/32", "enp1s0f0.100", dep), Protocol: AddrProto}, want: true},
		{name: "ours, lifetime changed by hand", addr: Addr{Addr: na("203.0.113.10/32", "eth1", 0), Protocol: AddrProto}, want: true},
		{name: "our protocol but not full length", addr: Addr{Addr: na("203.0.113.10/24", "eth1", dep), Protocol: AddrProto}},
		{name: "our protocol on link-local", addr: Addr{Addr: na("fe80::1/128", "", dep), Protocol: AddrProto}},
		{name: "legacy v4 label", addr: Addr{Addr: na("203.0.113.10/32", "eth1:evip", dep|unix.IFA_F_PERMANENT)}, want: true},
		{name: "legacy v6 nodad", addr: Addr{Addr: na("2001:db8:1::10/128", "", unix.IFA_F_NODAD|dep)}, want: true},
		{name: "legacy v6 nodad, long name", iface: "enp1s0f0.100", addr: Addr{Addr: na("2001:db8:1::10/128", "", unix.IFA_F_NODAD|dep)}, want: true},
		{name: "long name, deprecated /32 labelled as the interface", iface: "enp1s0f0.100", addr: Addr{Addr: na("203.0.113.10/32", "enp1s0f0.100", dep)}},
		{name: "other protocol (kernel_lo)", addr: Addr{Addr: na("203.0.113.10/32", "eth1", dep), Protocol: 1}},
		{name: "node address /24", addr: Addr{Addr: na("203.0.113.2/24", "eth1", 0)}},
		{name: "foreign /32 preferred forever", addr: Addr{Addr: na("203.0.113.99/32", "eth1", 0)}},
		{name: "our label but preferred forever", addr: Addr{Addr: na("203.0.113.98/32", "eth1:evip", 0)}},
		{name: "v4 /32 deprecated other label", addr: Addr{Addr: na("203.0.113.97/32", "eth1:kv", dep)}},
		{name: "v6 /128 preferred 0 without nodad", addr: Addr{Addr: na("2001:db8:1::97/128", "", dep)}},
		{name: "v6 /64", addr: Addr{Addr: na("2001:db8:1::2/64", "", unix.IFA_F_NODAD|dep)}},
		{name: "link-local", addr: Addr{Addr: na("fe80::1/128", "", unix.IFA_F_NODAD|dep)}},
		{name: "peer address", addr: Addr{Addr: netlink.Addr{IPNet: ipnet(t, "203.0.113.10/32"), Peer: ipnet(t, "203.0.113.11/32")}, Protocol: AddrProto}},
		{name: "nil", addr: Addr{Protocol: AddrProto}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			iface := tc.iface
			if iface == "" {
				iface = "eth1"
			}
			if got := Owned(tc.addr, iface); got != tc.want {
				t.Fatalf("Owned = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestLabelFitsOrIsOmitted(t *testing.T) {
	if got := label("eth1"); got != "eth1:evip" {
		t.Fatalf("label(eth1) = %q", got)
	}
	if got := label("enp1s0f0.10"); got != "" {
		t.Fatalf("a label longer than 15 characters must be omitted, got %q", got)
	}
}

func TestReleaseAtLeast(t *testing.T) {
	for rel, want := range map[string]bool{
		"6.18.44-fc-v669":        true,
		"5.18.0-rc1":             true,
		"5.18":                   true,
		"5.17.15":                false,
		"5.4.0-150-generic":      false,
		"4.19.0":                 false,
		"10.0":                   true,
		"3.10.0-1160.el7.x86_64": false,
		"":                       false,
		"garbage":                false,
	} {
		if got := releaseAtLeast(rel, 5, 18); got != want {
			t.Errorf("releaseAtLeast(%q, 5, 18) = %v, want %v", rel, got, want)
		}
	}
}

func TestCheckOwnable(t *testing.T) {
	for _, tc := range []struct {
		iface     string
		withProto bool
		wantErr   string
	}{
		{iface: "eth1", withProto: true},
		{iface: "eth1", withProto: false},
		{iface: "enp1s0f0.10", withProto: false, wantErr: "Linux 5.18"}, // 11 characters: label would be 16
		{iface: "enp1s0f0", withProto: false},
		{iface: "enp1s0f0.100", withProto: true},
		{iface: "enp1s0f0.100", withProto: false, wantErr: `"enp1s0f0.100:evip"`},
		{iface: "abcdefghijklmnop", withProto: true, wantErr: "longer than 15"},
		{iface: "", withProto: true, wantErr: "no interface"},
	} {
		err := checkOwnable(tc.iface, tc.withProto)
		if tc.wantErr == "" && err != nil || tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
			t.Errorf("checkOwnable(%q, %v) = %v, want error containing %q", tc.iface, tc.withProto, err, tc.wantErr)
		}
	}
}

// TestParseAddr decodes what the kernel sends, IFA_PROTO included.
func TestParseAddr(t *testing.T) {
	msg := func(family int, prefix uint8, flags uint8, attrs ...*nl.RtAttr) []byte {
		m := nl.NewIfAddrmsg(family)
		m.Prefixlen, m.Flags, m.Index = prefix, flags, 7
		b := append([]byte(nil), m.Serialize()...)
		for _, a := range attrs {
			b = append(b, a.Serialize()...)
		}
		return b
	}
	u32 := func(v uint32) []byte { b := make([]byte, 4); nl.NativeEndian().PutUint32(b, v); return b }
	ci := nl.IfaCacheInfo{IfaCacheinfo: unix.IfaCacheinfo{Prefered: 0, Valid: infinity}}
	v4 := net.ParseIP("203.0.113.10").To4()

	a, err := parseAddr(msg(unix.AF_INET, 32, unix.IFA_F_PERMANENT,
		nl.NewRtAttr(unix.IFA_ADDRESS, v4), nl.NewRtAttr(unix.IFA_LOCAL, v4),
		nl.NewRtAttr(unix.IFA_LABEL, nl.ZeroTerminated("enp1s0f0.100")),
		nl.NewRtAttr(unix.IFA_FLAGS, u32(unix.IFA_F_PERMANENT|unix.IFA_F_DEPRECATED)),
		nl.NewRtAttr(unix.IFA_CACHEINFO, ci.Serialize()),
		nl.NewRtAttr(ifaProto, []byte{AddrProto})))
	if err != nil {
		t.Fatal(err)
	}
	if a.IPNet.String() != "203.0.113.10/32" || a.Peer != nil || a.Label != "enp1s0f0.100" || a.LinkIndex != 7 ||
		a.Flags != unix.IFA_F_PERMANENT|unix.IFA_F_DEPRECATED || a.Protocol != AddrProto || a.PreferedLft != 0 || a.ValidLft != infinity {
		t.Fatalf("IPv4: %+v (ipnet %v)", a, a.IPNet)
	}
	if !Owned(a, "enp1s0f0.100") {
		t.Fatal("a parsed owned address is not Owned")
	}

	v6 := net.ParseIP("2001:db8:1::10")
	a, err = parseAddr(msg(unix.AF_INET6, 128, unix.IFA_F_NODAD, nl.NewRtAttr(unix.IFA_ADDRESS, v6)))
	if err != nil || a.IPNet.String() != "2001:db8:1::10/128" || a.Protocol != 0 || a.Flags != unix.IFA_F_NODAD {
		t.Fatalf("IPv6: %+v, %v", a, err)
	}

	peer := net.ParseIP("203.0.113.11").To4()
	a, err = parseAddr(msg(unix.AF_INET, 32, 0, nl.NewRtAttr(unix.IFA_ADDRESS, peer), nl.NewRtAttr(unix.IFA_LOCAL, v4)))
	if err != nil || a.IPNet.String() != "203.0.113.10/32" || a.Peer == nil || a.Peer.String() != "203.0.113.11/32" {
		t.Fatalf("peer: %+v, %v", a, err)
	}

	if _, err := parseAddr([]byte{1, 2}); err == nil {
		t.Fatal("a short message parsed")
	}
}

// observe decides when Sync announces every owned address again.
func TestObserve(t *testing.T) {
	m := &Manager{}
	steps := []struct {
		name     string
		index    int
		up       bool
		watchSaw bool // Watch saw a transition before this Sync
		wantAll  bool
	}{
		{name: "first Sync announces only what it adds", index: 2, up: true},
		{name: "unchanged", index: 2, up: true},
		{name: "down", index: 2, up: false},
		{name: "still down, even after a Watch transition", index: 2, up: false, watchSaw: true},
		{name: "up again", index: 2, up: true, wantAll: true},
		{name: "once", index: 2, up: true},
		{name: "a flap only Watch saw", index: 2, up: true, watchSaw: true, wantAll: true},
		{name: "re-created", index: 5, up: true, wantAll: true},
		{name: "re-created while down", index: 6, up: false},
		{name: "then up", index: 6, up: true, wantAll: true},
		{name: "settled", index: 6, up: true},
	}
	for _, s := range steps {
		if s.watchSaw {
			m.markReannounce()
		}
		if got := m.observe(s.index, s.up); got != s.wantAll {
			t.Fatalf("%s: observe(%d, %v) = %v, want %v", s.name, s.index, s.up, got, s.wantAll)
		}
	}
}
