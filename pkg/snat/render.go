package snat

import (
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/egressvip/egressvip/pkg/annotations"
)

// Names of what the iptables backends own in both families. Every chain
// egressvip creates starts with ChainPrefix (iptables allows 28 characters
// per chain name); Cleanup deletes exactly those, in the raw, mangle and
// nat tables, and the jumps to them.
const (
	ChainPrefix = "EGRESSVIP-"
	// Chain (nat, jumped to from POSTROUTING): steered packets accepted
	// (no NAT on this node), exclusions, then the SNAT rules per pod.
	Chain = ChainPrefix + "SNAT"
	// ChainPre (mangle, from PREROUTING): exclusions, the gate, then the
	// steering marks and holds per pod.
	ChainPre = ChainPrefix + "PRE"
	// ChainGate (mangle): known pods return, the rest of the gate's CIDRs
	// is dropped.
	ChainGate = ChainPrefix + "GATE"
	// ChainRaw (raw, from PREROUTING): the tunnel guard and anti-spoofing.
	ChainRaw = ChainPrefix + "RAW"
	// ChainTransit (mangle): other nodes' pods arriving from them return
	// when a rule's pods or for this node, the rest is dropped.
	ChainTransit = ChainPrefix + "TRANSIT"
	// ChainFwd (mangle, from FORWARD, with a tunnel device): MSS clamp of
	// steered SYNs into the tunnel.
	ChainFwd = ChainPrefix + "FWD"
	// HookComment marks the jump from nat POSTROUTING to Chain.
	HookComment = "egressvip: egress SNAT"

	// Prefixes of the clause chains (nat and mangle), followed by a
	// digest: the rules of pods with destination prefixes.
	chainSNATPrefix = ChainPrefix + "S-"
	chainPrePrefix  = ChainPrefix + "P-"
)

// iptTables are the tables egressvip writes, in payload order.
var iptTables = []string{"raw", "mangle", "nat"}

// hook is a jump from a built-in chain to an owned chain, kept at
// position 1.
type hook struct {
	table, chain, target, comment string
}

func (h hook) spec() string {
	return joinWords([]string{"-m", "comment", "--comment", h.comment, "-j", h.target})
}

// hooks returns the jumps egressvip keeps.
func (o datapathOptions) hooks() []hook {
	hs := []hook{
		{"raw", "PREROUTING", ChainRaw, "egressvip: anti-spoofing and tunnel guard"},
		{"mangle", "PREROUTING", ChainPre, "egressvip: steering, holds and gate"},
	}
	if o.tunnelDevice != "" {
		hs = append(hs, hook{"mangle", "FORWARD", ChainFwd, mssComment})
	}
	return append(hs, hook{"nat", "POSTROUTING", Chain, HookComment})
}

// iptChain is an owned chain and its rule specs, as iptables-save prints
// them.
type iptChain struct {
	name  string
	rules []string
}

// rb builds a rule spec in the order iptables-save prints its parts.
type rb struct {
	src, dst netip.Prefix
	in, out  string
	proto    string
	dport    uint16
	matches  []string
	comment  string
	target   []string
}

func (r rb) String() string {
	var b strings.Builder
	b.Grow(128)
	word := func(ws ...string) {
		for _, w := range ws {
			if b.Len() > 0 {
				b.WriteByte(' ')
			}
			b.WriteString(w)
		}
	}
	prefix := func(flag string, p netip.Prefix) {
		if p.IsValid() && p.Bits() > 0 {
			word(flag, p.String())
		}
	}
	prefix("-s", r.src)
	prefix("-d", r.dst)
	if r.in != "" {
		word("-i", r.in)
	}
	if r.out != "" {
		word("-o", r.out)
	}
	if r.proto != "" {
		word("-p", r.proto)
		if r.dport != 0 {
			word("-m", r.proto, "--dport", strconv.Itoa(int(r.dport)))
		}
	}
	word(r.matches...)
	if r.comment != "" {
		// Quoted like iptables-save quotes comments.
		word("-m", "comment", "--comment", strconv.Quote(r.comment))
	}
	word("-j")
	word(r.target...)
	return b.String()
}

func (r rb) port(p annotations.DestinationPort) rb {
	if p.Protocol != "" {
		r.proto, r.dport = string(p.Protocol), p.Port
	}
	return r
}

func (r rb) to(target ...string) string {
	r.target = target
	return r.String()
}

func host(a netip.Addr) netip.Prefix { return netip.PrefixFrom(a, a.BitLen()) }

// ctOrigDst is the conntrack match of an original destination, printed as
// iptables-save does (a single address without its length).
func ctOrigDst(p netip.Prefix) []string {
	s := p.String()
	if p.IsSingleIP() {
		s = p.Addr().String()
	}
	return []string{"-m", "conntrack", "--ctorigdst", s}
}

// iptRender returns the owned chains of family f implementing c, by table,
// in declaration order. Identical states render identical chains.
func iptRender(f Family, c *compiled, o datapathOptions) map[string][]iptChain {
	mark := o.markString() + "/" + o.markString()
	markMatch := []string{"-m", "mark", "--mark", mark}
	setMark := []string{"MARK", "--set-xmark", mark}
	out := map[string][]iptChain{}

	var raw []string
	if o.tunnelPort != 0 {
		for _, p := range minimalPrefixes(c.guard) {
			raw = append(raw, rb{src: p, proto: "udp", dport: o.tunnelPort, comment: guardComment}.to("DROP"))
		}
	}
	if len(c.pods) > 0 {
		for _, i := range c.nodeIfaces {
			raw = append(raw, rb{in: i, comment: antiSpoofComment}.to("RETURN"))
		}
		raw = append(raw, rb{matches: []string{"-m", "rpfilter"}, comment: antiSpoofComment}.to("RETURN"))
		for _, pod := range c.pods {
			raw = append(raw, rb{src: host(pod), comment: antiSpoofComment}.to("DROP"))
		}
	}
	out["raw"] = []iptChain{{ChainRaw, raw}}

	exclude := minimalPrefixes(c.exclude)
	var excl []string
	for _, p := range exclude {
		excl = append(excl, rb{dst: p, comment: ExcludeComment}.to("RETURN"))
	}
	for _, p := range exclude {
		excl = append(excl, rb{matches: ctOrigDst(p), comment: ExcludeComment}.to("RETURN"))
	}

	pre := slices.Clone(excl)
	gate := len(c.gateCIDRs) > 0
	if gate {
		for _, p := range minimalPrefixes(c.gateCIDRs) {
			pre = append(pre, rb{src: p, comment: gateComment}.to(ChainGate))
		}
	}
	transit := len(c.transit) > 0 && len(c.nodeIfaces) > 0
	if transit {
		for _, i := range c.nodeIfaces {
			for _, p := range minimalPrefixes(c.transit) {
				pre = append(pre, rb{src: p, in: i, comment: transitComment}.to(ChainTransit))
			}
		}
	}
	snat := append([]string{rb{matches: markMatch, comment: steeredComment}.to("ACCEPT")}, excl...)
	for _, pod := range c.pods {
		p := c.plans[pod]
		base := rb{src: host(pod)}
		if p.digest != "" {
			base.comment = p.chain[0].service
			if p.has(kindSteer) || p.has(kindHold) {
				pre = append(pre, base.to(chainPrePrefix+strings.ToUpper(p.digest)))
			}
			if p.has(kindSNAT) {
				snat = append(snat, base.to(chainSNATPrefix+strings.ToUpper(p.digest)))
			}
			continue
		}
		vAll := preKind(p.all.kind)
		for _, port := range slices.SortedFunc(maps.Keys(p.ports), comparePort) {
			e := p.ports[port]
			r := base.port(port)
			r.comment = e.service
			if e.kind == kindSNAT {
				snat = append(snat, r.to("SNAT", "--to-source", e.source.String()))
			}
			switch v := preKind(e.kind); {
			case v == vAll:
			case v == kindSteer:
				pre = append(pre, r.to(setMark...), r.to("RETURN"))
			case v == kindHold:
				pre = append(pre, r.to("DROP"))
			default:
				pre = append(pre, r.to("RETURN"))
			}
		}
		base.comment = p.all.service
		switch p.all.kind {
		case kindSNAT:
			snat = append(snat, base.to("SNAT", "--to-source", p.all.source.String()))
		case kindSteer:
			pre = append(pre, base.to(setMark...))
		case kindHold:
			pre = append(pre, base.to("DROP"))
		}
	}
	mangle := []iptChain{{ChainPre, pre}}
	if gate {
		var g []string
		known := append(slices.Clone(c.known), c.pods...)
		slices.SortFunc(known, netip.Addr.Compare)
		for _, a := range slices.Compact(known) {
			g = append(g, rb{src: host(a), comment: gateComment}.to("RETURN"))
		}
		g = append(g, rb{comment: gateComment}.to("DROP"))
		mangle = append(mangle, iptChain{ChainGate, g})
	}
	if transit {
		t := []string{rb{matches: []string{"-m", "addrtype", "--dst-type", "LOCAL"}, comment: transitComment}.to("RETURN")}
		for _, a := range c.pods {
			t = append(t, rb{src: host(a), comment: transitComment}.to("RETURN"))
		}
		t = append(t, rb{comment: transitComment}.to("DROP"))
		mangle = append(mangle, iptChain{ChainTransit, t})
	}
	if o.tunnelDevice != "" {
		mss := rb{out: o.tunnelDevice, proto: "tcp", matches: append(slices.Clone(markMatch), "-m", "tcp", "--tcp-flags", "SYN,RST", "SYN"), comment: mssComment}
		mangle = append(mangle, iptChain{ChainFwd, []string{mss.to("TCPMSS", "--clamp-mss-to-pmtu")}})
	}
	nat := []iptChain{{Chain, snat}}

	chains := c.chains()
	for _, digest := range slices.Sorted(maps.Keys(chains)) {
		chain := chains[digest]
		lastPre, lastSNAT := -1, -1
		for i, cl := range chain {
			if cl.kind == kindSNAT {
				lastSNAT = i
			} else {
				lastPre = i
			}
		}
		var preRules, snatRules []string // empty when no destination passes
		for i, cl := range chain {
			for _, dst := range clauseDsts(f, cl) {
				ports := cl.ports
				if len(ports) == 0 {
					ports = []annotations.DestinationPort{{}}
				}
				for _, port := range ports {
					r := rb{dst: dst, comment: cl.service}.port(port)
					if i <= lastPre {
						switch cl.kind {
						case kindSNAT:
							preRules = append(preRules, r.to("RETURN"))
						case kindSteer:
							preRules = append(preRules, r.to(setMark...), r.to("RETURN"))
						case kindHold:
							preRules = append(preRules, r.to("DROP"))
						}
					}
					if i <= lastSNAT {
						if cl.kind == kindSNAT {
							snatRules = append(snatRules, r.to("SNAT", "--to-source", cl.source.String()))
						} else {
							snatRules = append(snatRules, r.to("RETURN"))
						}
					}
				}
			}
		}
		name := strings.ToUpper(digest)
		if lastPre >= 0 {
			mangle = append(mangle, iptChain{chainPrePrefix + name, preRules})
		}
		if lastSNAT >= 0 {
			nat = append(nat, iptChain{chainSNATPrefix + name, snatRules})
		}
	}
	out["mangle"] = mangle
	out["nat"] = nat
	return out
}

// preKind is what a kind does in prerouting: steer and hold; 0 for none
// and SNAT, which prerouting leaves alone.
func preKind(k kind) kind {
	if k == kindSteer || k == kindHold {
		return k
	}
	return 0
}

// clauseDsts returns the destination prefixes a clause's filter lets pass,
// as a union of prefixes: Allow (or everything) minus Deny. An invalid
// prefix stands for every destination.
func clauseDsts(f Family, c clause) []netip.Prefix {
	if !c.filtered() {
		return []netip.Prefix{{}}
	}
	allow := c.allow
	if len(allow) == 0 {
		all := netip.PrefixFrom(netip.IPv4Unspecified(), 0)
		if f == IPv6 {
			all = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
		}
		allow = []netip.Prefix{all}
	}
	var out []netip.Prefix
	for _, a := range allow {
		out = append(out, subtractPrefixes(a, c.deny)...)
	}
	return out
}

// subtractPrefixes returns a minus every prefix of deny, as prefixes.
func subtractPrefixes(a netip.Prefix, deny []netip.Prefix) []netip.Prefix {
	for _, d := range deny {
		if d.Bits() <= a.Bits() && d.Contains(a.Addr()) {
			return nil // a lies inside d
		}
		if a.Bits() < d.Bits() && a.Contains(d.Addr()) {
			lo, hi := splitPrefix(a)
			return append(subtractPrefixes(lo, deny), subtractPrefixes(hi, deny)...)
		}
	}
	return []netip.Prefix{a}
}

// splitPrefix returns the two halves of p.
func splitPrefix(p netip.Prefix) (netip.Prefix, netip.Prefix) {
	b := p.Bits()
	lo := netip.PrefixFrom(p.Addr(), b+1)
	s := p.Addr().AsSlice()
	s[b/8] |= 0x80 >> (b % 8)
	hiAddr, _ := netip.AddrFromSlice(s)
	return lo, netip.PrefixFrom(hiAddr, b+1)
}
