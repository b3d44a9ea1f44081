package annotations

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// Reasons of Problems: an Event's reason.
const (
	// ReasonInvalid: a known annotation has a value egressvip does not accept.
	ReasonInvalid = "InvalidAnnotation"
	// ReasonUnknown: an egress annotation egressvip does not implement.
	ReasonUnknown = "UnknownAnnotation"
	// ReasonDiffers: accepted, but kube-vip would program something else.
	ReasonDiffers = "EgressDiffersFromKubeVIP"
	// ReasonNothingAllowed: the allowed networks hold no network of a family
	// the Service egresses, so none of that family's traffic is SNATed.
	ReasonNothingAllowed = "EgressNothingAllowed"
)

// Problem is something about a Service's annotations its owner should see
// (as a Warning Event). Fatal means: program no egress for this Service (no
// SNAT, no steering, no strict drop); its pods keep the node's address. A
// problem that is not fatal changes nothing that is programmed; it explains.
type Problem struct {
	// Annotation is the annotation's name, Value its value as written.
	Annotation string
	Value      string
	Reason     string
	Fatal      bool
	// Message is a whole sentence naming the annotation and its value.
	Message string
}

func (p Problem) String() string { return p.Message }

// HasFatal reports whether any of ps is fatal.
func HasFatal(ps []Problem) bool {
	return slices.ContainsFunc(ps, func(p Problem) bool { return p.Fatal })
}

// EgressConfig is the egress configuration of one Service, read from its
// annotations by ParseEgress. Every field follows kube-vip's meaning as its
// nftables backend implements it (pkg/services/egress.go and
// pkg/nftables/nftables.go in kube-vip v1.2.x), narrowed where kube-vip
// would SNAT more than the annotation says; the differences are listed on
// the fields.
//
// What is SNATed: a new connection from one of the Service's pods, of a
// family in IPv4/IPv6, whose destination is inside none of the pod and
// Service CIDRs (and the API server's addresses, see DetectAPIServer), is
// inside one of Allow (when Allow has a network of any family), inside none
// of Deny, and whose protocol and destination port are one of Ports (when
// Ports is not empty).
type EgressConfig struct {
	// Enabled: kube-vip.io/egress is "true" (exactly, as kube-vip compares
	// it): the user asked for egress.
	Enabled bool
	// IPv4 and IPv6 are the families whose traffic is SNATed. As in
	// kube-vip, kube-vip.io/egress-ipv6 "true" means IPv6 instead of IPv4
	// (kube-vip pkg/services/services.go:322-348,
	// pkg/endpoints/endpoints.go:143-148): a kube-vip user's IPv4 traffic
	// is not SNATed behind their back. egressvip.io/egress-families
	// ("ipv4", "ipv6", "ipv4,ipv6") chooses explicitly, dual-stack
	// included; it must agree with egress-ipv6 when both are set. Both are
	// false when a Problem is fatal.
	IPv4, IPv6 bool
	// Ports (kube-vip.io/egress-destination-ports): when not empty, only
	// connections to one of these protocol/destination-port pairs are
	// SNATed. Sorted, without duplicates.
	Ports []DestinationPort
	// SourcePorts (kube-vip.io/egress-source-ports): kube-vip reads them
	// only when flushing conntrack for kube-vip.io/flush-conntrack "true":
	// then only the inbound connections to the LoadBalancer IP whose
	// destination port is one of these are flushed (kube-vip
	// pkg/services/services.go:284-297, pkg/vip/egress.go:249-273,295-313).
	// They never narrow or widen SNAT. Sorted, without duplicates.
	SourcePorts []DestinationPort
	// Allow (kube-vip.io/egress-allowed-networks): when it holds a network
	// of any family, only connections to a destination inside one of Allow
	// are SNATed, for each family, so a family without a network in Allow
	// has nothing SNATed (see AllowedFor). Both families; bare addresses
	// become /32 or /128. Sorted, without duplicates.
	Allow []netip.Prefix
	// Deny (kube-vip.io/egress-denied-networks): connections to a
	// destination inside one of Deny are never SNATed. Deny wins over
	// Allow. Same syntax as Allow.
	Deny []netip.Prefix
	// Internal (kube-vip.io/egress-internal "true") selects kube-vip's
	// nftables backend for the Service. egressvip has one implementation,
	// which follows that backend: accepted, it changes nothing.
	Internal bool
	// NoInternalTraffic (kube-vip.io/egress-no-internal-traffic "true").
	// kube-vip's comment says it keeps traffic to the pod and Service CIDRs
	// from being SNATed (kube-vip pkg/kubevip/annotations.go:34), but its
	// nftables backend does the opposite: with any value but "" or "false"
	// it drops the pod and Service CIDRs from the destinations it leaves
	// alone, so traffic to other pods and to ClusterIPs is SNATed too,
	// unless egress_enableinternalsnat=true (kube-vip
	// pkg/services/egress.go:247-252); its iptables backend ignores it.
	// egressvip never SNATs traffic to the pod and Service CIDRs, with or
	// without it: "true" is accepted, changes nothing, and is reported
	// (not fatal) so a user who relied on kube-vip's behaviour learns of it.
	NoInternalTraffic bool
	// DetectAPIServer (kube-vip.io/egress-detect-api-server "true"):
	// connections to the API server are not SNATed. kube-vip adds
	// $KUBERNETES_SERVICE_HOST/32 (normally the ClusterIP of
	// default/kubernetes; IPv4 only) to the denied networks when the value is
	// not empty, "false" included (kube-vip pkg/services/egress.go:167-182).
	// egressvip's datapath never SNATs connections whose original
	// destination (before kube-proxy's DNAT) or current destination is the
	// API server (the ClusterIPs of default/kubernetes, inside the Service
	// CIDRs, and its endpoints' addresses), both families, whatever this
	// says: accepted, it changes nothing. A datapath that cannot exclude the
	// API server must treat true as a Deny of those addresses, and not
	// program egress while they are unknown.
	DetectAPIServer bool
	// FlushConntrack (kube-vip.io/flush-conntrack): true unless "false".
	// egressvip deletes a pod's conntrack entries towards the destinations
	// whose translation changed, so existing connections do not keep the
	// old source; "false" turns that off. kube-vip's "true" (default off)
	// flushes, on every configuration of the Service, the IPv4 entries whose
	// original source is the LoadBalancer IP (limited to Ports) and the
	// inbound ones to it (limited to SourcePorts) (kube-vip
	// pkg/services/services.go:284-297, pkg/vip/egress.go:207-317).
	FlushConntrack bool
	// Strict (egressvip.io/egress-strict "true"): while no path to the
	// egress address exists, the pods' traffic that would be SNATed is
	// dropped instead of leaving with the node's address. A fatal Problem
	// programs nothing, strict drops included.
	Strict bool
}

// AllowedFor returns Allow's networks of one family, and whether that family
// is restricted at all. restricted with no networks means: nothing of that
// family is SNATed (kube-vip: an IPv6 rule compares the IPv6 destination with
// IPv4 ranges it never matches, pkg/nftables/nftables.go:646-680).
func (e EgressConfig) AllowedFor(ipv6 bool) (networks []netip.Prefix, restricted bool) {
	return ofFamily(e.Allow, ipv6), len(e.Allow) > 0
}

// DeniedFor returns Deny's networks of one family.
func (e EgressConfig) DeniedFor(ipv6 bool) []netip.Prefix { return ofFamily(e.Deny, ipv6) }

func ofFamily(ps []netip.Prefix, ipv6 bool) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range ps {
		if p.Addr().Is6() == ipv6 {
			out = append(out, p)
		}
	}
	return out
}

// egressAnnotations are the egress annotation names ParseEgress knows: the
// ones it reads and EgressNftablesTable, which kube-vip writes.
var egressAnnotations = []string{
	Egress, EgressIPv6, EgressDestinationPorts, EgressSourcePorts,
	EgressAllowedNetworks, EgressDeniedNetworks, EgressInternal,
	EgressNoInternalTraffic, EgressDetectAPIServer, EgressNftablesTable,
	FlushConntrack, EgressStrict, EgressFamilies,
}

// ParseEgress reads a Service's whole egress configuration from its
// annotations. Rules:
//   - Booleans are "true" or "false", exactly (kube-vip compares with "true"
//     and treats anything else as false or, for some, as true; see the
//     fields). Anything else is a fatal Problem.
//   - Lists are comma-separated; spaces around an item are ignored; an empty
//     item, or a list that is present but blank, is a fatal Problem (kube-vip
//     reads a blank list as "no filter", which for ports and allowed
//     networks widens SNAT to everything).
//   - Any annotation whose name starts with kube-vip.io/egress or
//     egressvip.io/egress (in any case) that is not one of the names above is
//     a fatal Problem: egressvip cannot tell what it would narrow.
//   - kube-vip.io/egress-nftables-table, written by kube-vip, is ignored, as
//     are the annotations the leader writes (active-endpoint, vipHost).
//
// Problems are reported whether or not egress is enabled; when it is not,
// nothing is egressed anyway. On a fatal Problem IPv4 and IPv6 are false;
// the other fields keep what could be parsed, for reporting only.
func ParseEgress(ann map[string]string) (EgressConfig, []Problem) {
	p := parser{ann: ann}
	var c EgressConfig
	c.Enabled = p.boolean(Egress, false)
	ipv6 := p.boolean(EgressIPv6, false)
	c.Ports = p.ports(EgressDestinationPorts)
	c.SourcePorts = p.ports(EgressSourcePorts)
	c.Allow = p.networks(EgressAllowedNetworks)
	c.Deny = p.networks(EgressDeniedNetworks)
	c.Internal = p.boolean(EgressInternal, false)
	c.NoInternalTraffic = p.boolean(EgressNoInternalTraffic, false)
	if c.NoInternalTraffic {
		p.add(EgressNoInternalTraffic, ReasonDiffers, false,
			"accepted, but egressvip never SNATs traffic to the pod and Service CIDRs; kube-vip's nftables egress SNATs it with this annotation (unless egress_enableinternalsnat=true)")
	}
	c.DetectAPIServer = p.boolean(EgressDetectAPIServer, false)
	c.FlushConntrack = p.boolean(FlushConntrack, true)
	c.Strict = p.boolean(EgressStrict, false)
	want4, want6 := !ipv6, ipv6
	if v, ok := ann[EgressFamilies]; ok {
		f4, f6, err := parseFamilies(v)
		switch {
		case err != nil:
			p.add(EgressFamilies, ReasonInvalid, true, err.Error())
		case ann[EgressIPv6] != "" && f6 != ipv6:
			p.add(EgressFamilies, ReasonInvalid, true, fmt.Sprintf("disagrees with %s: %q", EgressIPv6, ann[EgressIPv6]))
		default:
			want4, want6 = f4, f6
		}
	}
	p.unknown()

	fatal := HasFatal(p.problems)
	c.IPv4 = c.Enabled && want4 && !fatal
	c.IPv6 = c.Enabled && want6 && !fatal
	for _, ipv6 := range []bool{false, true} {
		on, family := c.IPv4, "IPv4"
		if ipv6 {
			on, family = c.IPv6, "IPv6"
		}
		if nets, restricted := c.AllowedFor(ipv6); on && restricted && len(nets) == 0 {
			p.add(EgressAllowedNetworks, ReasonNothingAllowed, false,
				fmt.Sprintf("no %s network is allowed, so none of the pods' %s traffic is SNATed", family, family))
		}
	}
	return c, p.problems
}

type parser struct {
	ann      map[string]string
	problems []Problem
}

// add records a problem about the annotation name, whose value is ann[name].
func (p *parser) add(name, reason string, fatal bool, detail string) {
	value := p.ann[name]
	msg := fmt.Sprintf("%s: %s: %s", name, quoteValue(value), detail)
	if fatal {
		msg += "; no egress is programmed for this Service"
	}
	p.problems = append(p.problems, Problem{Annotation: name, Value: value, Reason: reason, Fatal: fatal, Message: msg})
}

// boolean reads a "true"/"false" annotation; absent is def.
func (p *parser) boolean(name string, def bool) bool {
	v, ok := p.ann[name]
	if !ok {
		return def
	}
	switch v {
	case "true":
		return true
	case "false":
		return false
	}
	p.add(name, ReasonInvalid, true, `want "true" or "false" (lower case, no spaces)`)
	return def
}

func (p *parser) ports(name string) []DestinationPort {
	v, ok := p.ann[name]
	if !ok {
		return nil
	}
	if strings.TrimSpace(v) == "" {
		p.add(name, ReasonInvalid, true, "is empty: remove it, or list protocol:port items")
		return nil
	}
	ports, err := ParseDestinationPorts(v)
	if err != nil {
		p.add(name, ReasonInvalid, true, err.Error())
		return nil
	}
	return ports
}

func (p *parser) networks(name string) []netip.Prefix {
	v, ok := p.ann[name]
	if !ok {
		return nil
	}
	if strings.TrimSpace(v) == "" {
		p.add(name, ReasonInvalid, true, "is empty: remove it, or list networks")
		return nil
	}
	nets, err := ParseNetworks(v)
	if err != nil {
		p.add(name, ReasonInvalid, true, err.Error())
		return nil
	}
	return nets
}

// unknown reports every egress-prefixed annotation that is not known, in
// name order.
func (p *parser) unknown() {
	var names []string
	for name := range p.ann {
		lower := strings.ToLower(name)
		if (strings.HasPrefix(lower, KubeVIPEgressPrefix) || strings.HasPrefix(lower, EgressVIPEgressPrefix)) &&
			!slices.Contains(egressAnnotations, name) {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	for _, name := range names {
		p.add(name, ReasonUnknown, true, "unknown egress annotation: egressvip does not implement it and cannot tell what it would change")
	}
}

// quoteValue quotes an annotation value for a message, shortened so that one
// huge value does not make a huge Event.
func quoteValue(v string) string {
	const limit = 100
	if len(v) <= limit {
		return fmt.Sprintf("%q", v)
	}
	cut := limit
	for cut > 0 && !isRuneStart(v[cut]) {
		cut--
	}
	return fmt.Sprintf("%q (%d bytes)", v[:cut]+"…", len(v))
}

func isRuneStart(b byte) bool { return b&0xC0 != 0x80 }

// parseFamilies reads egressvip.io/egress-families.
func parseFamilies(v string) (v4, v6 bool, err error) {
	if strings.TrimSpace(v) == "" {
		return false, false, fmt.Errorf(`is empty: want "ipv4", "ipv6" or "ipv4,ipv6"`)
	}
	for _, item := range strings.Split(v, ",") {
		switch strings.TrimSpace(item) {
		case "ipv4":
			v4 = true
		case "ipv6":
			v6 = true
		default:
			return false, false, fmt.Errorf(`%q is not a family: want "ipv4", "ipv6" or "ipv4,ipv6"`, strings.TrimSpace(item))
		}
	}
	return v4, v6, nil
}

// ParseNetworks parses kube-vip.io/egress-allowed-networks and
// kube-vip.io/egress-denied-networks: comma-separated IPv4 and IPv6 networks
// in CIDR notation ("192.0.2.0/24", "2001:db8::/32") or bare addresses, which
// stand for /32 or /128. Spaces around an item are ignored. A network with
// host bits set ("192.0.2.1/24"), an IPv4-mapped IPv6 address, a zone, and
// an empty item are errors. "" means none. The result is sorted and free of
// duplicates; on error there is no partial result.
//
// kube-vip differs: its nftables backend accepts only CIDR notation without
// spaces, ignores host bits, and on any bad item programs no SNAT for the
// family; an IPv6 network in an IPv4 Service's list fails the IPv4 rules
// (pkg/services/egress.go:254-266, pkg/nftables/nftables.go:610-680).
func ParseNetworks(s string) ([]netip.Prefix, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	var out []netip.Prefix
	for i, item := range strings.Split(s, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			return nil, fmt.Errorf("item %d is empty", i+1)
		}
		p, err := parseNetwork(item)
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	slices.SortFunc(out, comparePrefix)
	return slices.Compact(out), nil
}

func parseNetwork(item string) (netip.Prefix, error) {
	if !strings.Contains(item, "/") {
		a, err := netip.ParseAddr(item)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("%q is not an IP address or network (want e.g. 192.0.2.0/24 or 2001:db8::/32)", item)
		}
		if a.Zone() != "" {
			return netip.Prefix{}, fmt.Errorf("%q: an address with a zone is not a network", item)
		}
		if a.Is4In6() {
			return netip.Prefix{}, fmt.Errorf("%q: IPv4-mapped IPv6 address; write %s", item, a.Unmap())
		}
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	p, err := netip.ParsePrefix(item)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%q is not a network in CIDR notation (want e.g. 192.0.2.0/24 or 2001:db8::/32)", item)
	}
	if p.Addr().Is4In6() {
		return netip.Prefix{}, fmt.Errorf("%q: IPv4-mapped IPv6 network; write it as an IPv4 network", item)
	}
	if m := p.Masked(); m != p {
		return netip.Prefix{}, fmt.Errorf("%q has host bits set: write %s for the network, or %s for the address", item, m, p.Addr())
	}
	return p, nil
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return a.Bits() - b.Bits()
}

// ParseIgnore reads kube-vip.io/ignore with kube-vip's meaning: the Service is
// ignored (no address, no egress, nothing written) when the value is exactly
// "true" (kube-vip pkg/services/processor.go:113-117). A value that is
// neither "true" nor "false" does not ignore the Service, as in kube-vip, and
// is reported (not fatal).
func ParseIgnore(ann map[string]string) (bool, []Problem) {
	v, ok := ann[Ignore]
	if !ok || v == "false" {
		return false, nil
	}
	if v == "true" {
		return true, nil
	}
	p := parser{ann: ann}
	p.add(Ignore, ReasonInvalid, false, `not "true", so the Service is served (as kube-vip does); write "true" to ignore it`)
	return false, p.problems
}

// Ignored reports whether kube-vip.io/ignore makes the Service none of
// egressvip's business, as it is none of kube-vip's: a Service annotated
// exactly "true" is not served at all. kube-vip returns before it would tear
// down a Service it already serves (pkg/services/processor.go:113-117); a
// caller should rather treat an ignored Service like a deleted one.
func Ignored(svc *corev1.Service) bool {
	ignored, _ := ParseIgnore(svc.Annotations)
	return ignored
}
