package annotations

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// ParseDestinationPorts parses kube-vip.io/egress-destination-ports, e.g.
// "tcp:8080,udp:5060". Protocols are tcp, udp or sctp (any case); ports are
// decimal 1-65535 without sign or leading zeros. Spaces around an item are
// ignored. "" means no filter. The result is sorted and free of duplicates;
// on error there is no partial result.
func ParseDestinationPorts(s string) ([]DestinationPort, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	var out []DestinationPort
	for i, item := range strings.Split(s, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			return nil, fmt.Errorf("item %d is empty in %q", i+1, s)
		}
		proto, port, ok := strings.Cut(item, ":")
		if !ok {
			return nil, fmt.Errorf("%q: want protocol:port, e.g. tcp:8080", item)
		}
		p := Protocol(strings.ToLower(proto))
		switch p {
		case TCP, UDP, SCTP:
		default:
			return nil, fmt.Errorf("%q: unknown protocol %q (want tcp, udp or sctp)", item, proto)
		}
		n, err := parsePort(port)
		if err != nil {
			return nil, fmt.Errorf("%q: %w", item, err)
		}
		out = append(out, DestinationPort{Protocol: p, Port: n})
	}
	slices.SortFunc(out, compareDestinationPort)
	return slices.Compact(out), nil
}

func parsePort(s string) (uint16, error) {
	if s == "" {
		return 0, fmt.Errorf("missing port")
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return 0, fmt.Errorf("port %q is not a decimal number", s)
		}
	}
	if len(s) > 1 && s[0] == '0' {
		return 0, fmt.Errorf("port %q has a leading zero", s)
	}
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil || n < 1 || n > 65535 {
		return 0, fmt.Errorf("port %s is out of range 1-65535", s)
	}
	return uint16(n), nil
}

func compareDestinationPort(a, b DestinationPort) int {
	return cmp.Or(cmp.Compare(a.Protocol, b.Protocol), cmp.Compare(a.Port, b.Port))
}

// FormatDestinationPorts is the inverse of ParseDestinationPorts.
func FormatDestinationPorts(ports []DestinationPort) string {
	items := make([]string, len(ports))
	for i, p := range ports {
		items[i] = fmt.Sprintf("%s:%d", p.Protocol, p.Port)
	}
	return strings.Join(items, ",")
}

// EgressEnabled reads kube-vip.io/egress: absent is false, a malformed
// value is an error. It accepts what strconv.ParseBool accepts ("True",
// "1"), where kube-vip egresses only for "true" and ParseEgress accepts only
// "true" and "false"; ParseEgress reads every other egress annotation too:
// prefer it.
func EgressEnabled(svc *corev1.Service) (bool, error) { return boolAnnotation(svc, Egress) }

// EgressIPv6Enabled reads kube-vip.io/egress-ipv6, like EgressEnabled.
func EgressIPv6Enabled(svc *corev1.Service) (bool, error) { return boolAnnotation(svc, EgressIPv6) }

func boolAnnotation(svc *corev1.Service, name string) (bool, error) {
	v, ok := svc.Annotations[name]
	if !ok {
		return false, nil
	}
	b, err := strconv.ParseBool(strings.TrimSpace(v))
	if err != nil {
		return false, fmt.Errorf("%s: %q is not true or false", name, v)
	}
	return b, nil
}

// ServiceLoadBalancerIPs returns the Service's LoadBalancer IPs, at most one
// per family: from kube-vip.io/loadbalancerIPs (comma-separated) if set,
// else spec.loadBalancerIP. Zero Addrs and no error mean none is set.
func ServiceLoadBalancerIPs(svc *corev1.Service) (v4, v6 netip.Addr, err error) {
	source, value := LoadBalancerIPs, svc.Annotations[LoadBalancerIPs]
	if strings.TrimSpace(value) == "" {
		source, value = "spec.loadBalancerIP", svc.Spec.LoadBalancerIP
	}
	if strings.TrimSpace(value) == "" {
		return netip.Addr{}, netip.Addr{}, nil
	}
	for _, item := range strings.Split(value, ",") {
		item = strings.TrimSpace(item)
		a, err := netip.ParseAddr(item)
		if err != nil {
			return netip.Addr{}, netip.Addr{}, fmt.Errorf("%s: %q is not an IP address", source, item)
		}
		if a.Is4In6() || a.Zone() != "" {
			return netip.Addr{}, netip.Addr{}, fmt.Errorf("%s: %q: use a plain IPv4 or IPv6 address", source, item)
		}
		if a.IsUnspecified() || a.IsLoopback() || a.IsMulticast() || a.IsLinkLocalUnicast() {
			return netip.Addr{}, netip.Addr{}, fmt.Errorf("%s: %q cannot be a LoadBalancer IP", source, item)
		}
		slot := &v4
		if a.Is6() {
			slot = &v6
		}
		if slot.IsValid() {
			return netip.Addr{}, netip.Addr{}, fmt.Errorf("%s: more than one address of a family (%s, %s)", source, *slot, a)
		}
		*slot = a
	}
	return v4, v6, nil
}
