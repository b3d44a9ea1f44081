package snat

import (
	"bytes"
	"cmp"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/egressvip/egressvip/pkg/annotations"
)

// Names of what egressvip owns in the nat table of both families. Every
// chain egressvip creates starts with ChainPrefix (iptables allows 28
// characters per chain name); Cleanup deletes exactly those.
const (
	ChainPrefix = "EGRESSVIP-"
	// Chain holds the exclusions and the per-pod SNAT rules.
	Chain = ChainPrefix + "SNAT"
	// HookComment marks the jump from nat POSTROUTING to Chain.
	HookComment = "egressvip: egress SNAT"
	// ExcludeComment marks the RETURN rules for excluded destinations.
	ExcludeComment = "egressvip: excluded destination"
)

// hookChain is the built-in chain Chain is jumped to from, at position 1, so
// that it runs before CNI and kube-proxy MASQUERADE rules.
const hookChain = "POSTROUTING"

// hookSpec is the rule spec of the jump, as go-iptables takes it.
var hookSpec = []string{"-m", "comment", "--comment", HookComment, "-j", Chain}

// Family is an IP family; each has its own nat table and binaries.
type Family int

// The two families, in the order Apply writes them.
const (
	IPv4 Family = iota
	IPv6
)

// Families lists both families in write order.
var Families = []Family{IPv4, IPv6}

func (f Family) String() string {
	if f == IPv6 {
		return "IPv6"
	}
	return "IPv4"
}

// familyOf returns the family of a, which must be valid.
func familyOf(a netip.Addr) Family {
	if a.Unmap().Is4() {
		return IPv4
	}
	return IPv6
}

// valid says whether r can be rendered: both addresses set and of one family.
func (r Rule) valid() bool {
	return r.PodIP.IsValid() && r.SourceIP.IsValid() && familyOf(r.PodIP) == familyOf(r.SourceIP)
}

// forFamily returns the normalised, sorted and de-duplicated part of d that
// belongs to family f. Invalid rules are dropped; Apply logs them.
func (d Desired) forFamily(f Family) Desired {
	var out Desired
	for _, p := range d.Exclude {
		if p.IsValid() && familyOf(p.Addr()) == f {
			out.Exclude = append(out.Exclude, p.Masked())
		}
	}
	slices.SortFunc(out.Exclude, comparePrefix)
	out.Exclude = slices.Compact(out.Exclude)
	for _, r := range d.Rules {
		if !r.valid() || familyOf(r.PodIP) != f {
			continue
		}
		r.PodIP, r.SourceIP = r.PodIP.Unmap(), r.SourceIP.Unmap()
		r.Service = commentSafe(r.Service)
		r.Ports = slices.Clone(r.Ports)
		slices.SortFunc(r.Ports, comparePort)
		r.Ports = slices.Compact(r.Ports)
		out.Rules = append(out.Rules, r)
	}
	slices.SortFunc(out.Rules, compareRule)
	out.Rules = slices.CompactFunc(out.Rules, func(a, b Rule) bool { return compareRule(a, b) == 0 })
	return out
}

// commentSafe replaces the characters that would end or break a quoted
// iptables-restore word. Kubernetes names never contain them.
func commentSafe(s string) string {
	return strings.Map(func(r rune) rune {
		if r == '"' || r == '\\' || r < ' ' {
			return '_'
		}
		return r
	}, s)
}

func comparePrefix(a, b netip.Prefix) int {
	return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
}

func comparePort(a, b annotations.DestinationPort) int {
	return cmp.Or(cmp.Compare(a.Protocol, b.Protocol), cmp.Compare(a.Port, b.Port))
}

// compareRule orders rules by pod, then Service, then source and ports, so
// that the rendered chain depends only on the set of rules.
func compareRule(a, b Rule) int {
	if c := cmp.Or(a.PodIP.Compare(b.PodIP), cmp.Compare(a.Service, b.Service), a.SourceIP.Compare(b.SourceIP)); c != 0 {
		return c
	}
	return slices.CompareFunc(a.Ports, b.Ports, comparePort)
}

// Render returns the iptables-restore payload for family f: the nat table
// with Chain declared (which flushes only Chain under --noflush), a RETURN
// per excluded destination, then one SNAT rule per pod and (protocol, port),
// or one for all traffic when the rule has no ports. Identical Desired values
// render identical bytes.
func Render(f Family, d Desired) []byte {
	return render(d.forFamily(f))
}

// render renders a Desired already normalised by forFamily.
func render(d Desired) []byte {
	var b bytes.Buffer
	b.Grow(128 + 64*len(d.Exclude) + 160*len(d.Rules))
	b.WriteString("*nat\n:" + Chain + " - [0:0]\n")
	for _, p := range d.Exclude {
		b.WriteString("-A " + Chain + " -d ")
		b.WriteString(p.String())
		b.WriteString(` -m comment --comment "` + ExcludeComment + `" -j RETURN` + "\n")
	}
	for _, r := range d.Rules {
		if len(r.Ports) == 0 {
			writeRule(&b, r, annotations.DestinationPort{})
			continue
		}
		for _, p := range r.Ports {
			writeRule(&b, r, p)
		}
	}
	b.WriteString("COMMIT\n")
	return b.Bytes()
}

// writeRule writes one SNAT rule in the form iptables-save prints it; p is
// the zero value for "all traffic".
func writeRule(b *bytes.Buffer, r Rule, p annotations.DestinationPort) {
	var scratch [64]byte
	b.WriteString("-A " + Chain + " -s ")
	b.Write(r.PodIP.AppendTo(scratch[:0]))
	if familyOf(r.PodIP) == IPv4 {
		b.WriteString("/32")
	} else {
		b.WriteString("/128")
	}
	if p.Protocol != "" {
		proto := string(p.Protocol)
		b.WriteString(" -p " + proto + " -m " + proto + " --dport ")
		b.Write(strconv.AppendUint(scratch[:0], uint64(p.Port), 10))
	}
	b.WriteString(` -m comment --comment "`)
	b.WriteString(r.Service)
	b.WriteString(`" -j SNAT --to-source `)
	b.Write(r.SourceIP.AppendTo(scratch[:0]))
	b.WriteByte('\n')
}
