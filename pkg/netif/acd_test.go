package netif

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"

	"github.com/mdlayher/ndp"
)

// Frames other hosts send, for the tests: a gratuitous ARP, an ARP reply,
// an unsolicited neighbour advertisement and a solicitation.

func TestParseClaim(t *testing.T) {
	mac := net.HardwareAddr{0x02, 0, 0, 0, 0, 0xbb}
	other := net.HardwareAddr{0x02, 0, 0, 0, 0, 0xcc}
	v4, peer4 := netip.MustParseAddr("203.0.113.10"), netip.MustParseAddr("203.0.113.2")
	v6, peer6 := netip.MustParseAddr("2001:db8:1::10"), netip.MustParseAddr("2001:db8:1::2")
	snm, _ := solicitedNode(v6)
	for _, tc := range []struct {
		name  string
		frame []byte
		ok    bool
		ip    netip.Addr
		mac   net.HardwareAddr
		probe bool
	}{
		{name: "gratuitous ARP", frame: appendGARP(nil, mac, v4), ok: true, ip: v4, mac: mac},
		{name: "ARP reply", frame: appendARP(nil, 2, mac, v4, other, peer4, other), ok: true, ip: v4, mac: mac},
		{name: "ARP request claims its sender, not the address it resolves", frame: appendARP(nil, 1, mac, peer4, zeroMAC, v4, broadcast), ok: true, ip: peer4, mac: mac},
		{name: "ARP probe", frame: appendARPProbe(nil, mac, v4), ok: true, ip: v4, mac: mac, probe: true},
		{name: "ARP reply to a probe", frame: appendARP(nil, 2, mac, v4, other, netip.IPv4Unspecified(), other), ok: true, ip: v4, mac: mac},
		{name: "ARP reply from 0.0.0.0", frame: appendARP(nil, 2, mac, netip.IPv4Unspecified(), other, v4, other)},
		{name: "ARP of another hardware type", frame: func() []byte { f := appendGARP(nil, mac, v4); f[15] = 6; return f }()},
		{name: "short ARP", frame: appendGARP(nil, mac, v4)[:30]},
		{name: "unsolicited NA", frame: appendUnsolicitedNA(nil, mac, v6), ok: true, ip: v6, mac: mac},
		{name: "NA without a link-layer option", frame: appendNDP(nil, typeNA, mac, v6, netip.IPv6LinkLocalAllNodes(), v6, 0, 0), ok: true, ip: v6, mac: mac},
		{name: "NA with another link-layer address", frame: func() []byte {
			f := appendUnsolicitedNA(nil, mac, v6)
			copy(f[len(f)-6:], other)
			return f
		}(), ok: true, ip: v6, mac: other},
		{name: "DAD probe", frame: appendDADSolicitation(nil, mac, v6), ok: true, ip: v6, mac: mac, probe: true},
		{name: "solicitation from an address claims that address", frame: appendNDP(nil, typeNS, mac, peer6, snm, v6, optSLLA, 0), ok: true, ip: peer6, mac: mac},
		{name: "NA with hop limit 64", frame: func() []byte { f := appendUnsolicitedNA(nil, mac, v6); f[ethHeaderLen+7] = 64; return f }()},
		{name: "router advertisement", frame: appendNDP(nil, 134, mac, peer6, netip.IPv6LinkLocalAllNodes(), v6, 0, 0)},
		{name: "IPv4 datagram", frame: func() []byte { f := appendGARP(nil, mac, v4); f[12], f[13] = 0x08, 0x00; return f }()},
		{name: "truncated NA", frame: appendUnsolicitedNA(nil, mac, v6)[:ethHeaderLen+ipv6HeaderLen+10]},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, ok := parseClaim(tc.frame)
			if ok != tc.ok {
				t.Fatalf("ok = %v, want %v (%+v)", ok, tc.ok, c)
			}
			if ok && (c.ip != tc.ip || !sameMAC(c.mac, tc.mac) || c.probe != tc.probe || !sameMAC(c.src, mac)) {
				t.Fatalf("claim %+v; want %s by %s, probe %v, from %s", c, tc.ip, tc.mac, tc.probe, mac)
			}
		})
	}
}

// The probes are what RFC 5227 and RFC 4862 describe, with the checksum
// ndp computes.
func TestProbeFrames(t *testing.T) {
	mac := net.HardwareAddr{0x02, 0, 0, 0, 0, 0xaa}
	v4 := netip.MustParseAddr("203.0.113.10")
	f := appendARPProbe(nil, mac, v4)
	if len(f) != minFrameLen || !sameMAC(f[0:6], broadcast) || !sameMAC(f[6:12], mac) || !sameMAC(f[22:28], mac) ||
		netip.AddrFrom4([4]byte(f[28:32])) != netip.IPv4Unspecified() || !sameMAC(f[32:38], zeroMAC) || netip.AddrFrom4([4]byte(f[38:42])) != v4 {
		t.Fatalf("ARP probe % x", f)
	}

	v6 := netip.MustParseAddr("2001:db8:1::12:3456")
	f = appendDADSolicitation(nil, mac, v6)
	group, groupMAC := solicitedNode(v6)
	if group != netip.MustParseAddr("ff02::1:ff12:3456") || !sameMAC(groupMAC, net.HardwareAddr{0x33, 0x33, 0xff, 0x12, 0x34, 0x56}) {
		t.Fatalf("solicited-node group %s, %s", group, groupMAC)
	}
	ip := f[ethHeaderLen:]
	if !sameMAC(f[0:6], groupMAC) || ip[7] != 255 || netip.AddrFrom16([16]byte(ip[8:24])) != netip.IPv6Unspecified() ||
		netip.AddrFrom16([16]byte(ip[24:40])) != group || int(binary.BigEndian.Uint16(ip[4:6])) != ndpLen || len(ip) != ipv6HeaderLen+ndpLen {
		t.Fatalf("DAD solicitation % x", f)
	}
	want, err := ndp.MarshalMessageChecksum(&ndp.NeighborSolicitation{TargetAddress: v6}, netip.IPv6Unspecified(), group)
	if err != nil {
		t.Fatal(err)
	}
	if got := ip[ipv6HeaderLen:]; string(got) != string(want) {
		t.Fatalf("ICMPv6 % x, ndp marshals % x", got, want)
	}
	m, err := ndp.ParseMessage(ip[ipv6HeaderLen:])
	if ns, ok := m.(*ndp.NeighborSolicitation); err != nil || !ok || ns.TargetAddress != v6 || len(ns.Options) != 0 {
		t.Fatalf("ndp parses %#v, %v", m, err)
	}
}

// The filter assembles, and its jumps land inside the program.
func TestACDFilter(t *testing.T) {
	for i, ins := range acdFilter {
		if ins.Op&0x07 == 0x05 && (i+1+int(ins.Jt) >= len(acdFilter) || i+1+int(ins.Jf) >= len(acdFilter)) {
			t.Fatalf("instruction %d jumps out of the program: %+v", i, ins)
		}
	}
}
