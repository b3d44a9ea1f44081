package annotations

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestParseDestinationPorts(t *testing.T) {
	for _, tc := range []struct {
		name    string
		in      string
		want    []DestinationPort
		wantErr string
	}{
		{name: "empty", in: ""},
		{name: "blank", in: "  "},
		{name: "one", in: "udp:5060", want: []DestinationPort{{UDP, 5060}}},
		{name: "several sorted", in: "udp:5060,tcp:8080,sctp:9", want: []DestinationPort{{SCTP, 9}, {TCP, 8080}, {UDP, 5060}}},
		{name: "case and spaces", in: " TCP:80 , Udp:53", want: []DestinationPort{{TCP, 80}, {UDP, 53}}},
		{name: "duplicates collapse", in: "tcp:80,tcp:80", want: []DestinationPort{{TCP, 80}}},
		{name: "bounds", in: "tcp:1,tcp:65535", want: []DestinationPort{{TCP, 1}, {TCP, 65535}}},
		{name: "no port", in: "tcp", wantErr: "want protocol:port"},
		{name: "port zero", in: "tcp:0", wantErr: "out of range"},
		{name: "port too large", in: "tcp:70000", wantErr: "out of range"},
		{name: "unknown protocol", in: "icmp:1", wantErr: "unknown protocol"},
		{name: "trailing empty items", in: "tcp:80,,", wantErr: "empty"},
		{name: "leading comma", in: ",tcp:80", wantErr: "empty"},
		{name: "not a number", in: "tcp:abc", wantErr: "not a decimal"},
		{name: "no protocol", in: ":80", wantErr: "unknown protocol"},
		{name: "two colons", in: "tcp:80:90", wantErr: "not a decimal"},
		{name: "sign", in: "tcp:+80", wantErr: "not a decimal"},
		{name: "leading zero", in: "tcp:080", wantErr: "leading zero"},
		{name: "empty port", in: "tcp:", wantErr: "missing port"},
		{name: "huge", in: "tcp:99999999999999999999", wantErr: "out of range"},
		{name: "one bad item spoils all", in: "tcp:80,udp:0", wantErr: "out of range"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseDestinationPorts(tc.in)
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

func FuzzParseDestinationPorts(f *testing.F) {
	for _, s := range []string{"tcp:8080,udp:5060", "sctp:1", "tcp", "tcp:0", "tcp:70000", "icmp:1", "tcp:80,,", " UDP:53 "} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got, err := ParseDestinationPorts(s)
		if err != nil {
			if got != nil {
				t.Fatalf("partial result on error for %q", s)
			}
			return
		}
		for i, p := range got {
			if p.Port == 0 {
				t.Fatalf("port 0 accepted from %q", s)
			}
			if p.Protocol != TCP && p.Protocol != UDP && p.Protocol != SCTP {
				t.Fatalf("protocol %q accepted from %q", p.Protocol, s)
			}
			if i > 0 && compareDestinationPort(got[i-1], p) >= 0 {
				t.Fatalf("not sorted and unique: %v", got)
			}
		}
		again, err := ParseDestinationPorts(FormatDestinationPorts(got))
		if err != nil || !slices.Equal(again, got) {
			t.Fatalf("round trip of %q: %v, %v", s, again, err)
		}
	})
}

func service(ann map[string]string, specIP string) *corev1.Service {
	return &corev1.Service{ObjectMeta: metav1.ObjectMeta{Annotations: ann}, Spec: corev1.ServiceSpec{LoadBalancerIP: specIP}}
}

func TestServiceLoadBalancerIPs(t *testing.T) {
	for _, tc := range []struct {
		name         string
		ann          string
		spec         string
		want4, want6 string
		wantErr      string
	}{
		{name: "none"},
		{name: "annotation v4", ann: "203.0.113.10", want4: "203.0.113.10"},
		{name: "annotation dual", ann: "2001:db8:1::10, 203.0.113.10", want4: "203.0.113.10", want6: "2001:db8:1::10"},
		{name: "annotation wins over spec", ann: "203.0.113.10", spec: "203.0.113.99", want4: "203.0.113.10"},
		{name: "spec fallback", spec: "203.0.113.11", want4: "203.0.113.11"},
		{name: "not an ip", ann: "not-an-ip", wantErr: "not an IP"},
		{name: "cidr is not an ip", ann: "203.0.113.0/24", wantErr: "not an IP"},
		{name: "two v4", ann: "203.0.113.10,203.0.113.11", wantErr: "more than one"},
		{name: "mapped", ann: "::ffff:203.0.113.10", wantErr: "plain"},
		{name: "unspecified", ann: "0.0.0.0", wantErr: "cannot be"},
		{name: "loopback", ann: "::1", wantErr: "cannot be"},
		{name: "link-local", ann: "fe80::1", wantErr: "cannot be"},
		{name: "bad spec", spec: "bogus", wantErr: "spec.loadBalancerIP"},
		{name: "empty item", ann: "203.0.113.10,", wantErr: "not an IP"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ann := map[string]string{}
			if tc.ann != "" {
				ann[LoadBalancerIPs] = tc.ann
			}
			v4, v6, err := ServiceLoadBalancerIPs(service(ann, tc.spec))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := addrString(v4); got != tc.want4 {
				t.Fatalf("v4 = %q, want %q", got, tc.want4)
			}
			if got := addrString(v6); got != tc.want6 {
				t.Fatalf("v6 = %q, want %q", got, tc.want6)
			}
		})
	}
}

func addrString(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

func TestBoolAnnotations(t *testing.T) {
	for _, tc := range []struct {
		name    string
		value   *string
		want    bool
		wantErr bool
	}{
		{name: "absent"},
		{name: "true", value: ptr("true"), want: true},
		{name: "False", value: ptr("False")},
		{name: "malformed", value: ptr("yes please"), wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ann := map[string]string{}
			if tc.value != nil {
				ann[Egress] = *tc.value
				ann[EgressIPv6] = *tc.value
			}
			for _, f := range []func(*corev1.Service) (bool, error){EgressEnabled, EgressIPv6Enabled} {
				got, err := f(service(ann, ""))
				if (err != nil) != tc.wantErr || got != tc.want {
					t.Fatalf("got %v, %v; want %v (err %v)", got, err, tc.want, tc.wantErr)
				}
			}
		})
	}
}

func ptr(s string) *string { return &s }
