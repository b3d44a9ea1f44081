package allocator

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

var testNow = time.Unix(1_800_000_000, 0)

func pool(t testing.TB, key, value string, mods ...func(*Pool)) Pool {
	t.Helper()
	var rs []Range
	var err error
	if strings.HasPrefix(key, "cidr-") {
		rs, err = parseCIDRs(value, false)
	} else {
		rs, err = parseRanges(value)
	}
	if err != nil {
		t.Fatal(err)
	}
	p := Pool{Key: key, Ranges: rs}
	for _, m := range mods {
		m(&p)
	}
	return p
}

func desc(p *Pool)  { p.Desc = true }
func share(p *Pool) { p.Share = true }

func TestFamilies(t *testing.T) {
	both := pool(t, "range-global", "10.0.0.1-10.0.0.9,2001:db8::1-2001:db8::9")
	v4 := pool(t, "range-global", "10.0.0.1-10.0.0.9")
	v6 := pool(t, "range-global", "2001:db8::1-2001:db8::9")
	for _, tc := range []struct {
		name string
		svc  *corev1.Service
		p    Pool
		want string
		all  bool
		err  string
	}{
		{name: "single IPv4", svc: lbService("d", "s"), p: both, want: "ipv4", all: true},
		{name: "single IPv6", svc: lbService("d", "s", dual(corev1.IPFamilyPolicySingleStack, corev1.IPv6Protocol)), p: both, want: "ipv6", all: true},
		{name: "no policy, no families, IPv6 pool", svc: lbService("d", "s", func(s *corev1.Service) { s.Spec.IPFamilyPolicy, s.Spec.IPFamilies = nil, nil }), p: v6, want: "ipv6", all: true},
		{name: "single IPv6, no IPv6 in pool", svc: lbService("d", "s", dual(corev1.IPFamilyPolicySingleStack, corev1.IPv6Protocol)), p: v4, err: "has no ipv6 addresses"},
		{name: "prefer, IPv6 first", svc: lbService("d", "s", dual(corev1.IPFamilyPolicyPreferDualStack, corev1.IPv6Protocol, corev1.IPv4Protocol)), p: both, want: "ipv6,ipv4"},
		{name: "prefer in a single-stack cluster still asks both", svc: lbService("d", "s", dual(corev1.IPFamilyPolicyPreferDualStack, corev1.IPv4Protocol)), p: both, want: "ipv4,ipv6"},
		{name: "prefer, one family in pool", svc: lbService("d", "s", dual(corev1.IPFamilyPolicyPreferDualStack, corev1.IPv4Protocol)), p: v6, want: "ipv6"},
		{name: "require", svc: lbService("d", "s", dual(corev1.IPFamilyPolicyRequireDualStack, corev1.IPv4Protocol, corev1.IPv6Protocol)), p: both, want: "ipv4,ipv6", all: true},
		{name: "require, one family in pool", svc: lbService("d", "s", dual(corev1.IPFamilyPolicyRequireDualStack, corev1.IPv4Protocol, corev1.IPv6Protocol)), p: v4, err: "RequireDualStack"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fams, all, err := Families(tc.svc, tc.p)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want %q", err, tc.err)
				}
				return
			}
			var got []string
			for _, f := range fams {
				got = append(got, f.String())
			}
			if strings.Join(got, ",") != tc.want || all != tc.all || err != nil {
				t.Errorf("got %v all=%v err=%v, want %s all=%v", got, all, err, tc.want, tc.all)
			}
		})
	}
}

func TestNextFree(t *testing.T) {
	usedSet := func(s ...string) func(netip.Addr) bool {
		m := map[netip.Addr]bool{}
		for _, a := range s {
			m[netip.MustParseAddr(a)] = true
		}
		return func(a netip.Addr) bool { return m[a] }
	}
	refuse := func(s ...string) func(netip.Addr) string {
		u := usedSet(s...)
		return func(a netip.Addr) string {
			if u(a) {
				return "refused"
			}
			return ""
		}
	}
	for _, tc := range []struct {
		name, ranges string
		desc         bool
		start        string
		used         []string
		refused      []string
		want         string
	}{
		{name: "first", ranges: "10.0.0.1-10.0.0.9", want: "10.0.0.1"},
		{name: "skips used and refused", ranges: "10.0.0.1-10.0.0.9", used: []string{"10.0.0.1"}, refused: []string{"10.0.0.2"}, want: "10.0.0.3"},
		{name: "never .0 or .255", ranges: "10.0.0.255-10.0.1.9", want: "10.0.1.1"},
		{name: "descending", ranges: "10.0.0.1-10.0.0.9,10.0.1.1-10.0.1.255", desc: true, used: []string{"10.0.1.254"}, want: "10.0.1.253"},
		{name: "next range", ranges: "10.0.0.1-10.0.0.2,10.0.0.8-10.0.0.9", used: []string{"10.0.0.1", "10.0.0.2"}, want: "10.0.0.8"},
		{name: "from a cursor", ranges: "10.0.0.1-10.0.0.2,10.0.0.8-10.0.0.9", start: "10.0.0.5", want: "10.0.0.8"},
		{name: "from a cursor, descending", ranges: "10.0.0.1-10.0.0.2,10.0.0.8-10.0.0.9", desc: true, start: "10.0.0.5", want: "10.0.0.2"},
		{name: "full", ranges: "10.0.0.1-10.0.0.2", used: []string{"10.0.0.1", "10.0.0.2"}, want: ""},
		{name: "ipv6", ranges: "2001:db8::-2001:db8::ff", used: []string{"2001:db8::"}, want: "2001:db8::1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rs, err := parseRanges(tc.ranges)
			if err != nil {
				t.Fatal(err)
			}
			var start netip.Addr
			if tc.start != "" {
				start = netip.MustParseAddr(tc.start)
			}
			got, _, _ := NextFree(rs, tc.desc, start, usedSet(tc.used...), refuse(tc.refused...))
			want := netip.Addr{}
			if tc.want != "" {
				want = netip.MustParseAddr(tc.want)
			}
			if got != want {
				t.Errorf("got %v, want %v", got, want)
			}
		})
	}
	t.Run("a refused /64 ends the search, with the reason", func(t *testing.T) {
		rs, _ := parseCIDRs("2001:db8::/64", false)
		got, stop, why := NextFree(rs, false, netip.Addr{}, usedSet(), func(netip.Addr) string { return "inside the pod CIDR" })
		if got.IsValid() || !strings.Contains(why, "inside the pod CIDR") || stop != netip.MustParseAddr("2001:db8::1:0") {
			t.Errorf("got %v stop %v %q", got, stop, why)
		}
	})
}

func svcAt(ns, name string, sec int64, opts ...svcOpt) *corev1.Service {
	s := lbService(ns, name, opts...)
	s.UID = types.UID("uid-" + ns + "-" + name)
	s.CreationTimestamp = metav1.NewTime(testNow.Add(time.Duration(sec) * time.Second))
	return s
}

func TestPlanner(t *testing.T) {
	type want struct{ svc, addrs, why string }
	for _, tc := range []struct {
		name     string
		existing []*corev1.Service
		claims   []*claim
		pending  []*corev1.Service
		p        Pool
		refuse   string
		want     []want
	}{
		{
			name: "in order, skipping what Services of any namespace carry",
			existing: []*corev1.Service{svcAt("x", "old", 0, annotated("10.0.0.1")), svcAt("y", "lbip", 0, func(s *corev1.Service) {
				s.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: "10.0.0.3"}}
			})},
			pending: []*corev1.Service{svcAt("d", "a", 1), svcAt("d", "b", 2)},
			p:       pool(t, "range-global", "10.0.0.1-10.0.0.9"),
			want:    []want{{"a", "10.0.0.2", ""}, {"b", "10.0.0.4", ""}},
		},
		{
			name:    "claimed addresses are used, even with no Service seen",
			claims:  []*claim{{addr: netip.MustParseAddr("10.0.0.1"), namespace: "other"}},
			pending: []*corev1.Service{svcAt("d", "a", 1)},
			p:       pool(t, "range-global", "10.0.0.1-10.0.0.9"),
			want:    []want{{"a", "10.0.0.2", ""}},
		},
		{
			name:    "refused addresses are never handed out",
			pending: []*corev1.Service{svcAt("d", "a", 1)},
			p:       pool(t, "range-global", "10.0.0.1-10.0.0.9"),
			refuse:  "10.0.0.1",
			want:    []want{{"a", "10.0.0.2", ""}},
		},
		{
			name:    "full pool: every later Service is told",
			pending: []*corev1.Service{svcAt("d", "a", 1), svcAt("d", "b", 2), svcAt("d", "c", 3)},
			p:       pool(t, "range-global", "10.0.0.1-10.0.0.2"),
			want:    []want{{"a", "10.0.0.1", ""}, {"b", "10.0.0.2", ""}, {"c", "", "pool range-global has no free ipv4 address"}},
		},
		{
			name: "RequireDualStack needs both; Prefer takes what there is",
			pending: []*corev1.Service{
				svcAt("d", "a", 1, dual(corev1.IPFamilyPolicyRequireDualStack, corev1.IPv6Protocol, corev1.IPv4Protocol)),
				svcAt("d", "b", 2, dual(corev1.IPFamilyPolicyRequireDualStack, corev1.IPv4Protocol, corev1.IPv6Protocol)),
				svcAt("d", "c", 3, dual(corev1.IPFamilyPolicyPreferDualStack, corev1.IPv4Protocol, corev1.IPv6Protocol)),
			},
			p: pool(t, "range-global", "10.0.0.1-10.0.0.3,2001:db8::1-2001:db8::1"),
			want: []want{{"a", "2001:db8::1,10.0.0.1", ""}, {"b", "", "pool range-global has no free ipv6 address"},
				{"c", "10.0.0.2", ""}},
		},
		{
			name:     "descending",
			existing: []*corev1.Service{svcAt("x", "old", 0, annotated("10.0.0.9"))},
			pending:  []*corev1.Service{svcAt("d", "a", 1)},
			p:        pool(t, "range-global", "10.0.0.1-10.0.0.9", desc),
			want:     []want{{"a", "10.0.0.8", ""}},
		},
		{
			name: "sharing: own namespace, no common port, not portless, claim of that namespace",
			existing: []*corev1.Service{
				svcAt("d", "web", 0, annotated("10.0.0.1"), ports(80)),
				svcAt("d", "dns", 0, annotated("10.0.0.2"), ports(53)),
				svcAt("e", "other", 0, annotated("10.0.0.3"), ports(9)),
				svcAt("d", "none", 0, annotated("10.0.0.4"), ports()),
			},
			claims: []*claim{{addr: netip.MustParseAddr("10.0.0.2"), namespace: "d", members: []string{"dns", "late"}}},
			pending: []*corev1.Service{
				svcAt("d", "a", 1, ports(80, 53)), // clashes with web and dns
				svcAt("d", "late", 2, ports(8080)),
				svcAt("e", "b", 3, ports(80)),
			},
			p: pool(t, "range-global", "10.0.0.1-10.0.0.9", share),
			want: []want{
				{"a", "10.0.0.5", ""},
				// web's address: the first that fits.
				{"late", "10.0.0.1", ""},
				{"e/b", "10.0.0.3", ""},
			},
		},
		{
			name:     "sharing waits for a claim written in this pass",
			existing: []*corev1.Service{},
			pending:  []*corev1.Service{svcAt("d", "a", 1, ports(80)), svcAt("d", "b", 2, ports(443))},
			p:        pool(t, "range-global", "10.0.0.1-10.0.0.9", share),
			want:     []want{{"a", "10.0.0.1", ""}, {"b", "", ""}},
		},
		{
			name:     "no sharing across a claim of another namespace",
			existing: []*corev1.Service{svcAt("d", "web", 0, annotated("10.0.0.1"), ports(80))},
			claims:   []*claim{{addr: netip.MustParseAddr("10.0.0.1"), namespace: "e"}},
			pending:  []*corev1.Service{svcAt("d", "a", 1, ports(443))},
			p:        pool(t, "range-global", "10.0.0.1-10.0.0.9", share),
			want:     []want{{"a", "10.0.0.2", ""}},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u := NewUsage(append(tc.existing, tc.pending...), tc.claims)
			var refuse func(netip.Addr) string
			if tc.refuse != "" {
				refuse = func(a netip.Addr) string {
					if a.String() == tc.refuse {
						return "refused"
					}
					return ""
				}
			}
			pl := NewPlanner(u, refuse)
			sortPending(tc.pending)
			for i, svc := range tc.pending {
				c, why := pl.Choose(svc, tc.p)
				got := joinAddrs(c.Addrs)
				w := tc.want[i]
				if name := svc.Name; w.svc != name && w.svc != svc.Namespace+"/"+name {
					t.Fatalf("order: got %s, want %s", name, w.svc)
				}
				if got != w.addrs || why != w.why {
					t.Errorf("%s: got %q %q, want %q %q", svc.Name, got, why, w.addrs, w.why)
				}
			}
		})
	}
}

// BenchmarkChoose: 10,000 of a 65,536-address pool used (the lowest ones,
// the worst case for a search that starts at the bottom).
func BenchmarkChoose(b *testing.B) {
	p := Pool{Key: "cidr-global", Ranges: []Range{{netip.MustParseAddr("10.8.0.0"), netip.MustParseAddr("10.8.255.255")}}}
	var existing []*corev1.Service
	a := p.Ranges[0].From
	for i := 0; i < 10_000; a = a.Next() {
		if skippedEnd(a) {
			continue
		}
		existing = append(existing, svcAt("ns", fmt.Sprintf("s%d", i), 0, annotated(a.String())))
		i++
	}
	pending := make([]*corev1.Service, 1000)
	for i := range pending {
		pending[i] = svcAt("ns", fmt.Sprintf("p%d", i), 1)
	}
	b.Run("usage of 10k Services", func(b *testing.B) {
		for b.Loop() {
			NewUsage(existing, nil)
		}
	})
	b.Run("one Service", func(b *testing.B) {
		u := NewUsage(existing, nil)
		for b.Loop() {
			c, why := NewPlanner(u, nil).Choose(pending[0], p)
			if why != "" || len(c.Addrs) != 1 {
				b.Fatal(why)
			}
			// Undo the commit so every iteration searches alike.
			delete(u.addrs, c.Addrs[0])
		}
	})
	b.Run("a pass of 1000 Services", func(b *testing.B) {
		for b.Loop() {
			pl := NewPlanner(NewUsage(existing, nil), nil)
			for _, s := range pending {
				if _, why := pl.Choose(s, p); why != "" {
					b.Fatal(why)
				}
			}
		}
	})
}
