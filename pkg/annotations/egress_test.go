package annotations

import (
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// wantProblem is what a test expects of one Problem: its annotation, reason,
// severity and a piece of its message.
type wantProblem struct {
	annotation string
	reason     string
	fatal      bool
	says       string
}

func prefixes(ss ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParsePrefix(s)
	}
	return out
}

// config is ParseEgress's result for no annotations, changed by mod.
func config(mod func(*EgressConfig)) EgressConfig {
	c := EgressConfig{FlushConntrack: true}
	if mod != nil {
		mod(&c)
	}
	return c
}

// on is an IPv4 egress Service; ann adds to kube-vip.io/egress: "true".
func on(kv ...string) map[string]string {
	m := map[string]string{Egress: "true"}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return m
}

func enabled(c *EgressConfig) { c.Enabled, c.IPv4 = true, true }

// broken is an egress Service with a fatal problem: asked for, nothing egressed.
func broken(c *EgressConfig) { c.Enabled = true }

func invalid(name, says string) []wantProblem {
	return []wantProblem{{name, ReasonInvalid, true, says}}
}

func TestParseEgress(t *testing.T) {
	for _, tc := range []struct {
		name     string
		ann      map[string]string
		want     EgressConfig
		problems []wantProblem
	}{
		// kube-vip.io/egress
		{name: "no annotations", ann: nil, want: config(nil)},
		{name: "egress true", ann: on(), want: config(enabled)},
		{name: "egress false", ann: map[string]string{Egress: "false"}, want: config(nil)},
		{name: "egress True is not kube-vip's true", ann: map[string]string{Egress: "True"}, want: config(nil),
			problems: invalid(Egress, `want "true" or "false"`)},
		{name: "egress with spaces", ann: map[string]string{Egress: " true"}, want: config(nil),
			problems: invalid(Egress, `" true"`)},
		{name: "egress 1", ann: map[string]string{Egress: "1"}, want: config(nil), problems: invalid(Egress, `"1"`)},
		{name: "egress empty", ann: map[string]string{Egress: ""}, want: config(nil), problems: invalid(Egress, `""`)},

		// kube-vip.io/egress-ipv6
		{name: "ipv6 means IPv6 instead of IPv4, as in kube-vip", ann: on(EgressIPv6, "true"),
			want: config(func(c *EgressConfig) { enabled(c); c.IPv4, c.IPv6 = false, true })},
		{name: "families: both", ann: on(EgressFamilies, "ipv4,ipv6"),
			want: config(func(c *EgressConfig) { enabled(c); c.IPv6 = true })},
		{name: "families: both, agreeing with ipv6", ann: on(EgressFamilies, " ipv6 , ipv4", EgressIPv6, "true"),
			want: config(func(c *EgressConfig) { enabled(c); c.IPv6 = true })},
		{name: "families: ipv6 only", ann: on(EgressFamilies, "ipv6"),
			want: config(func(c *EgressConfig) { enabled(c); c.IPv4, c.IPv6 = false, true })},
		{name: "families disagreeing with ipv6", ann: on(EgressFamilies, "ipv4", EgressIPv6, "true"), want: config(broken),
			problems: invalid(EgressFamilies, "disagrees")},
		{name: "families garbage", ann: on(EgressFamilies, "ipv5"), want: config(broken), problems: invalid(EgressFamilies, "not a family")},
		{name: "ipv6 false", ann: on(EgressIPv6, "false"), want: config(enabled)},
		{name: "ipv6 without egress egresses nothing", ann: map[string]string{EgressIPv6: "true"}, want: config(nil)},
		{name: "ipv6 TRUE", ann: on(EgressIPv6, "TRUE"), want: config(broken), problems: invalid(EgressIPv6, `"TRUE"`)},
		{name: "ipv6 yes", ann: on(EgressIPv6, "yes"), want: config(broken), problems: invalid(EgressIPv6, "no egress is programmed")},

		// kube-vip.io/egress-destination-ports
		{name: "destination ports sorted", ann: on(EgressDestinationPorts, "udp:5060,tcp:8080"),
			want: config(func(c *EgressConfig) { enabled(c); c.Ports = []DestinationPort{{TCP, 8080}, {UDP, 5060}} })},
		{name: "destination ports case and spaces", ann: on(EgressDestinationPorts, " TCP:80 , udp:53 ,SCTP:9"),
			want: config(func(c *EgressConfig) { enabled(c); c.Ports = []DestinationPort{{SCTP, 9}, {TCP, 80}, {UDP, 53}} })},
		{name: "destination port bounds", ann: on(EgressDestinationPorts, "tcp:1,udp:65535"),
			want: config(func(c *EgressConfig) { enabled(c); c.Ports = []DestinationPort{{TCP, 1}, {UDP, 65535}} })},
		{name: "destination ports empty widen nothing", ann: on(EgressDestinationPorts, ""), want: config(broken),
			problems: invalid(EgressDestinationPorts, "is empty")},
		{name: "destination ports blank", ann: on(EgressDestinationPorts, "  "), want: config(broken),
			problems: invalid(EgressDestinationPorts, "is empty")},
		{name: "bare destination port", ann: on(EgressDestinationPorts, "8080"), want: config(broken),
			problems: invalid(EgressDestinationPorts, "want protocol:port")},
		{name: "destination port 0", ann: on(EgressDestinationPorts, "tcp:0"), want: config(broken),
			problems: invalid(EgressDestinationPorts, "out of range")},
		{name: "destination port 65536", ann: on(EgressDestinationPorts, "tcp:65536"), want: config(broken),
			problems: invalid(EgressDestinationPorts, "out of range")},
		{name: "destination port icmp", ann: on(EgressDestinationPorts, "icmp:1"), want: config(broken),
			problems: invalid(EgressDestinationPorts, "unknown protocol")},
		{name: "destination ports trailing comma", ann: on(EgressDestinationPorts, "tcp:80,"), want: config(broken),
			problems: invalid(EgressDestinationPorts, "empty")},
		{name: "one bad destination port spoils all", ann: on(EgressDestinationPorts, "tcp:80,udp:x"), want: config(broken),
			problems: invalid(EgressDestinationPorts, "not a decimal")},

		// kube-vip.io/egress-source-ports
		{name: "source ports", ann: on(EgressSourcePorts, "tcp:443, udp:5060"),
			want: config(func(c *EgressConfig) { enabled(c); c.SourcePorts = []DestinationPort{{TCP, 443}, {UDP, 5060}} })},
		{name: "source ports with flush", ann: on(EgressSourcePorts, "tcp:443", FlushConntrack, "true"),
			want: config(func(c *EgressConfig) { enabled(c); c.SourcePorts = []DestinationPort{{TCP, 443}} })},
		{name: "bare source port panics kube-vip, refused here", ann: on(EgressSourcePorts, "443"), want: config(broken),
			problems: invalid(EgressSourcePorts, "want protocol:port")},
		{name: "source ports empty", ann: on(EgressSourcePorts, ""), want: config(broken),
			problems: invalid(EgressSourcePorts, "is empty")},

		// kube-vip.io/egress-allowed-networks
		{name: "allowed network", ann: on(EgressAllowedNetworks, "192.0.2.0/24"),
			want: config(func(c *EgressConfig) { enabled(c); c.Allow = prefixes("192.0.2.0/24") })},
		{name: "allowed both families, sorted, spaces", ann: on(EgressFamilies, "ipv4,ipv6", EgressAllowedNetworks, " 2001:db8::/32 , 198.51.100.0/24,192.0.2.0/24"),
			want: config(func(c *EgressConfig) {
				enabled(c)
				c.IPv6 = true
				c.Allow = prefixes("192.0.2.0/24", "198.51.100.0/24", "2001:db8::/32")
			})},
		{name: "allowed bare addresses", ann: on(EgressAllowedNetworks, "192.0.2.7,2001:db8::7"),
			want: config(func(c *EgressConfig) { enabled(c); c.Allow = prefixes("192.0.2.7/32", "2001:db8::7/128") })},
		{name: "allowed duplicates collapse", ann: on(EgressAllowedNetworks, "192.0.2.0/24,192.0.2.0/24,192.0.2.0/25"),
			want: config(func(c *EgressConfig) { enabled(c); c.Allow = prefixes("192.0.2.0/24", "192.0.2.0/25") })},
		{name: "allowed everything", ann: on(EgressAllowedNetworks, "0.0.0.0/0,::/0"),
			want: config(func(c *EgressConfig) { enabled(c); c.Allow = prefixes("0.0.0.0/0", "::/0") })},
		{name: "allowed IPv4 only with IPv6 egress: nothing of IPv6", ann: on(EgressFamilies, "ipv4,ipv6", EgressAllowedNetworks, "192.0.2.0/24"),
			want:     config(func(c *EgressConfig) { enabled(c); c.IPv6 = true; c.Allow = prefixes("192.0.2.0/24") }),
			problems: []wantProblem{{EgressAllowedNetworks, ReasonNothingAllowed, false, "none of the pods' IPv6 traffic"}}},
		{name: "allowed IPv6 only: nothing of IPv4", ann: on(EgressAllowedNetworks, "2001:db8::/32"),
			want:     config(func(c *EgressConfig) { enabled(c); c.Allow = prefixes("2001:db8::/32") }),
			problems: []wantProblem{{EgressAllowedNetworks, ReasonNothingAllowed, false, "none of the pods' IPv4 traffic"}}},
		{name: "allowed without egress says nothing of families", ann: map[string]string{EgressAllowedNetworks: "2001:db8::/32"},
			want: config(func(c *EgressConfig) { c.Allow = prefixes("2001:db8::/32") })},
		{name: "allowed host bits", ann: on(EgressAllowedNetworks, "192.0.2.1/24"), want: config(broken),
			problems: invalid(EgressAllowedNetworks, "write 192.0.2.0/24 for the network, or 192.0.2.1 for the address")},
		{name: "allowed IPv6 host bits", ann: on(EgressAllowedNetworks, "2001:db8::1/32"), want: config(broken),
			problems: invalid(EgressAllowedNetworks, "host bits")},
		{name: "allowed mapped network", ann: on(EgressAllowedNetworks, "::ffff:192.0.2.0/120"), want: config(broken),
			problems: invalid(EgressAllowedNetworks, "IPv4-mapped")},
		{name: "allowed mapped address", ann: on(EgressAllowedNetworks, "::ffff:192.0.2.1"), want: config(broken),
			problems: invalid(EgressAllowedNetworks, "write 192.0.2.1")},
		{name: "allowed zone", ann: on(EgressAllowedNetworks, "fe80::1%eth0"), want: config(broken),
			problems: invalid(EgressAllowedNetworks, "zone")},
		{name: "allowed prefix too long", ann: on(EgressAllowedNetworks, "192.0.2.0/33"), want: config(broken),
			problems: invalid(EgressAllowedNetworks, "CIDR notation")},
		{name: "allowed hostname", ann: on(EgressAllowedNetworks, "example.com"), want: config(broken),
			problems: invalid(EgressAllowedNetworks, "not an IP address or network")},
		{name: "allowed semicolons", ann: on(EgressAllowedNetworks, "10.0.0.0/8;192.168.0.0/16"), want: config(broken),
			problems: invalid(EgressAllowedNetworks, "CIDR notation")},
		{name: "allowed space separated", ann: on(EgressAllowedNetworks, "10.0.0.0/8 192.168.0.0/16"), want: config(broken),
			problems: invalid(EgressAllowedNetworks, "CIDR notation")},
		{name: "allowed leading zero", ann: on(EgressAllowedNetworks, "010.0.0.0/8"), want: config(broken),
			problems: invalid(EgressAllowedNetworks, "CIDR notation")},
		{name: "allowed trailing comma", ann: on(EgressAllowedNetworks, "10.0.0.0/8,"), want: config(broken),
			problems: invalid(EgressAllowedNetworks, "item 2 is empty")},
		{name: "allowed empty is not 'no filter'", ann: on(EgressAllowedNetworks, ""), want: config(broken),
			problems: invalid(EgressAllowedNetworks, "is empty")},
		{name: "allowed blank", ann: on(EgressAllowedNetworks, " \t"), want: config(broken),
			problems: invalid(EgressAllowedNetworks, "is empty")},

		// kube-vip.io/egress-denied-networks
		{name: "denied both families", ann: on(EgressDeniedNetworks, "2001:db8:ffff::/48, 203.0.113.0/24 ,198.51.100.9"),
			want: config(func(c *EgressConfig) {
				enabled(c)
				c.Deny = prefixes("198.51.100.9/32", "203.0.113.0/24", "2001:db8:ffff::/48")
			})},
		{name: "denied and allowed", ann: on(EgressAllowedNetworks, "10.0.0.0/8", EgressDeniedNetworks, "10.1.0.0/16"),
			want: config(func(c *EgressConfig) { enabled(c); c.Allow = prefixes("10.0.0.0/8"); c.Deny = prefixes("10.1.0.0/16") })},
		{name: "denied host bits", ann: on(EgressDeniedNetworks, "10.1.2.3/8"), want: config(broken),
			problems: invalid(EgressDeniedNetworks, "host bits")},
		{name: "denied empty", ann: on(EgressDeniedNetworks, ""), want: config(broken),
			problems: invalid(EgressDeniedNetworks, "is empty")},
		{name: "denied garbage", ann: on(EgressDeniedNetworks, "10.0.0.0/8,nope"), want: config(broken),
			problems: invalid(EgressDeniedNetworks, `"nope"`)},

		// kube-vip.io/egress-internal
		{name: "internal true", ann: on(EgressInternal, "true"), want: config(func(c *EgressConfig) { enabled(c); c.Internal = true })},
		{name: "internal false", ann: on(EgressInternal, "false"), want: config(enabled)},
		{name: "internal yes", ann: on(EgressInternal, "yes"), want: config(broken), problems: invalid(EgressInternal, `"yes"`)},

		// kube-vip.io/egress-no-internal-traffic
		{name: "no internal traffic true: accepted, reported", ann: on(EgressNoInternalTraffic, "true"),
			want:     config(func(c *EgressConfig) { enabled(c); c.NoInternalTraffic = true }),
			problems: []wantProblem{{EgressNoInternalTraffic, ReasonDiffers, false, "never SNATs traffic to the pod and Service CIDRs"}}},
		{name: "no internal traffic false", ann: on(EgressNoInternalTraffic, "false"), want: config(enabled)},
		{name: "no internal traffic 1", ann: on(EgressNoInternalTraffic, "1"), want: config(broken),
			problems: invalid(EgressNoInternalTraffic, `"1"`)},

		// kube-vip.io/egress-detect-api-server
		{name: "detect api server", ann: on(EgressDetectAPIServer, "true"), want: config(func(c *EgressConfig) { enabled(c); c.DetectAPIServer = true })},
		{name: "detect api server false", ann: on(EgressDetectAPIServer, "false"), want: config(enabled)},
		{name: "detect api server on", ann: on(EgressDetectAPIServer, "on"), want: config(broken),
			problems: invalid(EgressDetectAPIServer, `"on"`)},

		// kube-vip.io/flush-conntrack
		{name: "flush conntrack true", ann: on(FlushConntrack, "true"), want: config(enabled)},
		{name: "flush conntrack false", ann: on(FlushConntrack, "false"), want: config(func(c *EgressConfig) { enabled(c); c.FlushConntrack = false })},
		{name: "flush conntrack no", ann: on(FlushConntrack, "no"), want: config(broken), problems: invalid(FlushConntrack, `"no"`)},

		// egressvip.io/egress-strict
		{name: "strict", ann: on(EgressStrict, "true"), want: config(func(c *EgressConfig) { enabled(c); c.Strict = true })},
		{name: "strict false", ann: on(EgressStrict, "false"), want: config(enabled)},
		{name: "strict True", ann: on(EgressStrict, "True"), want: config(broken), problems: invalid(EgressStrict, `"True"`)},

		// unknown and kube-vip-written names
		{name: "unknown kube-vip egress annotation", ann: on("kube-vip.io/egress-foo", "bar"), want: config(broken),
			problems: []wantProblem{{"kube-vip.io/egress-foo", ReasonUnknown, true, "unknown egress annotation"}}},
		{name: "kube-vip's unreleased egress-internal-traffic", ann: on("kube-vip.io/egress-internal-traffic", "true"), want: config(broken),
			problems: []wantProblem{{"kube-vip.io/egress-internal-traffic", ReasonUnknown, true, "no egress is programmed"}}},
		{name: "egress prefix without dash", ann: on("kube-vip.io/egressfoo", ""), want: config(broken),
			problems: []wantProblem{{"kube-vip.io/egressfoo", ReasonUnknown, true, `""`}}},
		{name: "case typo of a known name", ann: on("kube-vip.io/Egress-allowed-networks", "10.0.0.0/8"), want: config(broken),
			problems: []wantProblem{{"kube-vip.io/Egress-allowed-networks", ReasonUnknown, true, "unknown egress annotation"}}},
		{name: "egressvip typo", ann: on("egressvip.io/egress-stric", "true"), want: config(broken),
			problems: []wantProblem{{"egressvip.io/egress-stric", ReasonUnknown, true, "unknown"}}},
		{name: "unknown reported without egress too", ann: map[string]string{"KUBE-VIP.IO/EGRESS": "true"}, want: config(nil),
			problems: []wantProblem{{"KUBE-VIP.IO/EGRESS", ReasonUnknown, true, "unknown"}}},
		{name: "unknown names in order", ann: on("kube-vip.io/egress-z", "1", "kube-vip.io/egress-a", "2"), want: config(broken),
			problems: []wantProblem{{"kube-vip.io/egress-a", ReasonUnknown, true, `"2"`}, {"kube-vip.io/egress-z", ReasonUnknown, true, `"1"`}}},
		{name: "written by kube-vip and the leader", ann: on(EgressNftablesTable, "kube_vip", ActiveEndpoint, "10.244.1.5",
			ActiveEndpointIPv6, "fd00::5", VIPHost, "node-1", LoadBalancerIPs, "203.0.113.10", Ignore, "false"),
			want: config(enabled)},
		{name: "other domains are not egress", ann: on("example.com/egress-foo", "x", "egressvip.io/role", "x", "kube-vip.io/serviceInterface", "eth1"),
			want: config(enabled)},

		// several at once
		{name: "everything", ann: on(EgressFamilies, "ipv4,ipv6", EgressIPv6, "true", EgressDestinationPorts, "udp:5060", EgressSourcePorts, "udp:5060",
			EgressAllowedNetworks, "192.0.2.0/24,2001:db8::/32", EgressDeniedNetworks, "192.0.2.128/25", EgressInternal, "true",
			EgressDetectAPIServer, "true", FlushConntrack, "true", EgressStrict, "true", EgressNftablesTable, "kube_vip_a"),
			want: config(func(c *EgressConfig) {
				*c = EgressConfig{Enabled: true, IPv4: true, IPv6: true, Ports: []DestinationPort{{UDP, 5060}},
					SourcePorts: []DestinationPort{{UDP, 5060}}, Allow: prefixes("192.0.2.0/24", "2001:db8::/32"),
					Deny: prefixes("192.0.2.128/25"), Internal: true, DetectAPIServer: true, FlushConntrack: true, Strict: true}
			})},
		{name: "every bad value is reported, in order", ann: on(EgressIPv6, "True", EgressDestinationPorts, "tcp:0",
			EgressDeniedNetworks, "x", "kube-vip.io/egress-foo", "y"),
			want: config(broken),
			problems: []wantProblem{invalid(EgressIPv6, "")[0], invalid(EgressDestinationPorts, "")[0], invalid(EgressDeniedNetworks, "")[0],
				{"kube-vip.io/egress-foo", ReasonUnknown, true, ""}}},
		{name: "a fatal problem keeps what parsed, egresses nothing", ann: on(EgressIPv6, "true", EgressStrict, "true", EgressAllowedNetworks, "192.0.2.0/24", EgressDeniedNetworks, "bad"),
			want:     config(func(c *EgressConfig) { broken(c); c.Strict = true; c.Allow = prefixes("192.0.2.0/24") }),
			problems: invalid(EgressDeniedNetworks, "no egress is programmed for this Service")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, problems := ParseEgress(tc.ann)
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("config\n got %+v\nwant %+v", got, tc.want)
			}
			if len(problems) != len(tc.problems) {
				t.Fatalf("problems %v, want %d", problems, len(tc.problems))
			}
			for i, w := range tc.problems {
				p := problems[i]
				if p.Annotation != w.annotation || p.Reason != w.reason || p.Fatal != w.fatal || !strings.Contains(p.Message, w.says) {
					t.Errorf("problem %d = %+v, want %+v", i, p, w)
				}
				if p.Value != tc.ann[p.Annotation] || !strings.HasPrefix(p.Message, p.Annotation+": ") || p.String() != p.Message {
					t.Errorf("problem %d does not name its annotation and value: %+v", i, p)
				}
			}
			if HasFatal(problems) && (got.IPv4 || got.IPv6) {
				t.Errorf("fatal problem but egress on: %+v", got)
			}
		})
	}
}

func TestProblemMessageShortensHugeValues(t *testing.T) {
	huge := strings.Repeat("é", 5000)
	_, problems := ParseEgress(on("kube-vip.io/egress-x", huge))
	if len(problems) != 1 {
		t.Fatalf("problems %v", problems)
	}
	p := problems[0]
	if p.Value != huge || len(p.Message) > 400 || !strings.Contains(p.Message, "(10000 bytes)") || !strings.Contains(p.Message, "é…") {
		t.Fatalf("message %q", p.Message)
	}
}

func TestParseNetworks(t *testing.T) {
	for _, tc := range []struct {
		name    string
		in      string
		want    []netip.Prefix
		wantErr string
	}{
		{name: "empty", in: ""},
		{name: "blank", in: " "},
		{name: "one", in: "10.0.0.0/8", want: prefixes("10.0.0.0/8")},
		{name: "host routes", in: "10.0.0.1/32,2001:db8::1/128", want: prefixes("10.0.0.1/32", "2001:db8::1/128")},
		{name: "bare", in: "10.0.0.1, 2001:db8::1", want: prefixes("10.0.0.1/32", "2001:db8::1/128")},
		{name: "bare and routed duplicate", in: "10.0.0.1,10.0.0.1/32", want: prefixes("10.0.0.1/32")},
		{name: "sorted by address then length", in: "10.0.0.0/16,10.0.0.0/8,9.0.0.0/8", want: prefixes("9.0.0.0/8", "10.0.0.0/8", "10.0.0.0/16")},
		{name: "tab and newline around items", in: "\t10.0.0.0/8\n,\n192.168.0.0/16", want: prefixes("10.0.0.0/8", "192.168.0.0/16")},
		{name: "host bits", in: "10.0.0.1/8", wantErr: "host bits"},
		{name: "space inside", in: "10.0.0.0 /8", wantErr: "CIDR notation"},
		{name: "bits leading zero", in: "10.0.0.0/08", wantErr: "CIDR notation"},
		{name: "negative bits", in: "10.0.0.0/-1", wantErr: "CIDR notation"},
		{name: "ipv6 too long", in: "2001:db8::/129", wantErr: "CIDR notation"},
		{name: "empty middle", in: "10.0.0.0/8,,192.168.0.0/16", wantErr: "item 2 is empty"},
		{name: "leading comma", in: ",10.0.0.0/8", wantErr: "item 1 is empty"},
		{name: "mapped", in: "::ffff:10.0.0.0/104", wantErr: "IPv4-mapped"},
		{name: "zone in prefix", in: "fe80::/64%eth0", wantErr: "CIDR notation"},
		{name: "zone", in: "fe80::1%eth0", wantErr: "zone"},
		{name: "one bad spoils all", in: "10.0.0.0/8,300.0.0.0/8", wantErr: "300.0.0.0/8"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseNetworks(tc.in)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want %q", err, tc.wantErr)
				}
				if got != nil {
					t.Fatalf("partial result %v on error", got)
				}
				return
			}
			if err != nil || !slices.Equal(got, tc.want) {
				t.Fatalf("got %v, %v; want %v", got, err, tc.want)
			}
		})
	}
}

func TestAllowedAndDeniedFor(t *testing.T) {
	c := EgressConfig{Allow: prefixes("192.0.2.0/24", "2001:db8::/32"), Deny: prefixes("198.51.100.0/24")}
	if nets, restricted := c.AllowedFor(false); !restricted || !slices.Equal(nets, prefixes("192.0.2.0/24")) {
		t.Errorf("IPv4 allowed %v %v", nets, restricted)
	}
	if nets, restricted := c.AllowedFor(true); !restricted || !slices.Equal(nets, prefixes("2001:db8::/32")) {
		t.Errorf("IPv6 allowed %v %v", nets, restricted)
	}
	if nets := c.DeniedFor(true); nets != nil {
		t.Errorf("IPv6 denied %v", nets)
	}
	if nets := c.DeniedFor(false); !slices.Equal(nets, prefixes("198.51.100.0/24")) {
		t.Errorf("IPv4 denied %v", nets)
	}
	v4only := EgressConfig{Allow: prefixes("192.0.2.0/24")}
	if nets, restricted := v4only.AllowedFor(true); !restricted || len(nets) != 0 {
		t.Errorf("an IPv4-only allow list must restrict IPv6 to nothing: %v %v", nets, restricted)
	}
	if _, restricted := (EgressConfig{}).AllowedFor(false); restricted {
		t.Error("no allow list restricts nothing")
	}
}

func TestIgnore(t *testing.T) {
	for _, tc := range []struct {
		name        string
		ann         map[string]string
		want        bool
		wantProblem bool
	}{
		{name: "absent"},
		{name: "nil annotations", ann: nil},
		{name: "true", ann: map[string]string{Ignore: "true"}, want: true},
		{name: "false", ann: map[string]string{Ignore: "false"}},
		{name: "True is served, as kube-vip does, and reported", ann: map[string]string{Ignore: "True"}, wantProblem: true},
		{name: "spaces", ann: map[string]string{Ignore: " true "}, wantProblem: true},
		{name: "empty", ann: map[string]string{Ignore: ""}, wantProblem: true},
		{name: "ignore-service-security is another annotation", ann: map[string]string{"kube-vip.io/ignore-service-security": "true"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, problems := ParseIgnore(tc.ann)
			if got != tc.want || (len(problems) > 0) != tc.wantProblem {
				t.Fatalf("got %v, %v; want %v, problem %v", got, problems, tc.want, tc.wantProblem)
			}
			for _, p := range problems {
				if p.Fatal || p.Annotation != Ignore || p.Reason != ReasonInvalid {
					t.Fatalf("problem %+v", p)
				}
			}
			svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Annotations: tc.ann}}
			if Ignored(svc) != tc.want {
				t.Fatalf("Ignored = %v", !tc.want)
			}
		})
	}
}

// networkTokens returns what a list annotation's items parse to on their own,
// independently of ParseNetworks: the only prefixes it may return.
func networkTokens(s string) map[netip.Prefix]bool {
	out := map[netip.Prefix]bool{}
	for _, item := range strings.Split(s, ",") {
		item = strings.TrimSpace(item)
		if p, err := netip.ParsePrefix(item); err == nil {
			out[p] = true
		} else if a, err := netip.ParseAddr(item); err == nil {
			out[netip.PrefixFrom(a, a.BitLen())] = true
		}
	}
	return out
}

func FuzzParseEgress(f *testing.F) {
	f.Add(uint16(0xffff), "true", "true", "udp:5060,tcp:8080", "tcp:443", "192.0.2.0/24,2001:db8::/32", "192.0.2.128/25", "true", "kube-vip.io/egress-foo")
	f.Add(uint16(0x0001), "true", "", "", "", "", "", "", "")
	f.Add(uint16(0x0013), "true", "false", "", "", "10.0.0.1/8", "", "", "egressvip.io/egress-strict")
	f.Add(uint16(0x0031), "True", "1", "8080", "443", " 10.0.0.1 ", "::ffff:1.2.3.4", "yes", "kube-vip.io/Egress-x")
	f.Add(uint16(0x0011), "true", "", "", "", "", "", "", "kube-vip.io/egress-nftables-table")
	f.Add(uint16(0x0011), "true", "", "", "", ",", "fe80::1%eth0", "", "")
	f.Fuzz(func(t *testing.T, present uint16, egress, ipv6, dports, sports, allow, deny, boolish, extraKey string) {
		ann := map[string]string{}
		set := func(bit uint, name, value string) {
			if present&(1<<bit) != 0 {
				ann[name] = value
			}
		}
		set(0, Egress, egress)
		set(1, EgressIPv6, ipv6)
		set(2, EgressDestinationPorts, dports)
		set(3, EgressSourcePorts, sports)
		set(4, EgressAllowedNetworks, allow)
		set(5, EgressDeniedNetworks, deny)
		set(6, EgressInternal, boolish)
		set(7, EgressNoInternalTraffic, boolish)
		set(8, EgressDetectAPIServer, boolish)
		set(9, FlushConntrack, boolish)
		set(10, EgressStrict, boolish)
		set(11, extraKey, boolish)

		c, problems := ParseEgress(ann)
		fatal := HasFatal(problems)

		checkNetworks := func(name string, got []netip.Prefix) {
			value, ok := ann[name]
			if !ok && got != nil {
				t.Fatalf("%s absent but parsed to %v", name, got)
			}
			tokens := networkTokens(value)
			for i, p := range got {
				if !tokens[p] {
					t.Fatalf("%s: %v was not in %q", name, p, value)
				}
				if p != p.Masked() || p.Addr().Is4In6() || p.Addr().Zone() != "" {
					t.Fatalf("%s: %v accepted from %q", name, p, value)
				}
				if i > 0 && comparePrefix(got[i-1], p) >= 0 {
					t.Fatalf("%s: not sorted and unique: %v", name, got)
				}
			}
			// Present and not refused: never widened to "no filter".
			if ok && !fatal && len(got) == 0 {
				t.Fatalf("%s=%q present, no fatal problem, but no network", name, value)
			}
		}
		checkNetworks(EgressAllowedNetworks, c.Allow)
		checkNetworks(EgressDeniedNetworks, c.Deny)
		if _, ok := ann[EgressDestinationPorts]; ok && !fatal && len(c.Ports) == 0 {
			t.Fatalf("destination ports %q present, no fatal problem, but no port", ann[EgressDestinationPorts])
		}
		for _, ps := range [][]DestinationPort{c.Ports, c.SourcePorts} {
			for _, p := range ps {
				if p.Port == 0 || (p.Protocol != TCP && p.Protocol != UDP && p.Protocol != SCTP) {
					t.Fatalf("port %v accepted", p)
				}
			}
		}
		if c.Enabled != (ann[Egress] == "true") {
			t.Fatalf("Enabled %v from %q", c.Enabled, ann[Egress])
		}
		if c.IPv4 != (c.Enabled && !fatal) || c.IPv6 != (c.IPv4 && ann[EgressIPv6] == "true") {
			t.Fatalf("families %v/%v from %v (fatal %v)", c.IPv4, c.IPv6, ann, fatal)
		}
		for _, p := range problems {
			if _, ok := ann[p.Annotation]; !ok || p.Value != ann[p.Annotation] || !strings.HasPrefix(p.Message, p.Annotation+": ") {
				t.Fatalf("problem %+v does not name an annotation of %v", p, ann)
			}
			if p.Reason == "" {
				t.Fatalf("problem without reason: %+v", p)
			}
		}
		if _, ok := ann[extraKey]; ok && !slices.Contains(egressAnnotations, extraKey) {
			lower := strings.ToLower(extraKey)
			if strings.HasPrefix(lower, KubeVIPEgressPrefix) || strings.HasPrefix(lower, EgressVIPEgressPrefix) {
				if !slices.ContainsFunc(problems, func(p Problem) bool {
					return p.Annotation == extraKey && p.Reason == ReasonUnknown && p.Fatal
				}) {
					t.Fatalf("unknown egress annotation %q not refused: %v", extraKey, problems)
				}
			}
		}
	})
}

func FuzzParseNetworks(f *testing.F) {
	for _, s := range []string{"10.0.0.0/8", "10.0.0.1", "2001:db8::/32, 10.0.0.0/8", "10.0.0.1/8", ",", "::ffff:1.2.3.4", "fe80::1%eth0", " 0.0.0.0/0 "} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got, err := ParseNetworks(s)
		if err != nil {
			if got != nil {
				t.Fatalf("partial result on error for %q", s)
			}
			return
		}
		tokens := networkTokens(s)
		for _, p := range got {
			if !tokens[p] {
				t.Fatalf("%v was not in %q", p, s)
			}
		}
		if strings.TrimSpace(s) != "" && len(got) == 0 {
			t.Fatalf("%q parsed to nothing without error", s)
		}
		formatted := make([]string, len(got))
		for i, p := range got {
			formatted[i] = p.String()
		}
		again, err := ParseNetworks(strings.Join(formatted, ","))
		if err != nil || !slices.Equal(again, got) {
			t.Fatalf("round trip of %q: %v, %v", s, again, err)
		}
	})
}

func ExampleParseEgress() {
	c, problems := ParseEgress(map[string]string{
		Egress:                  "true",
		EgressFamilies:          "ipv4,ipv6",
		EgressAllowedNetworks:   "198.51.100.0/24, 2001:db8:5060::/48",
		EgressNoInternalTraffic: "true",
	})
	fmt.Println(c.IPv4, c.IPv6, c.Allow)
	for _, p := range problems {
		fmt.Println(p.Reason, p.Fatal, p.Message)
	}
	_, problems = ParseEgress(map[string]string{
		Egress:                   "True",
		EgressDestinationPorts:   "8080",
		EgressDeniedNetworks:     "10.1.2.3/8",
		"kube-vip.io/egress-foo": "x",
	})
	for _, p := range problems {
		fmt.Println(p.Reason, p.Fatal, p.Message)
	}
	// Output:
	// true true [198.51.100.0/24 2001:db8:5060::/48]
	// EgressDiffersFromKubeVIP false kube-vip.io/egress-no-internal-traffic: "true": accepted, but egressvip never SNATs traffic to the pod and Service CIDRs; kube-vip's nftables egress SNATs it with this annotation (unless egress_enableinternalsnat=true)
	// InvalidAnnotation true kube-vip.io/egress: "True": want "true" or "false" (lower case, no spaces); no egress is programmed for this Service
	// InvalidAnnotation true kube-vip.io/egress-destination-ports: "8080": "8080": want protocol:port, e.g. tcp:8080; no egress is programmed for this Service
	// InvalidAnnotation true kube-vip.io/egress-denied-networks: "10.1.2.3/8": "10.1.2.3/8" has host bits set: write 10.0.0.0/8 for the network, or 10.1.2.3 for the address; no egress is programmed for this Service
	// UnknownAnnotation true kube-vip.io/egress-foo: "x": unknown egress annotation: egressvip does not implement it and cannot tell what it would change; no egress is programmed for this Service
}
