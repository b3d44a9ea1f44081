package desired

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/types"

	"github.com/egressvip/egressvip/pkg/model"
)

var admission = Admission{
	NodeAddresses: map[netip.Addr]bool{netip.MustParseAddr("198.51.100.11"): true, netip.MustParseAddr("2001:db8:100::11"): true},
	Host: model.Host{
		Own:      []netip.Addr{netip.MustParseAddr("203.0.113.11"), netip.MustParseAddr("203.0.113.99")},
		Subnets:  []netip.Prefix{netip.MustParsePrefix("203.0.113.0/24")},
		Gateways: []netip.Addr{netip.MustParseAddr("203.0.113.1")},
	},
	Exclude: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("10.96.0.0/16"), netip.MustParsePrefix("fd00:10:96::/112")},
}

func claimant(ns, name, ip string, created time.Time) model.Service {
	s := model.Service{Key: types.NamespacedName{Namespace: ns, Name: name}, Created: created}
	a := netip.MustParseAddr(ip)
	if a.Is4() {
		s.LBv4 = a
	} else {
		s.LBv6 = a
	}
	return s
}

func TestAdmitRefusals(t *testing.T) {
	now := time.Now()
	for _, tc := range []struct {
		name    string
		ip      string
		allowed []netip.Prefix
		refused bool
	}{
		{name: "an ordinary address", ip: "203.0.113.10"},
		{name: "an ordinary IPv6 address", ip: "2001:db8:1::10"},
		{name: "a Node's address", ip: "198.51.100.11", refused: true},
		{name: "a Node's IPv6 address", ip: "2001:db8:100::11", refused: true},
		{name: "the serviceInterface's own address", ip: "203.0.113.99", refused: true},
		{name: "the gateway", ip: "203.0.113.1", refused: true},
		{name: "inside the pod CIDR", ip: "10.244.3.7", refused: true},
		{name: "inside the Service CIDR", ip: "10.96.0.10", refused: true},
		{name: "inside the IPv6 Service CIDR", ip: "fd00:10:96::a", refused: true},
		{name: "unspecified", ip: "0.0.0.0", refused: true},
		{name: "unspecified IPv6", ip: "::", refused: true},
		{name: "loopback", ip: "127.0.0.1", refused: true},
		{name: "IPv6 loopback", ip: "::1", refused: true},
		{name: "multicast", ip: "224.0.0.1", refused: true},
		{name: "IPv6 multicast", ip: "ff02::1", refused: true},
		{name: "link-local", ip: "169.254.1.1", refused: true},
		{name: "IPv6 link-local", ip: "fe80::1", refused: true},
		{name: "limited broadcast", ip: "255.255.255.255", refused: true},
		{name: "network address of the on-link subnet", ip: "203.0.113.0", refused: true},
		{name: "broadcast address of the on-link subnet", ip: "203.0.113.255", refused: true},
		{name: "inside the allow-list", ip: "203.0.113.10", allowed: []netip.Prefix{netip.MustParsePrefix("203.0.113.0/25")}},
		{name: "outside the allow-list", ip: "203.0.113.200", allowed: []netip.Prefix{netip.MustParsePrefix("203.0.113.0/25")}, refused: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := admission
			a.Allowed = tc.allowed
			got := Admit([]model.Service{claimant("default", "web", tc.ip, now)}, a)[0]
			if refused := len(got.Addresses()) == 0; refused != tc.refused {
				t.Fatalf("addresses %v, refused %v, want %v (problems %+v)", got.Addresses(), refused, tc.refused, got.Problems)
			}
			if tc.refused {
				if got.Invalid != ReasonRefused || len(got.Problems) != 1 || got.Problems[0].Reason != EventAddressRefused {
					t.Fatalf("refused Service: invalid %q problems %+v", got.Invalid, got.Problems)
				}
			} else if got.Invalid != "" || len(got.Problems) != 0 {
				t.Fatalf("admitted Service: invalid %q problems %+v", got.Invalid, got.Problems)
			}
		})
	}
}

// A dual-stack Service with one refused family keeps the other.
func TestAdmitKeepsTheOtherFamily(t *testing.T) {
	s := claimant("default", "web", "198.51.100.11", time.Now())
	s.LBv6 = netip.MustParseAddr("2001:db8:1::10")
	got := Admit([]model.Service{s}, admission)[0]
	if got.LBv4.IsValid() || got.LBv6 != s.LBv6 || got.Invalid != "" {
		t.Fatalf("got v4 %v v6 %v invalid %q", got.LBv4, got.LBv6, got.Invalid)
	}
}

func TestAdmitCrossNamespaceClaims(t *testing.T) {
	old, young := time.Now().Add(-time.Hour), time.Now()
	ip := "203.0.113.10"
	for _, tc := range []struct {
		name     string
		services []model.Service
		claimed  string
		wantKeep []string
	}{
		{name: "the older Service keeps it", services: []model.Service{claimant("victim", "db", ip, old), claimant("attacker", "x", ip, young)},
			wantKeep: []string{"victim/db"}},
		{name: "order of the list does not matter", services: []model.Service{claimant("attacker", "x", ip, young), claimant("victim", "db", ip, old)},
			wantKeep: []string{"victim/db"}},
		{name: "the namespace the address Lease records keeps it, however old the other", services: []model.Service{
			claimant("victim", "db", ip, young), claimant("attacker", "x", ip, old)},
			claimed: "victim", wantKeep: []string{"victim/db"}},
		{name: "a recorded namespace that no longer claims it counts for nothing", services: []model.Service{
			claimant("victim", "db", ip, old), claimant("attacker", "x", ip, young)},
			claimed: "gone", wantKeep: []string{"victim/db"}},
		{name: "same age: namespace and name decide", services: []model.Service{claimant("b", "x", ip, old), claimant("a", "x", ip, old)},
			wantKeep: []string{"a/x"}},
		{name: "one namespace may share", services: []model.Service{claimant("team", "x", ip, old), claimant("team", "y", ip, young)},
			wantKeep: []string{"team/x", "team/y"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var kept []string
			a := admission
			if tc.claimed != "" {
				a.ClaimedBy = map[netip.Addr]string{netip.MustParseAddr(ip): tc.claimed}
			}
			for _, s := range Admit(tc.services, a) {
				if len(s.Addresses()) > 0 {
					kept = append(kept, s.Key.String())
					continue
				}
				if len(s.Problems) != 1 || s.Problems[0].Reason != EventAddressConflict {
					t.Fatalf("%s lost the address without a conflict Problem: %+v", s.Key, s.Problems)
				}
				for _, other := range tc.services {
					if other.Key.Namespace != s.Key.Namespace && strings.Contains(s.Problems[0].Message, other.Key.Name) {
						t.Fatalf("the conflict names the other namespace's Service: %q", s.Problems[0].Message)
					}
				}
			}
			slices.Sort(kept)
			if !slices.Equal(kept, tc.wantKeep) {
				t.Fatalf("kept %v, want %v", kept, tc.wantKeep)
			}
		})
	}
}
