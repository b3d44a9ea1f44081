package netif

import (
	"net"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func TestOwned(t *testing.T) {
	ipnet := func(s string) *net.IPNet {
		ip, n, err := net.ParseCIDR(s)
		if err != nil {
			t.Fatal(err)
		}
		n.IP = ip
		return n
	}
	for _, tc := range []struct {
		name string
		addr netlink.Addr
		want bool
	}{
		{name: "ours v4", addr: netlink.Addr{IPNet: ipnet("203.0.113.10/32"), Label: "eth1:evip", Flags: unix.IFA_F_DEPRECATED | unix.IFA_F_PERMANENT, PreferedLft: infinity, ValidLft: infinity}, want: true},
		{name: "ours v6", addr: netlink.Addr{IPNet: ipnet("2001:db8:1::10/128"), Flags: unix.IFA_F_NODAD | unix.IFA_F_DEPRECATED, ValidLft: infinity}, want: true},
		{name: "node address /24", addr: netlink.Addr{IPNet: ipnet("203.0.113.2/24"), Label: "eth1", PreferedLft: infinity, ValidLft: infinity}},
		{name: "foreign /32 preferred forever", addr: netlink.Addr{IPNet: ipnet("203.0.113.99/32"), Label: "eth1", PreferedLft: infinity, ValidLft: infinity}},
		{name: "our label but preferred forever", addr: netlink.Addr{IPNet: ipnet("203.0.113.98/32"), Label: "eth1:evip", PreferedLft: infinity, ValidLft: infinity}},
		{name: "v4 /32 deprecated other label", addr: netlink.Addr{IPNet: ipnet("203.0.113.97/32"), Label: "eth1:kv", Flags: unix.IFA_F_DEPRECATED}},
		{name: "v6 /128 preferred 0 without nodad", addr: netlink.Addr{IPNet: ipnet("2001:db8:1::97/128"), Flags: unix.IFA_F_DEPRECATED, ValidLft: infinity}},
		{name: "v6 /64", addr: netlink.Addr{IPNet: ipnet("2001:db8:1::2/64"), Flags: unix.IFA_F_NODAD | unix.IFA_F_DEPRECATED}},
		{name: "link-local", addr: netlink.Addr{IPNet: ipnet("fe80::1/128"), Flags: unix.IFA_F_NODAD | unix.IFA_F_DEPRECATED}},
		{name: "nil", addr: netlink.Addr{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Owned(tc.addr, "eth1"); got != tc.want {
				t.Fatalf("Owned = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestLabelFitsOrIsOmitted(t *testing.T) {
	if got := label("eth1"); got != "eth1:evip" {
		t.Fatalf("label(eth1) = %q", got)
	}
	if got := label("enp129s0f1np1"); got != "" {
		t.Fatalf("a label longer than 15 characters must be omitted, got %q", got)
	}
}
