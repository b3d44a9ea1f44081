package snat

import (
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"

	"github.com/egressvip/egressvip/pkg/annotations"
)

var (
	pod4    = netip.MustParseAddr("10.244.1.5")
	pod4b   = netip.MustParseAddr("10.244.1.6")
	pod6    = netip.MustParseAddr("fd00:10:244:1::5")
	lb4     = netip.MustParseAddr("203.0.113.10")
	lb4b    = netip.MustParseAddr("203.0.113.11")
	lb6     = netip.MustParseAddr("2001:db8:1::10")
	ext4    = netip.MustParseAddr("198.51.100.9")
	ext6    = netip.MustParseAddr("2001:db8:2::9")
	podNet4 = netip.MustParsePrefix("10.244.0.0/16")
	svcNet4 = netip.MustParsePrefix("10.96.0.0/12")
	podNet6 = netip.MustParsePrefix("fd00:10:244::/56")
	udp5060 = annotations.DestinationPort{Protocol: annotations.UDP, Port: 5060}
	tcp8080 = annotations.DestinationPort{Protocol: annotations.TCP, Port: 8080}
)

func TestRender(t *testing.T) {
	tests := []struct {
		name   string
		family Family
		d      Desired
		want   string
	}{{
		name:   "empty chain still declared",
		family: IPv4,
		want:   "*nat\n:EGRESSVIP-SNAT - [0:0]\nCOMMIT\n",
	}, {
		name:   "IPv4 all traffic",
		family: IPv4,
		d:      Desired{Rules: []Rule{{Service: "default/sip", PodIP: pod4, SourceIP: lb4}}},
		want: "*nat\n:EGRESSVIP-SNAT - [0:0]\n" +
			`-A EGRESSVIP-SNAT -s 10.244.1.5/32 -m comment --comment "default/sip" -j SNAT --to-source 203.0.113.10` + "\n" +
			"COMMIT\n",
	}, {
		name:   "IPv4 ports sorted, exclusions first and only of the family",
		family: IPv4,
		d: Desired{
			Rules:   []Rule{{Service: "default/sip", PodIP: pod4, SourceIP: lb4, Ports: []annotations.DestinationPort{udp5060, tcp8080}}},
			Exclude: []netip.Prefix{svcNet4, podNet6, podNet4},
		},
		want: "*nat\n:EGRESSVIP-SNAT - [0:0]\n" +
			`-A EGRESSVIP-SNAT -d 10.96.0.0/12 -m comment --comment "egressvip: excluded destination" -j RETURN` + "\n" +
			`-A EGRESSVIP-SNAT -d 10.244.0.0/16 -m comment --comment "egressvip: excluded destination" -j RETURN` + "\n" +
			`-A EGRESSVIP-SNAT -s 10.244.1.5/32 -p tcp -m tcp --dport 8080 -m comment --comment "default/sip" -j SNAT --to-source 203.0.113.10` + "\n" +
			`-A EGRESSVIP-SNAT -s 10.244.1.5/32 -p udp -m udp --dport 5060 -m comment --comment "default/sip" -j SNAT --to-source 203.0.113.10` + "\n" +
			"COMMIT\n",
	}, {
		name:   "IPv6 only takes IPv6 rules and exclusions",
		family: IPv6,
		d: Desired{
			Rules: []Rule{
				{Service: "default/sip", PodIP: pod4, SourceIP: lb4},
				{Service: "default/sip", PodIP: pod6, SourceIP: lb6, Ports: []annotations.DestinationPort{udp5060}},
			},
			Exclude: []netip.Prefix{podNet4, podNet6},
		},
		want: "*nat\n:EGRESSVIP-SNAT - [0:0]\n" +
			`-A EGRESSVIP-SNAT -d fd00:10:244::/56 -m comment --comment "egressvip: excluded destination" -j RETURN` + "\n" +
			`-A EGRESSVIP-SNAT -s fd00:10:244:1::5/128 -p udp -m udp --dport 5060 -m comment --comment "default/sip" -j SNAT --to-source 2001:db8:1::10` + "\n" +
			"COMMIT\n",
	}, {
		name:   "invalid and mixed-family rules are dropped, comments sanitised",
		family: IPv4,
		d: Desired{Rules: []Rule{
			{Service: "a/mixed", PodIP: pod4, SourceIP: lb6},
			{Service: "a/nopod", SourceIP: lb4},
			{Service: "a/\"quote\"", PodIP: pod4, SourceIP: lb4},
		}},
		want: "*nat\n:EGRESSVIP-SNAT - [0:0]\n" +
			`-A EGRESSVIP-SNAT -s 10.244.1.5/32 -m comment --comment "a/_quote_" -j SNAT --to-source 203.0.113.10` + "\n" +
			"COMMIT\n",
	}}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := string(Render(tc.family, tc.d))
			if got != tc.want {
				t.Errorf("Render:\n%s\nwant:\n%s", got, tc.want)
			}
			// What we render must read back as the same state.
			tbl, err := ParseSave([]byte(got))
			if err != nil {
				t.Fatalf("ParseSave(Render): %v", err)
			}
			if again := string(Render(tc.family, tbl.Owned())); again != got {
				t.Errorf("Render(ParseSave(Render)) differs:\n%s", again)
			}
		})
	}
}

func TestRenderDeterministic(t *testing.T) {
	d := Desired{Exclude: []netip.Prefix{podNet4, svcNet4, podNet6, podNet4}}
	for i := range 50 {
		pod := netip.AddrFrom4([4]byte{10, 244, byte(i / 10), byte(i)})
		d.Rules = append(d.Rules, Rule{
			Service: "ns/svc" + string(rune('a'+i%26)), PodIP: pod, SourceIP: lb4,
			Ports: []annotations.DestinationPort{udp5060, tcp8080, udp5060},
		})
	}
	want := Render(IPv4, d)
	rng := rand.New(rand.NewPCG(1, 2))
	for range 20 {
		s := Desired{Rules: append([]Rule(nil), d.Rules...), Exclude: append([]netip.Prefix(nil), d.Exclude...)}
		rng.Shuffle(len(s.Rules), func(i, j int) { s.Rules[i], s.Rules[j] = s.Rules[j], s.Rules[i] })
		rng.Shuffle(len(s.Exclude), func(i, j int) { s.Exclude[i], s.Exclude[j] = s.Exclude[j], s.Exclude[i] })
		if got := Render(IPv4, s); string(got) != string(want) {
			t.Fatalf("shuffled input rendered differently:\n%s\nwant:\n%s", got, want)
		}
	}
	if n := strings.Count(string(want), "RETURN"); n != 2 {
		t.Errorf("duplicate exclusion not collapsed: %d RETURN rules", n)
	}
	if n := strings.Count(string(want), "-j SNAT"); n != 100 {
		t.Errorf("want 2 rules per pod (duplicate port collapsed), got %d", n)
	}
}

func TestChainNamesFit(t *testing.T) {
	for _, c := range []string{Chain} {
		if len(c) >= 28 || !strings.HasPrefix(c, ChainPrefix) {
			t.Errorf("chain %q: want prefix %q and fewer than 28 characters", c, ChainPrefix)
		}
	}
}

func BenchmarkRender1000Services(b *testing.B) {
	d := Desired{Exclude: []netip.Prefix{podNet4, svcNet4}}
	for i := range 1000 {
		d.Rules = append(d.Rules, Rule{
			Service:  "namespace-" + string(rune('a'+i%26)) + "/service",
			PodIP:    netip.AddrFrom4([4]byte{10, 244, byte(i >> 8), byte(i)}),
			SourceIP: netip.AddrFrom4([4]byte{203, 0, 113, byte(i)}),
		})
		if i%2 == 0 {
			d.Rules[i].Ports = []annotations.DestinationPort{udp5060}
		}
	}
	b.ReportAllocs()
	var n int
	for b.Loop() {
		n = len(Render(IPv4, d))
	}
	b.ReportMetric(float64(n), "bytes")
}
