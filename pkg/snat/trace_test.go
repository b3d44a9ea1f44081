package snat

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/egressvip/egressvip/pkg/annotations"
	"sigs.k8s.io/knftables"
)

// The tracers walk a packet through the rules egressvip writes, the way
// kube-proxy's tests do: "a packet from pod 10.244.1.5 to
// 198.51.100.9:5060/udp leaves with source 203.0.113.10". They understand
// the rule language egressvip writes, plus plain matches, DNAT-free
// MASQUERADE and RETURN rules that tests add for other components.

// pkt is a packet through a node.
type pkt struct {
	src, dst netip.Addr
	// origDst is where the pod sent it before a DNAT (kube-proxy's, from
	// a ClusterIP); the zero Addr when there was none.
	origDst netip.Addr
	proto   annotations.Protocol
	dport   uint16
	// iif and oif are the interfaces it arrives on and leaves through.
	iif, oif string
	// spoofed says that its source is not routed back through iif (the
	// reverse path check fails).
	spoofed bool
	syn     bool
	// local are the node's addresses for the fence; nil means that every
	// source is local.
	local []netip.Addr
	// ctMark is its conntrack entry's mark (set by earlier packets);
	// reply says it is a packet of the reply direction.
	ctMark uint32
	reply  bool
}

func udpPkt(src, dst netip.Addr, port uint16) pkt {
	return pkt{src: src.Unmap(), dst: dst.Unmap(), proto: annotations.UDP, dport: port, iif: "vpod", oif: "vext"}
}

func protoPkt(src, dst netip.Addr, proto annotations.Protocol, port uint16) pkt {
	p := udpPkt(src, dst, port)
	p.proto = proto
	return p
}

func (p pkt) original() netip.Addr {
	if p.origDst.IsValid() {
		return p.origDst
	}
	return p.dst
}

// translated is p after the source translation of v: a masqueraded
// packet gets the node's (first) address.
func (p pkt) translated(v verdict) pkt {
	switch {
	case v.masquerade && len(p.local) > 0:
		p.src = p.local[0]
	case !v.masquerade && v.source.IsValid():
		p.src = v.source
	}
	return p
}

func (p pkt) isLocal(a netip.Addr) bool { return p.local == nil || slices.Contains(p.local, a) }

func (p pkt) String() string {
	s := fmt.Sprintf("%s %s -> %s:%d", p.proto, p.src, p.dst, p.dport)
	if p.origDst.IsValid() {
		s += " (sent to " + p.origDst.String() + ")"
	}
	if p.spoofed {
		s += " spoofed on " + p.iif
	}
	return s
}

// verdict is what becomes of a traced packet.
type verdict struct {
	dropped bool
	// marked says that the steering mark is set.
	marked bool
	// source is the source address it leaves with, unless masquerade.
	source     netip.Addr
	masquerade bool
	// rule is the rule that dropped or translated it.
	rule string
	// unsupported is set when a rule was not understood.
	unsupported string
	// ctMark is the conntrack mark after the walk.
	ctMark uint32
}

func (v verdict) String() string {
	var s string
	switch {
	case v.unsupported != "":
		return "hit an unsupported rule: " + v.unsupported
	case v.dropped:
		return "is dropped by " + v.rule
	case v.masquerade:
		s = "is masqueraded by " + v.rule
	case v.rule == "":
		s = "leaves with source " + v.source.String() + " (not translated)"
	default:
		s = "leaves with source " + v.source.String() + " by " + v.rule
	}
	if v.marked {
		s += ", marked"
	}
	return s
}

// leaves says whether the packet leaves with source src, unmarked.
func (v verdict) leaves(src netip.Addr) bool {
	return v.unsupported == "" && !v.dropped && !v.masquerade && !v.marked && v.source == src
}

// steered says whether the packet leaves marked with its own source.
func (v verdict) steered(src netip.Addr) bool {
	return v.unsupported == "" && !v.dropped && !v.masquerade && v.marked && v.source == src
}

// ---- nftables ----

type nftOutcome int

const (
	nftNext nftOutcome = iota
	nftAccept
	nftDrop
	nftReturn
	nftTranslated
	nftUnsupported
)

type nftTracer struct {
	t    *knftables.FakeTable
	fam  Family
	p    pkt
	mark uint32
	v    verdict
}

// ctMarkSet records what a rule did to the conntrack mark of the traced
// packet's entry.
func (tr *nftTracer) ctMarkSet(m uint32) {
	tr.p.ctMark |= m
	tr.v.ctMark = tr.p.ctMark
}

// traceNFT walks p through a node with nft's table (and, when set, ipt's
// nat POSTROUTING at priority 100, and an iptables backend's fence table):
// prerouting and forward filter chains, then the nat postrouting chains in
// priority order until one translates the source, then the postrouting
// filter chains (the fence) with the translated source.
func traceNFT(nft *FakeNFT, ipt *Fake, p pkt) verdict {
	nft.Fake.RLock()
	defer nft.Fake.RUnlock()
	tr := &nftTracer{t: nft.Fake.Table, fam: familyOf(p.src), p: p}
	tr.v.source = p.src
	if tr.t == nil {
		if ipt != nil {
			return traceIPT(ipt, nil, p)
		}
		return tr.v
	}
	if tr.hook(knftables.PreroutingHook, knftables.FilterType, nil) || tr.hook(knftables.ForwardHook, knftables.FilterType, nil) {
		return tr.v
	}
	iptDone := false
	runIPT := func() {
		if ipt != nil && !iptDone {
			iptDone = true
			tr.iptNAT(ipt)
		}
	}
	tr.hook(knftables.PostroutingHook, knftables.NATType, func(prio int) bool {
		if tr.v.rule == "" && prio >= 100 {
			runIPT()
		}
		return tr.v.rule != "" || tr.v.unsupported != ""
	})
	if tr.v.unsupported != "" || tr.v.dropped {
		return tr.v
	}
	if tr.v.rule == "" {
		runIPT()
	}
	if tr.v.unsupported == "" {
		tr.p = tr.p.translated(tr.v)
		tr.hook(knftables.PostroutingHook, knftables.FilterType, nil)
	}
	return tr.v
}

func (tr *nftTracer) iptNAT(ipt *Fake) {
	ipt.mu.Lock()
	defer ipt.mu.Unlock()
	v := ipt.rs.traceTable("nat", "POSTROUTING", tr.p, tr.p.dst, tr.mark)
	if v.rule != "" || v.unsupported != "" {
		tr.v.source, tr.v.masquerade, tr.v.rule, tr.v.unsupported = v.source, v.masquerade, v.rule, v.unsupported
	}
}

// hook runs the base chains of hook and type in priority order; before
// each, stop (when set) may end the walk. It says whether the packet was
// dropped or hit an unsupported rule.
func (tr *nftTracer) hook(h knftables.BaseChainHook, typ knftables.BaseChainType, stop func(prio int) bool) bool {
	type base struct {
		name string
		prio int
	}
	var chains []base
	for name, c := range tr.t.Chains {
		if c.Hook == nil || *c.Hook != h || c.Type == nil || *c.Type != typ {
			continue
		}
		prio, err := knftables.ParsePriority(knftFamily(tr.fam), string(*c.Priority))
		if err != nil {
			tr.v.unsupported = fmt.Sprintf("priority %q of chain %s", *c.Priority, name)
			return true
		}
		chains = append(chains, base{name, prio})
	}
	slices.SortFunc(chains, func(a, b base) int { return cmp.Or(cmp.Compare(a.prio, b.prio), cmp.Compare(a.name, b.name)) })
	for _, c := range chains {
		if stop != nil && stop(c.prio) {
			break
		}
		switch tr.chain(c.name, 0) {
		case nftDrop, nftUnsupported:
			return true
		case nftTranslated:
			if typ == knftables.NATType {
				return false
			}
		}
	}
	return tr.v.dropped || tr.v.unsupported != ""
}

// chain runs a chain: the outcome is accept, drop, translated or
// unsupported when a rule ended the walk, return at its end.
func (tr *nftTracer) chain(name string, depth int) nftOutcome {
	c := tr.t.Chains[name]
	if c == nil || depth > 16 {
		tr.v.unsupported = "no chain " + name
		return nftUnsupported
	}
	for _, r := range c.Rules {
		out, arg := tr.rule(r.Rule)
		switch out {
		case nftNext:
			continue
		case nftReturn:
			return nftReturn
		case nftDrop:
			tr.v.dropped, tr.v.rule = true, name+": "+r.Rule
			return nftDrop
		case nftTranslated:
			tr.v.rule = name + ": " + r.Rule
			return nftTranslated
		case nftUnsupported:
			tr.v.unsupported = arg + " in rule: " + r.Rule
			return nftUnsupported
		}
		if arg == "" {
			return out // accept
		}
		verb, target, _ := strings.Cut(arg, " ")
		res := tr.chain(target, depth+1)
		if verb == "goto" || res != nftReturn {
			return res
		}
	}
	return nftReturn
}

// nftTokens splits a rule into words, an anonymous set "{ a, b }" being
// one word.
func nftTokens(rule string) []string {
	var out []string
	words := strings.Fields(rule)
	for i := 0; i < len(words); i++ {
		if words[i] != "{" {
			out = append(out, words[i])
			continue
		}
		j := i + 1
		for j < len(words) && words[j] != "}" {
			j++
		}
		out = append(out, "{"+strings.Join(words[i+1:j], " ")+"}")
		i = j
	}
	return out
}

// nval is a value a selector reads from the packet.
type nval struct {
	kind string // addr, proto, num, str, none
	addr netip.Addr
	n    uint64
	s    string
}

func (v nval) matches(word string) bool {
	switch v.kind {
	case "addr":
		p := parsePrefix(word)
		return p.IsValid() && p.Contains(v.addr)
	case "proto":
		pr, ok := parseProto(word)
		return ok && uint64(protoNumbers[pr]) == v.n
	case "num":
		n, err := strconv.ParseUint(word, 0, 32)
		return err == nil && n == v.n
	case "str":
		return strings.Trim(word, `"`) == v.s
	}
	return false
}

// selector reads a (concatenated) selector at w[i:]; j is the index after
// it.
func (tr *nftTracer) selector(w []string, i int) (vals []nval, j int, ok bool) {
	p := tr.p
	ip, _ := ipWords(tr.fam)
	for {
		if i >= len(w) {
			return nil, i, false
		}
		var v nval
		two := w[i]
		if i+1 < len(w) {
			two += " " + w[i+1]
		}
		n := 2
		switch two {
		case ip + " saddr":
			v = nval{kind: "addr", addr: p.src}
		case ip + " daddr":
			v = nval{kind: "addr", addr: p.dst}
		case "meta l4proto":
			v = nval{kind: "proto", n: uint64(protoNumbers[p.proto])}
		case "th dport":
			v = nval{kind: "num", n: uint64(p.dport)}
		case "udp dport", "tcp dport":
			v = nval{kind: "none"}
			if string(p.proto) == w[i] {
				v = nval{kind: "num", n: uint64(p.dport)}
			}
		case "meta mark":
			v = nval{kind: "num", n: uint64(tr.mark)}
			if i+3 < len(w) && w[i+2] == "&" {
				m, err := strconv.ParseUint(w[i+3], 0, 32)
				if err != nil {
					return nil, i, false
				}
				v.n &= m
				n = 4
			}
		case "ct mark":
			v = nval{kind: "num", n: uint64(p.ctMark)}
			if i+3 < len(w) && w[i+2] == "&" {
				m, err := strconv.ParseUint(w[i+3], 0, 32)
				if err != nil {
					return nil, i, false
				}
				v.n &= m
				n = 4
			}
		case "ct original":
			if i+3 < len(w) && w[i+2] == ip && w[i+3] == "daddr" {
				v, n = nval{kind: "addr", addr: p.original()}, 4
			} else {
				return nil, i, false
			}
		default:
			switch w[i] {
			case "iifname":
				v, n = nval{kind: "str", s: p.iif}, 1
			case "oifname":
				v, n = nval{kind: "str", s: p.oif}, 1
			default:
				return nil, i, false
			}
		}
		vals = append(vals, v)
		i += n
		if i < len(w) && w[i] == "." {
			i++
			continue
		}
		return vals, i, true
	}
}

// lookup finds the element of set or map name (or of an anonymous set
// "{...}") whose key holds vals.
func (tr *nftTracer) lookup(name string, vals []nval) (*knftables.Element, bool) {
	var elems []*knftables.Element
	switch {
	case strings.HasPrefix(name, "{"):
		for _, e := range strings.Split(strings.Trim(name, "{}"), ",") {
			var key []string
			for _, k := range strings.Split(e, " . ") {
				key = append(key, strings.TrimSpace(k))
			}
			elems = append(elems, &knftables.Element{Key: key})
		}
	case tr.t.Sets[strings.TrimPrefix(name, "@")] != nil:
		elems = tr.t.Sets[strings.TrimPrefix(name, "@")].Elements
	case tr.t.Maps[strings.TrimPrefix(name, "@")] != nil:
		elems = tr.t.Maps[strings.TrimPrefix(name, "@")].Elements
	}
	for _, e := range elems {
		if len(e.Key) != len(vals) {
			continue
		}
		hit := true
		for i, v := range vals {
			if !v.matches(e.Key[i]) {
				hit = false
				break
			}
		}
		if hit {
			return e, true
		}
	}
	return nil, false
}

// rule evaluates one rule: nftNext, or the outcome and, for accept,
// "goto X" or "jump X" (arg), or why it is unsupported.
func (tr *nftTracer) rule(rule string) (nftOutcome, string) {
	w := nftTokens(rule)
	at := func(i int) string {
		if i < len(w) {
			return w[i]
		}
		return ""
	}
	verdictOf := func(s string) (nftOutcome, string) {
		switch {
		case s == "accept":
			return nftAccept, ""
		case s == "drop":
			return nftDrop, ""
		case s == "return":
			return nftReturn, ""
		case strings.HasPrefix(s, "goto "), strings.HasPrefix(s, "jump "):
			return nftAccept, s
		}
		return nftUnsupported, "verdict " + s
	}
	ip, _ := ipWords(tr.fam)
	for i := 0; i < len(w); {
		switch w[i] {
		case "counter":
			i++
			continue
		case "accept", "drop", "return":
			return verdictOf(w[i])
		case "goto", "jump":
			return verdictOf(w[i] + " " + at(i+1))
		case "masquerade":
			tr.v.masquerade, tr.v.source = true, netip.Addr{}
			return nftTranslated, ""
		case "snat":
			i++
			if at(i) == ip {
				i++
			}
			if at(i) != "to" {
				return nftUnsupported, "snat"
			}
			i++
			if at(i) == ip && at(i+1) == "saddr" && i+2 == len(w) {
				return nftTranslated, "" // null SNAT: the source stays
			}
			if i == len(w)-1 {
				a, err := netip.ParseAddr(w[i])
				if err != nil {
					return nftUnsupported, "snat address"
				}
				tr.v.source = a
				return nftTranslated, ""
			}
			vals, j, ok := tr.selector(w, i)
			if !ok || at(j) != "map" || j+2 != len(w) {
				return nftUnsupported, "snat map"
			}
			e, hit := tr.lookup(at(j+1), vals)
			if !hit {
				return nftNext, ""
			}
			a, err := netip.ParseAddr(e.Value[0])
			if err != nil {
				return nftUnsupported, "map value " + e.Value[0]
			}
			tr.v.source = a
			return nftTranslated, ""
		case "fib":
			rest := strings.Join(w[i:min(i+6, len(w))], " ")
			switch {
			case strings.HasPrefix(rest, "fib saddr . iif oif missing"):
				if !tr.p.spoofed {
					return nftNext, ""
				}
				i += 6
			case strings.HasPrefix(rest, "fib saddr type != local"):
				if tr.p.isLocal(tr.v.source) || tr.v.masquerade {
					return nftNext, ""
				}
				i += 5
			default:
				return nftUnsupported, "fib"
			}
			continue
		case "tcp":
			switch at(i + 1) {
			case "flags":
				if at(i+2) != "syn" || at(i+3) != "/" || at(i+4) != "syn,rst" {
					return nftUnsupported, "tcp flags"
				}
				if tr.p.proto != annotations.TCP || !tr.p.syn {
					return nftNext, ""
				}
				i += 5
				continue
			case "option":
				i += 7 // tcp option maxseg size set rt mtu: no effect here
				continue
			}
		case "ct":
			switch {
			case at(i+1) == "direction" && at(i+2) == "original":
				if tr.p.reply {
					return nftNext, ""
				}
				i += 3
				continue
			case at(i+1) == "mark" && at(i+2) == "set":
				if at(i+3) != "ct" || at(i+4) != "mark" || at(i+5) != "|" {
					return nftUnsupported, "ct mark set"
				}
				m, err := strconv.ParseUint(at(i+6), 0, 32)
				if err != nil {
					return nftUnsupported, "ct mark"
				}
				tr.ctMarkSet(uint32(m))
				i += 7
				continue
			}
		case "meta":
			if at(i+1) == "mark" && at(i+2) == "set" {
				if at(i+3) != "meta" || at(i+4) != "mark" || at(i+5) != "|" {
					return nftUnsupported, "meta mark set"
				}
				m, err := strconv.ParseUint(at(i+6), 0, 32)
				if err != nil {
					return nftUnsupported, "mark"
				}
				tr.mark |= uint32(m)
				tr.v.marked = tr.mark&uint32(m) != 0
				i += 7
				continue
			}
		}
		vals, j, ok := tr.selector(w, i)
		if !ok || j >= len(w) {
			return nftUnsupported, "match " + w[i]
		}
		if w[j] == "vmap" {
			e, hit := tr.lookup(at(j+1), vals)
			if !hit {
				return nftNext, ""
			}
			return verdictOf(e.Value[0])
		}
		neg := w[j] == "!="
		if neg || w[j] == "==" {
			j++
		}
		operand := at(j)
		var hit bool
		if strings.HasPrefix(operand, "@") || strings.HasPrefix(operand, "{") {
			_, hit = tr.lookup(operand, vals)
		} else {
			hit = len(vals) == 1 && vals[0].matches(operand)
		}
		if hit == neg {
			return nftNext, ""
		}
		i = j + 1
	}
	return nftNext, ""
}

// ---- iptables ----

// traceIPT walks p through a node with ipt's tables: raw and mangle
// PREROUTING (which see the destination before kube-proxy's DNAT), nat
// POSTROUTING, then the fence of fence's table, when set.
func traceIPT(ipt *Fake, fence *FakeNFT, p pkt) verdict {
	ipt.mu.Lock()
	var mark uint32
	for _, h := range []struct{ table, chain string }{{"raw", "PREROUTING"}, {"mangle", "PREROUTING"}} {
		v := ipt.rs.traceTable(h.table, h.chain, p, p.original(), mark)
		mark = v.markValue
		if v.dropped || v.unsupported != "" {
			ipt.mu.Unlock()
			return v.verdict
		}
	}
	v := ipt.rs.traceTable("nat", "POSTROUTING", p, p.dst, mark).verdict
	ipt.mu.Unlock()
	v.marked = mark != 0
	if v.rule == "" {
		v.source = p.src
	}
	if v.dropped || v.unsupported != "" || fence == nil {
		return v
	}
	fence.Fake.RLock()
	defer fence.Fake.RUnlock()
	tr := &nftTracer{t: fence.Fake.Table, fam: familyOf(p.src), p: p.translated(v), mark: mark, v: v}
	if tr.t != nil {
		tr.hook(knftables.PostroutingHook, knftables.FilterType, nil)
	}
	return tr.v
}

type iptVerdict struct {
	verdict
	markValue uint32
}

// traceTable walks p through chain of table (jumps followed) with
// destination dst as this hook sees it.
func (rs ruleset) traceTable(tbl, chain string, p pkt, dst netip.Addr, mark uint32) iptVerdict {
	v := iptVerdict{verdict: verdict{source: p.src}, markValue: mark}
	t := rs[tbl]
	if t == nil {
		return v
	}
	t.walk(chain, p, dst, &v, 0)
	return v
}

// walk returns true when the walk of the hook ends.
func (t *table) walk(chain string, p pkt, dst netip.Addr, v *iptVerdict, depth int) bool {
	if depth > 32 {
		v.unsupported = "jump depth"
		return true
	}
	for _, r := range t.chains[chain] {
		m := r.m
		if !m.matchesPkt(p, dst, v.markValue) {
			continue
		}
		rule := "-A " + chain + " " + r.spec
		switch m.target {
		case "DROP":
			v.dropped, v.rule = true, rule
			return true
		case "ACCEPT":
			return true
		case "RETURN":
			return false
		case "MARK":
			val, mask, ok := parseMark(m.setXmark)
			if !ok {
				v.unsupported = rule
				return true
			}
			v.markValue = v.markValue&^mask ^ val
			v.marked = v.markValue != 0
		case "SNAT":
			v.source, v.rule = m.toSource, rule
			return true
		case "MASQUERADE":
			v.masquerade, v.source, v.rule = true, netip.Addr{}, rule
			return true
		case "TCPMSS", "":
		default:
			if _, ok := t.chains[m.target]; !ok {
				v.unsupported = rule
				return true
			}
			if t.walk(m.target, p, dst, v, depth+1) {
				return true
			}
		}
	}
	return false
}

// parseMark reads "value/mask".
func parseMark(s string) (val, mask uint32, ok bool) {
	a, b, found := strings.Cut(s, "/")
	v, err1 := strconv.ParseUint(a, 0, 32)
	m := uint64(0xffffffff)
	var err2 error
	if found {
		m, err2 = strconv.ParseUint(b, 0, 32)
	}
	return uint32(v), uint32(m), err1 == nil && err2 == nil
}

func (m match) matchesPkt(p pkt, dst netip.Addr, mark uint32) bool {
	if m.src.IsValid() && m.src.Contains(p.src) == m.notSrc {
		return false
	}
	if m.dst.IsValid() && m.dst.Contains(dst) == m.notDst {
		return false
	}
	if (m.in != "" && m.in != p.iif) || (m.out != "" && m.out != p.oif) {
		return false
	}
	if m.proto != "" && m.proto != "all" && m.proto != string(p.proto) {
		return false
	}
	if m.dport != 0 && m.dport != p.dport {
		return false
	}
	if m.mark != "" {
		val, mask, ok := parseMark(m.mark)
		if !ok || mark&mask != val {
			return false
		}
	}
	if m.ctOrigDst.IsValid() && !m.ctOrigDst.Contains(p.original()) {
		return false
	}
	if m.rpfilter && p.spoofed {
		return false
	}
	if m.tcpFlags != "" && !p.syn {
		return false
	}
	return true
}
