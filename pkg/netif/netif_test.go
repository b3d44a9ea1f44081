package netif

import (
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/egressvip/egressvip/pkg/model"
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
		{name: "ours v6 noprefixroute", addr: Addr{Addr: na("2001:db8:1::10/128", "", unix.IFA_F_NODAD|dep|unix.IFA_F_PERMANENT|unix.IFA_F_NOPREFIXROUTE), Protocol: AddrProto}, want: true},
		{name: "legacy v6 nodad noprefixroute", addr: Addr{Addr: na("2001:db8:1::10/128", "", unix.IFA_F_NODAD|dep|unix.IFA_F_NOPREFIXROUTE)}, want: true},
		{name: "v6 /128 preferred 0 noprefixroute without nodad", addr: Addr{Addr: na("2001:db8:1::96/128", "", dep|unix.IFA_F_NOPREFIXROUTE)}},
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
			// Sync and Owned decode dumps in place: same verdict.
			if tc.addr.IPNet == nil {
				return
			}
			a, ok, err := decodeAddr(addrMsg(tc.addr))
			if err != nil || !ok {
				t.Fatalf("decodeAddr: ok %v, err %v", ok, err)
			}
			if got := (&Manager{label: label(iface)}).owned(a); got != tc.want {
				t.Fatalf("owned(%+v) = %v, want %v", a, got, tc.want)
			}
		})
	}
}

// addrMsg is the RTM_NEWADDR payload the kernel sends for a.
func addrMsg(a Addr) []byte {
	ip := a.IP
	family := unix.AF_INET6
	if ip4 := ip.To4(); ip4 != nil {
		ip, family = ip4, unix.AF_INET
	}
	ones, _ := a.Mask.Size()
	m := nl.NewIfAddrmsg(family)
	m.Prefixlen, m.Flags, m.Index = uint8(ones), uint8(a.Flags), 7
	b := append([]byte(nil), m.Serialize()...)
	add := func(typ int, v []byte) { b = append(b, nl.NewRtAttr(typ, v).Serialize()...) }
	switch {
	case a.Peer != nil:
		peer := a.Peer.IP
		if p4 := peer.To4(); p4 != nil {
			peer = p4
		}
		add(unix.IFA_ADDRESS, peer)
		add(unix.IFA_LOCAL, ip)
	case family == unix.AF_INET:
		add(unix.IFA_ADDRESS, ip)
		add(unix.IFA_LOCAL, ip)
	default:
		add(unix.IFA_ADDRESS, ip)
	}
	if a.Label != "" {
		add(unix.IFA_LABEL, nl.ZeroTerminated(a.Label))
	}
	add(unix.IFA_FLAGS, nl.Uint32Attr(uint32(a.Flags)))
	if a.Protocol != 0 {
		add(ifaProto, []byte{a.Protocol})
	}
	return b
}

// decodeAddr reads what parseAddr reads, in place.
func TestDecodeAddr(t *testing.T) {
	for _, tc := range []struct {
		name string
		addr Addr
	}{
		{"v4 /32 labelled", Addr{Addr: netlink.Addr{IPNet: ipnet(t, "203.0.113.10/32"), Label: "eth1:evip", Flags: unix.IFA_F_DEPRECATED}, Protocol: AddrProto}},
		{"v4 /24", Addr{Addr: netlink.Addr{IPNet: ipnet(t, "203.0.113.2/24"), Label: "eth1"}}},
		{"v6 /128 flags beyond 8 bits", Addr{Addr: netlink.Addr{IPNet: ipnet(t, "2001:db8:1::10/128"), Flags: unix.IFA_F_NODAD | unix.IFA_F_NOPREFIXROUTE}}},
		{"v6 /64", Addr{Addr: netlink.Addr{IPNet: ipnet(t, "2001:db8:1::2/64")}}},
		{"v4 peer", Addr{Addr: netlink.Addr{IPNet: ipnet(t, "203.0.113.10/32"), Peer: ipnet(t, "203.0.113.11/30")}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			msg := addrMsg(tc.addr)
			full, err := parseAddr(msg)
			if err != nil {
				t.Fatal(err)
			}
			a, ok, err := decodeAddr(msg)
			if err != nil || !ok {
				t.Fatalf("ok %v, err %v", ok, err)
			}
			ones, bits := full.Mask.Size()
			if a.ip != ipOf(full) || a.ones != ones || a.index != full.LinkIndex || int(a.flags) != full.Flags ||
				a.proto != full.Protocol || string(a.label) != full.Label || a.full != (ones == bits && full.Peer == nil) {
				t.Fatalf("decodeAddr %+v, parseAddr %+v (%v)", a, full, full.IPNet)
			}
		})
	}
	if _, _, err := decodeAddr([]byte{1, 2}); err == nil {
		t.Fatal("a short message decoded")
	}
	bad := append(nl.NewIfAddrmsg(unix.AF_INET6).Serialize(), 0xff, 0, 1, 0) // attribute longer than the message
	if _, _, err := decodeAddr(bad); err == nil {
		t.Fatal("a malformed attribute decoded")
	}
	// An address of another family is skipped, not an error.
	other := append(nl.NewIfAddrmsg(unix.AF_UNSPEC).Serialize(), nl.NewRtAttr(unix.IFA_ADDRESS, []byte{1}).Serialize()...)
	if _, ok, err := decodeAddr(other); ok || err != nil {
		t.Fatalf("1-byte address: ok %v, err %v", ok, err)
	}
}

// routeGateways takes the gateways of main-table routes through the
// interface, of multipath next hops through it included.
func TestRouteGateways(t *testing.T) {
	const eth1, eth2 = 7, 8
	type hop struct {
		index int
		gw    string
	}
	gw := func(s string) []byte {
		ip := netip.MustParseAddr(s)
		return ip.AsSlice()
	}
	route := func(family, table uint8, flags uint32, attrs ...*nl.RtAttr) []byte {
		m := &nl.RtMsg{RtMsg: unix.RtMsg{Family: family, Table: table, Flags: flags}}
		b := append([]byte(nil), m.Serialize()...)
		for _, a := range attrs {
			b = append(b, a.Serialize()...)
		}
		return b
	}
	oif := func(i int) *nl.RtAttr { return nl.NewRtAttr(unix.RTA_OIF, nl.Uint32Attr(uint32(i))) }
	via := func(s string) *nl.RtAttr { return nl.NewRtAttr(unix.RTA_GATEWAY, gw(s)) }
	multipath := func(hops ...hop) *nl.RtAttr {
		var b []byte
		for _, h := range hops {
			var attrs []byte
			if h.gw != "" {
				attrs = via(h.gw).Serialize()
			}
			nh := make([]byte, unix.SizeofRtNexthop)
			nl.NativeEndian().PutUint16(nh[0:2], uint16(unix.SizeofRtNexthop+len(attrs)))
			nl.NativeEndian().PutUint32(nh[4:8], uint32(h.index))
			b = append(append(b, nh...), attrs...)
		}
		return nl.NewRtAttr(unix.RTA_MULTIPATH, b)
	}
	const main, inet, inet6 = unix.RT_TABLE_MAIN, unix.AF_INET, unix.AF_INET6
	for _, tc := range []struct {
		name   string
		family uint8
		msg    []byte
		want   []string
	}{
		{"default via eth1", inet, route(inet, main, 0, oif(eth1), via("203.0.113.250")), []string{"203.0.113.250"}},
		{"IPv6 default via eth1", inet6, route(inet6, main, 0, oif(eth1), via("2001:db8:1::250")), []string{"2001:db8:1::250"}},
		{"connected, no gateway", inet, route(inet, main, 0, oif(eth1)), nil},
		{"via eth2", inet, route(inet, main, 0, oif(eth2), via("198.51.100.129")), nil},
		{"other table", inet, route(inet, 100, 0, oif(eth1), via("203.0.113.253")), nil},
		{"main in RTA_TABLE", inet, route(inet, unix.RT_TABLE_COMPAT, 0, nl.NewRtAttr(unix.RTA_TABLE, nl.Uint32Attr(main)), oif(eth1), via("203.0.113.250")), []string{"203.0.113.250"}},
		{"table 1000 in RTA_TABLE", inet, route(inet, main, 0, nl.NewRtAttr(unix.RTA_TABLE, nl.Uint32Attr(1000)), oif(eth1), via("203.0.113.250")), nil},
		{"cloned", inet6, route(inet6, main, unix.RTM_F_CLONED, oif(eth1), via("2001:db8:1::250")), nil},
		{"other family", inet6, route(inet, main, 0, oif(eth1), via("203.0.113.250")), nil},
		{"multipath", inet, route(inet, main, 0, multipath(hop{eth1, "203.0.113.251"}, hop{eth2, "198.51.100.129"}, hop{eth1, ""}, hop{eth1, "203.0.113.252"})),
			[]string{"203.0.113.251", "203.0.113.252"}},
		{"multipath through eth2 only", inet6, route(inet6, main, 0, multipath(hop{eth2, "2001:db8:2::1"})), nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := routeGateways(nil, tc.msg, tc.family, eth1)
			if err != nil {
				t.Fatal(err)
			}
			var want []netip.Addr
			for _, s := range tc.want {
				want = append(want, netip.MustParseAddr(s))
			}
			if !slices.Equal(got, want) {
				t.Fatalf("gateways %v, want %v", got, want)
			}
		})
	}
	if _, err := routeGateways(nil, []byte{unix.AF_INET}, inet, eth1); err == nil {
		t.Error("a short message decoded")
	}
	broken := route(inet, main, 0, nl.NewRtAttr(unix.RTA_MULTIPATH, []byte{64, 0, 0, 0, eth1, 0, 0, 0}))
	if _, err := routeGateways(nil, broken, inet, eth1); err == nil {
		t.Error("a next hop longer than the attribute decoded")
	}
}

// A Sync whose want is the previous one's, KeepOnly flags included,
// shares its set; an address is KeepOnly only when every binding of it is.
func TestWantedSet(t *testing.T) {
	m := &Manager{}
	a, b, c, d := netip.MustParseAddr("203.0.113.10"), netip.MustParseAddr("2001:db8:1::10"),
		netip.MustParseAddr("203.0.113.11"), netip.MustParseAddr("203.0.113.12")
	add := func(ips ...netip.Addr) []model.Binding {
		out := make([]model.Binding, len(ips))
		for i, ip := range ips {
			out[i] = model.Binding{Addr: ip}
		}
		return out
	}
	keep := func(ip netip.Addr) model.Binding { return model.Binding{Addr: ip, KeepOnly: true} }
	keepOnly := func(ws *wantSet, ip netip.Addr) bool { return ws.keepOnly[ws.index[ip]] }

	first := m.wantedSet(append(add(a, b, b), keep(c), keep(d), model.Binding{Addr: d}))
	if len(first.index) != 4 || len(first.keepOnly) != 4 {
		t.Fatalf("set %v", first.index)
	}
	seen := map[int]bool{}
	for _, i := range first.index {
		if i < 0 || i >= len(first.index) || seen[i] {
			t.Fatalf("indices %v: want 0..3, each once", first.index)
		}
		seen[i] = true
	}
	if keepOnly(first, a) || !keepOnly(first, c) || keepOnly(first, d) {
		t.Fatalf("keepOnly a %v c %v d %v: want false, true, false (d also has a binding that adds)",
			keepOnly(first, a), keepOnly(first, c), keepOnly(first, d))
	}
	m.state.wanted = first
	if got := m.wantedSet(append(add(d, netip.AddrFrom16(a.As16()), b), keep(c))); got != first {
		t.Errorf("the same bindings (one IPv4-mapped) in another order built a new set")
	}
	for name, want := range map[string][]model.Binding{
		"fewer":             add(a, b),
		"fewer, duplicated": add(a, b, b, a),
		"more":              append(add(a, b, c, d), model.Binding{Addr: netip.MustParseAddr("203.0.113.13")}),
		"other":             add(a, b, c, netip.MustParseAddr("203.0.113.13")),
		"c may be added":    add(a, b, c, d),
		"a kept only":       append(add(b, d), keep(a), keep(c)),
		"none":              nil,
	} {
		got := m.wantedSet(want)
		if got == first {
			t.Errorf("%s: the previous set was reused", name)
		}
		for _, bd := range want {
			i, ok := got.index[bd.Addr]
			if !ok {
				t.Errorf("%s: %v lacks %s", name, got.index, bd.Addr)
				continue
			}
			if got.keepOnly[i] != bd.KeepOnly {
				t.Errorf("%s: %s keepOnly %v", name, bd.Addr, got.keepOnly[i])
			}
		}
	}
}

// lifetimeStale decides which owned addresses Sync and Refresh write.
func TestLifetimeStale(t *testing.T) {
	const L = 6
	for _, tc := range []struct {
		name          string
		noCacheinfo   bool
		notDeprecated bool // preferred lifetime not 0
		valid         uint32
		want          uint32
		stale         bool
	}{
		{name: "fresh", valid: 6, want: L},
		{name: "a third gone", valid: 5, want: L},
		{name: "two thirds left", valid: 4, want: L, stale: true},
		{name: "a third left", valid: 2, want: L, stale: true},
		{name: "about to expire", valid: 1, want: L, stale: true},
		{name: "forever, should be finite (persisted by a previous process)", valid: infinity, want: L, stale: true},
		{name: "longer than ours", valid: 60, want: L, stale: true},
		{name: "preferred lifetime set by hand", notDeprecated: true, valid: 6, want: L, stale: true},
		{name: "forever and not deprecated", notDeprecated: true, valid: infinity, want: infinity, stale: true},
		{name: "forever, wanted forever", valid: infinity, want: infinity},
		{name: "finite, wanted forever", valid: 6, want: infinity, stale: true},
		{name: "no cacheinfo", noCacheinfo: true, want: L, stale: true},
		{name: "2 s: fresh", valid: 2, want: 2},
		{name: "2 s: one second left", valid: 1, want: 2, stale: true},
		{name: "3 s: one second left", valid: 1, want: 3, stale: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := ifAddr{cacheinfo: !tc.noCacheinfo, flags: unix.IFA_F_DEPRECATED, valid: tc.valid}
			if tc.notDeprecated {
				a.flags = 0
			}
			if got := lifetimeStale(a, tc.want); got != tc.stale {
				t.Fatalf("lifetimeStale(%+v; want %d) = %v", a, tc.want, got)
			}
		})
	}
}

func TestLifetimeSeconds(t *testing.T) {
	for _, tc := range []struct {
		d       time.Duration
		want    uint32
		wantErr bool
	}{
		{d: 0, want: infinity},
		{d: 2 * time.Second, want: 2},
		{d: 2500 * time.Millisecond, want: 3},
		{d: time.Minute, want: 60},
		{d: time.Second, wantErr: true},
		{d: -time.Second, wantErr: true},
		{d: 1 << 62, wantErr: true},
	} {
		got, err := lifetimeSeconds(tc.d)
		if (err != nil) != tc.wantErr || err == nil && got != tc.want {
			t.Errorf("lifetimeSeconds(%v) = %d, %v; want %d (error %v)", tc.d, got, err, tc.want, tc.wantErr)
		}
	}
}

// renewable writes a renewal only while the address is certainly bound:
// a replacement of an expired address would bind it again.
func TestRenewable(t *testing.T) {
	now := time.Now()
	m := &Manager{lifetime: 2, renewedAt: map[netip.Addr]time.Time{}}
	ip := netip.MustParseAddr("203.0.113.10")
	at := func(valid uint32) ifAddr { return ifAddr{ip: ip, cacheinfo: true, valid: valid} }
	for _, tc := range []struct {
		name      string
		valid     uint32
		listedAgo time.Duration
		wroteAgo  time.Duration // 0: never written by this Manager
		want      bool
	}{
		{name: "forever", valid: infinity, listedAgo: time.Hour, want: true},
		{name: "listed with 2 s left, just now", valid: 2, want: true},
		{name: "listed with 2 s left, 900 ms ago", valid: 2, listedAgo: 900 * time.Millisecond},
		{name: "listed with 1 s left, unknown write", valid: 1},
		{name: "listed with 1 s left, written 1.2 s ago", valid: 1, wroteAgo: 1200 * time.Millisecond, want: true},
		{name: "written 1.9 s ago", valid: 1, wroteAgo: 1900 * time.Millisecond},
		{name: "written 5 s ago (frozen since)", valid: 1, wroteAgo: 5 * time.Second},
		{name: "expired", valid: 0, wroteAgo: 3 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clear(m.renewedAt)
			if tc.wroteAgo > 0 {
				m.renewedAt[ip] = now.Add(-tc.wroteAgo)
			}
			if got := m.renewable(at(tc.valid), now.Add(-tc.listedAgo), now); got != tc.want {
				t.Fatalf("renewable = %v, want %v", got, tc.want)
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

// Refresh looks at the kernel again when the first address this Manager
// wrote reaches a third of its lifetime, or at once after a renewal that
// was not written.
func TestPlanRefresh(t *testing.T) {
	a, b, c := netip.MustParseAddr("203.0.113.10"), netip.MustParseAddr("2001:db8:1::10"), netip.MustParseAddr("203.0.113.11")
	t0 := time.Now()
	m := &Manager{lifetime: 6, renewedAt: map[netip.Addr]time.Time{
		a: t0.Add(-time.Second),
		b: t0,
		c: t0.Add(-5 * time.Second), // not wanted any more
	}}
	wanted := &wantSet{index: map[netip.Addr]int{a: 0, b: 1, netip.MustParseAddr("203.0.113.12"): 2}, keepOnly: make([]bool, 3)}
	m.planRefresh(wanted, true)
	if want := t0.Add(-time.Second + 2*time.Second + 50*time.Millisecond); !m.refreshAt.Equal(want) {
		t.Fatalf("refreshAt %v after t0, want %v", m.refreshAt.Sub(t0), want.Sub(t0))
	}
	m.planRefresh(wanted, false)
	if !m.refreshAt.IsZero() {
		t.Fatalf("refreshAt %v after an incomplete renewal, want at once", m.refreshAt)
	}
	// Nothing written: look again within a lifetime all the same.
	m.renewedAt = map[netip.Addr]time.Time{}
	m.planRefresh(wanted, true)
	if d := time.Until(m.refreshAt); d <= 5*time.Second || d > 6*time.Second {
		t.Fatalf("refreshAt in %v with nothing written, want within the lifetime", d)
	}
}
