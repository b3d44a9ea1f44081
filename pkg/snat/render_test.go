package snat

import (
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/pkg/model"
)

// renderText prints the chains iptRender returns as restore lines.
func renderText(chains map[string][]iptChain) string {
	var b strings.Builder
	for _, tbl := range iptTables {
		b.WriteString("*" + tbl + "\n")
		for _, c := range chains[tbl] {
			for _, r := range c.rules {
				b.WriteString("-A " + c.name + " " + r + "\n")
			}
		}
	}
	return b.String()
}

func renderFamily(f Family, d model.Datapath, o datapathOptions) map[string][]iptChain {
	if o.mark == 0 {
		o.mark = DefaultMark
	}
	fams, _ := normalize(d, nil, "")
	return iptRender(f, compile(fams[f]), o)
}

func TestIPTRender(t *testing.T) {
	d := model.Datapath{
		SNAT: []model.SNATRule{
			{Service: "default/sip", Pod: pod4, Source: lb4, Filter: ports(udp5060, tcp8080)},
			{Service: "f/f", Pod: podF, Source: lb4, Filter: model.Filter{Allow: prefixes("198.51.100.0/24"), Deny: prefixes("198.51.100.0/25")}},
			{Service: "default/sip", Pod: pod6, Source: lb6},
		},
		Steer:   []model.SteerRule{{Service: "s/s", Pod: pod4b}},
		Hold:    []model.HoldRule{{Service: "h/h", Pod: netip.MustParseAddr("10.244.1.8"), Filter: ports(udp5060)}},
		Exclude: []netip.Prefix{svcNet4, podNet6, podNet4},
	}
	got := renderText(renderFamily(IPv4, d, datapathOptions{}))
	want := `*raw
-A EGRESSVIP-RAW -m rpfilter -m comment --comment "egressvip: anti-spoofing" -j RETURN
-A EGRESSVIP-RAW -s 10.244.1.5/32 -m comment --comment "egressvip: anti-spoofing" -j DROP
-A EGRESSVIP-RAW -s 10.244.1.6/32 -m comment --comment "egressvip: anti-spoofing" -j DROP
-A EGRESSVIP-RAW -s 10.244.1.7/32 -m comment --comment "egressvip: anti-spoofing" -j DROP
-A EGRESSVIP-RAW -s 10.244.1.8/32 -m comment --comment "egressvip: anti-spoofing" -j DROP
*mangle
-A EGRESSVIP-PRE -d 10.96.0.0/12 -m comment --comment "egressvip: excluded destination" -j RETURN
-A EGRESSVIP-PRE -d 10.244.0.0/16 -m comment --comment "egressvip: excluded destination" -j RETURN
-A EGRESSVIP-PRE -m conntrack --ctorigdst 10.96.0.0/12 -m comment --comment "egressvip: excluded destination" -j RETURN
-A EGRESSVIP-PRE -m conntrack --ctorigdst 10.244.0.0/16 -m comment --comment "egressvip: excluded destination" -j RETURN
-A EGRESSVIP-PRE -s 10.244.1.6/32 -m comment --comment "s/s" -j MARK --set-xmark 0x1000/0x1000
-A EGRESSVIP-PRE -s 10.244.1.8/32 -p udp -m udp --dport 5060 -m comment --comment "h/h" -j DROP
*nat
-A EGRESSVIP-SNAT -m mark --mark 0x1000/0x1000 -m comment --comment "egressvip: steered, no NAT here" -j ACCEPT
-A EGRESSVIP-SNAT -d 10.96.0.0/12 -m comment --comment "egressvip: excluded destination" -j RETURN
-A EGRESSVIP-SNAT -d 10.244.0.0/16 -m comment --comment "egressvip: excluded destination" -j RETURN
-A EGRESSVIP-SNAT -m conntrack --ctorigdst 10.96.0.0/12 -m comment --comment "egressvip: excluded destination" -j RETURN
-A EGRESSVIP-SNAT -m conntrack --ctorigdst 10.244.0.0/16 -m comment --comment "egressvip: excluded destination" -j RETURN
-A EGRESSVIP-SNAT -s 10.244.1.5/32 -p tcp -m tcp --dport 8080 -m comment --comment "default/sip" -j SNAT --to-source 203.0.113.10
-A EGRESSVIP-SNAT -s 10.244.1.5/32 -p udp -m udp --dport 5060 -m comment --comment "default/sip" -j SNAT --to-source 203.0.113.10
-A EGRESSVIP-SNAT -s 10.244.1.7/32 -m comment --comment "f/f" -j EGRESSVIP-S-` + strings.ToUpper(compile(must1(normalize(d, nil, ""))[IPv4]).plans[podF].digest) + `
-A EGRESSVIP-S-` + strings.ToUpper(compile(must1(normalize(d, nil, ""))[IPv4]).plans[podF].digest) + ` -d 198.51.100.128/25 -m comment --comment "f/f" -j SNAT --to-source 203.0.113.10
`
	if got != want {
		t.Errorf("IPv4 render:\n%s\nwant:\n%s", got, want)
	}
	six := renderText(renderFamily(IPv6, d, datapathOptions{}))
	if strings.Contains(six, "10.244.") || !strings.Contains(six, `-A EGRESSVIP-SNAT -s fd00:10:244:1::5/128 -m comment --comment "default/sip" -j SNAT --to-source 2001:db8:1::10`) {
		t.Errorf("IPv6 render:\n%s", six)
	}
}

func must1[T any](v T, _ map[string]error) T { return v }

func TestIPTRenderDeterministic(t *testing.T) {
	var d model.Datapath
	d.Exclude = []netip.Prefix{podNet4, svcNet4, podNet6, podNet4}
	for i := range 50 {
		pod := netip.AddrFrom4([4]byte{10, 244, byte(i / 10), byte(i)})
		d.SNAT = append(d.SNAT, model.SNATRule{
			Service: "ns/svc" + string(rune('a'+i%26)), Pod: pod, Source: lb4,
			Filter: ports(udp5060, tcp8080, udp5060),
		})
	}
	want := renderText(renderFamily(IPv4, d, datapathOptions{}))
	rng := rand.New(rand.NewPCG(1, 2))
	for range 20 {
		s := model.Datapath{SNAT: slices.Clone(d.SNAT), Exclude: slices.Clone(d.Exclude)}
		rng.Shuffle(len(s.SNAT), func(i, j int) { s.SNAT[i], s.SNAT[j] = s.SNAT[j], s.SNAT[i] })
		rng.Shuffle(len(s.Exclude), func(i, j int) { s.Exclude[i], s.Exclude[j] = s.Exclude[j], s.Exclude[i] })
		if got := renderText(renderFamily(IPv4, s, datapathOptions{})); got != want {
			t.Fatalf("shuffled input rendered differently:\n%s\nwant:\n%s", got, want)
		}
	}
	if n := strings.Count(want, "-d 10.244.0.0/16"); n != 2 {
		t.Errorf("duplicate exclusion not collapsed: %d RETURN rules", n)
	}
	if n := strings.Count(want, "-j SNAT"); n != 100 {
		t.Errorf("want 2 rules per pod (duplicate port collapsed), got %d", n)
	}
}

func TestChainNamesFit(t *testing.T) {
	names := []string{Chain, ChainPre, ChainRaw, ChainFwd, ChainGate, chainSNATPrefix + strings.Repeat("F", 12), chainPrePrefix + strings.Repeat("F", 12)}
	for _, c := range names {
		if len(c) >= 29 || !strings.HasPrefix(c, ChainPrefix) {
			t.Errorf("chain %q: want prefix %q and at most 28 characters", c, ChainPrefix)
		}
	}
	if d := chainDigest([]clause{{service: "a/b", kind: kindSNAT}}); len(d) != 12 {
		t.Errorf("digest %q: want 12 hex digits", d)
	}
}

func BenchmarkRender1000Services(b *testing.B) {
	var d model.Datapath
	d.Exclude = []netip.Prefix{podNet4, svcNet4}
	for i := range 1000 {
		r := model.SNATRule{
			Service: "namespace-" + string(rune('a'+i%26)) + "/service",
			Pod:     netip.AddrFrom4([4]byte{10, 244, byte(i >> 8), byte(i)}),
			Source:  netip.AddrFrom4([4]byte{203, 0, 113, byte(i)}),
		}
		if i%2 == 0 {
			r.Filter = ports(udp5060)
		}
		d.SNAT = append(d.SNAT, r)
	}
	b.ReportAllocs()
	var n int
	for b.Loop() {
		n = len(renderText(renderFamily(IPv4, d, datapathOptions{})))
	}
	b.ReportMetric(float64(n), "bytes")
}

var _ = annotations.UDP
