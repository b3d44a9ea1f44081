package allocator

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func rangesString(rs []Range) string {
	var s []string
	for _, r := range rs {
		s = append(s, r.From.String()+"-"+r.To.String())
	}
	return strings.Join(s, ",")
}

func TestParseCIDRsAndRanges(t *testing.T) {
	for _, tc := range []struct {
		name, cidr, rng string
		skipEnds        bool
		want, wantErr   string
	}{
		{name: "cidr", cidr: "192.168.0.200/29", want: "192.168.0.200-192.168.0.207"},
		{name: "host bits set mean the network, as netipx does", cidr: "192.168.0.210/29", want: "192.168.0.208-192.168.0.215"},
		{name: "skip ends", cidr: "192.168.0.200/29", skipEnds: true, want: "192.168.0.201-192.168.0.206"},
		{name: "skip ends keeps /31 and /32", cidr: "10.0.0.0/31,10.0.0.9/32", skipEnds: true, want: "10.0.0.0-10.0.0.1,10.0.0.9-10.0.0.9"},
		{name: "skip ends leaves IPv6 alone", cidr: "2001:db8::/126", skipEnds: true, want: "2001:db8::-2001:db8::3"},
		{name: "mixed families, merged and sorted", cidr: "2001::10/127, 10.0.0.4/30,10.0.0.0/30", want: "10.0.0.0-10.0.0.7,2001::10-2001::11"},
		{name: "bad cidr", cidr: "10.0.0.300/24", wantErr: `"10.0.0.300/24" is not a CIDR`},
		{name: "dhcp", cidr: "0.0.0.0/32", wantErr: "DHCP"},
		{name: "empty item", cidr: "10.0.0.0/24,", wantErr: "empty item"},
		{name: "4in6", cidr: "::ffff:10.0.0.0/120", wantErr: "plain"},
		{name: "range", rng: "192.168.0.10-192.168.0.11,192.168.0.10-192.168.0.13", want: "192.168.0.10-192.168.0.13"},
		{name: "ipv6 ranges", rng: "2001::10-2001::14,2001::20-2001::24", want: "2001::10-2001::14,2001::20-2001::24"},
		{name: "adjacent ranges merge", rng: "10.0.0.1-10.0.0.5,10.0.0.6-10.0.0.9", want: "10.0.0.1-10.0.0.9"},
		{name: "backwards", rng: "10.0.0.9-10.0.0.1", wantErr: "ends before it starts"},
		{name: "mixed range", rng: "10.0.0.1-2001::1", wantErr: "mixes"},
		{name: "not a range", rng: "10.0.0.1", wantErr: "not a range"},
		{name: "zone", rng: "fe80::1%eth0-fe80::9%eth0", wantErr: "plain"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got []Range
			var err error
			if tc.cidr != "" {
				got, err = parseCIDRs(tc.cidr, tc.skipEnds)
			} else {
				got, err = parseRanges(tc.rng)
			}
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if s := rangesString(got); s != tc.want {
				t.Errorf("got %s, want %s", s, tc.want)
			}
		})
	}
}

func TestPoolFor(t *testing.T) {
	data := map[string]string{
		"cidr-global":        "10.0.0.0/24",
		"range-team":         "10.1.0.1-10.1.0.9",
		"cidr-both":          "10.2.0.0/24",
		"range-both":         "10.3.0.1-10.3.0.9",
		"cidr-broken":        "nope",
		"allow-share-global": "true",
		"allow-share-team":   "false",
		"interface-global":   "eth0",
		"interface-both":     "eth5",
		"search-order":       "desc",
	}
	s, errs := ParseConfig(data)
	if len(errs) != 1 || errs[0].Key != "cidr-broken" {
		t.Fatalf("errors %v, want one for cidr-broken", errs)
	}
	for _, tc := range []struct {
		ns, key, iface string
		share          bool
		err            string
	}{
		// The namespace's own range wins over cidr-global (see the
		// package documentation: a deviation from kube-vip-cloud-provider).
		{ns: "team", key: "range-team", iface: "eth0"},
		{ns: "both", key: "cidr-both", iface: "eth5", share: true},
		{ns: "other", key: "cidr-global", iface: "eth0", share: true},
		{ns: "broken", err: "address pool cidr-broken is invalid"},
	} {
		t.Run(tc.ns, func(t *testing.T) {
			p, err := s.PoolFor(tc.ns)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if p.Key != tc.key || p.Interface != tc.iface || p.Share != tc.share || !p.Desc {
				t.Errorf("got %+v", p)
			}
		})
	}
	var noPool NoPoolError
	if _, err := (Settings{}).PoolFor("x"); !errors.As(err, &noPool) {
		t.Errorf("no ConfigMap: %v, want NoPoolError", err)
	}
	var keys []string
	for _, p := range s.Pools() {
		keys = append(keys, p.Key)
	}
	if want := []string{"cidr-both", "cidr-global", "range-both", "range-team"}; !slices.Equal(keys, want) {
		t.Errorf("Pools %v, want %v", keys, want)
	}
}

func TestRangeSize(t *testing.T) {
	for _, tc := range []struct {
		r    string
		want float64
	}{
		{"10.0.0.1-10.0.0.254", 254},
		{"10.0.0.0-10.0.0.255", 254},
		{"10.0.0.0-10.0.1.255", 508},
		{"10.0.0.5-10.0.0.5", 1},
		{"10.0.0.255-10.0.1.0", 0},
		{"2001:db8::-2001:db8::ffff", 65536},
		{"2001:db8::-2001:db8:0:0:ffff:ffff:ffff:ffff", 1 << 64},
	} {
		from, to, _ := strings.Cut(tc.r, "-")
		if got := rangeSize(Range{netip.MustParseAddr(from), netip.MustParseAddr(to)}); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.r, got, tc.want)
		}
	}
}

func TestClaimName(t *testing.T) {
	for _, tc := range []struct{ addr, want string }{
		{"203.0.113.10", "egressvip.alloc.203.0.113.10"},
		{"2001:db8::", "egressvip.alloc.2001-0db8-0000-0000-0000-0000-0000-0000"},
	} {
		if got := ClaimName(netip.MustParseAddr(tc.addr)); got != tc.want {
			t.Errorf("%s: %s, want %s", tc.addr, got, tc.want)
		}
		l := newClaim("egressvip", netip.MustParseAddr(tc.addr), "team", []string{"a", "b"}, testNow)
		c, ok := claimOf(l)
		if !ok || c.addr != netip.MustParseAddr(tc.addr) || c.namespace != "team" || !slices.Equal(c.members, []string{"a", "b"}) {
			t.Errorf("%s: claimOf(newClaim) = %+v, %v", tc.addr, c, ok)
		}
	}
	l := newClaim("egressvip", netip.MustParseAddr("10.0.0.1"), "team", nil, testNow)
	l.Name = fmt.Sprint(ClaimPrefix, "10.0.0.2")
	if _, ok := claimOf(l); ok {
		t.Error("a claim whose name and address disagree was read")
	}
}
