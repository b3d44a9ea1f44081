package snat

import (
	"bufio"
	"bytes"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/egressvip/egressvip/pkg/annotations"
)

// builtinChains are the chains of each iptables table that always exist.
var builtinChains = map[string][]string{
	"raw":      {"PREROUTING", "OUTPUT"},
	"mangle":   {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"},
	"nat":      {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"},
	"filter":   {"INPUT", "FORWARD", "OUTPUT"},
	"security": {"INPUT", "FORWARD", "OUTPUT"},
}

func isBuiltin(table, chain string) bool { return slices.Contains(builtinChains[table], chain) }

// ruleset is what iptables-save prints: its tables by name.
type ruleset map[string]*table

// table is one parsed iptables table: enough to read back what egressvip
// owns, compare it with what it writes, and find its hooks.
type table struct {
	name   string
	order  []string
	chains map[string][]tableRule
}

type tableRule struct {
	// spec is the rule without "-A CHAIN", as joinWords prints it.
	spec string
	m    match
}

// match is the subset of a rule spec egressvip understands.
type match struct {
	src, dst       netip.Prefix
	notSrc, notDst bool
	in, out        string
	proto          string
	dport          uint16
	mark           string
	ctOrigDst      netip.Prefix
	rpfilter       bool
	tcpFlags       string
	comment        string
	target         string
	toSource       netip.Addr
	setXmark       string
}

func newTable(name string) *table {
	t := &table{name: name, chains: map[string][]tableRule{}}
	for _, c := range builtinChains[name] {
		t.addChain(c)
	}
	return t
}

func (t *table) addChain(name string) {
	if _, ok := t.chains[name]; !ok {
		t.order = append(t.order, name)
		t.chains[name] = nil
	}
}

// parseSave parses iptables-save output, every table in it; only the rules
// of the chains keep accepts (nil: all) are parsed.
func parseSave(data []byte, keep func(table, chain string) bool) (ruleset, error) {
	rs := ruleset{}
	var t *table
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(nil, 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || line[0] == '#':
		case line[0] == '*':
			t = newTable(line[1:])
			rs[t.name] = t
		case t == nil:
			return nil, fmt.Errorf("line %d: %q outside a table", n, line)
		case line == "COMMIT":
			t = nil
		case line[0] == ':':
			name, _, _ := strings.Cut(line[1:], " ")
			t.addChain(name)
		case strings.HasPrefix(line, "-A "):
			if chain, _, _ := strings.Cut(line[3:], " "); keep != nil && !keep(t.name, chain) {
				if _, ok := t.chains[chain]; !ok {
					return nil, fmt.Errorf("line %d: rule in undeclared chain %q", n, chain)
				}
				continue
			}
			words := splitWords(line[3:])
			if len(words) == 0 {
				return nil, fmt.Errorf("line %d: rule without chain", n)
			}
			if _, ok := t.chains[words[0]]; !ok {
				return nil, fmt.Errorf("line %d: rule in undeclared chain %q", n, words[0])
			}
			t.append(words[0], words[1:])
		default:
			return nil, fmt.Errorf("line %d: unexpected %q", n, line)
		}
	}
	return rs, sc.Err()
}

func (t *table) append(chain string, words []string) {
	t.chains[chain] = append(t.chains[chain], tableRule{spec: joinWords(words), m: parseMatch(words)})
}

// specs returns the rule specs of chain.
func (t *table) specs(chain string) []string {
	if t == nil {
		return nil
	}
	out := make([]string, len(t.chains[chain]))
	for i, r := range t.chains[chain] {
		out[i] = r.spec
	}
	return out
}

// ownedChain says whether chain is one egressvip owns, for parseSave.
func ownedChain(_, chain string) bool { return strings.HasPrefix(chain, ChainPrefix) }

// planChains are the chains readPlans reads, for parseSave.
func planChains(_, chain string) bool { return chain == Chain || chain == ChainPre }

// owned returns the chains of the table egressvip owns (ChainPrefix).
func (t *table) owned() []string {
	if t == nil {
		return nil
	}
	var out []string
	for _, c := range t.order {
		if strings.HasPrefix(c, ChainPrefix) {
			out = append(out, c)
		}
	}
	return out
}

// readPlans reads back what the owned chains of nat and mangle do to each
// pod, and the exclusions.
func (rs ruleset) readPlans() kernelState {
	var ks kernelState
	r := newPlanReader()
	single := func(m match) (netip.Addr, bool) {
		return m.src.Addr(), m.src.IsValid() && m.src.IsSingleIP() && !m.notSrc && !m.dst.IsValid()
	}
	port := func(m match) (annotations.DestinationPort, bool) {
		p, ok := parseProto(m.proto)
		return annotations.DestinationPort{Protocol: p, Port: m.dport}, ok && m.dport != 0
	}
	if nat := rs["nat"]; nat != nil {
		for _, tr := range nat.chains[Chain] {
			m := tr.m
			if m.target == "RETURN" && m.dst.IsValid() && !m.notDst && !m.src.IsValid() && m.comment == ExcludeComment {
				ks.exclude = append(ks.exclude, m.dst)
				continue
			}
			pod, ok := single(m)
			if !ok {
				continue
			}
			switch {
			case m.target == "SNAT" && m.toSource.IsValid():
				a := action{kindSNAT, m.toSource.Unmap()}
				if p, ok := port(m); ok {
					r.port(pod, p, a, m.comment)
				} else if m.proto == "" {
					r.all(pod, a, m.comment)
				}
			case strings.HasPrefix(m.target, chainSNATPrefix):
				r.chain(pod, strings.ToLower(strings.TrimPrefix(m.target, chainSNATPrefix)))
			}
		}
	}
	if mangle := rs["mangle"]; mangle != nil {
		for _, tr := range mangle.chains[ChainPre] {
			m := tr.m
			pod, ok := single(m)
			if !ok {
				continue
			}
			var k kind
			switch {
			case m.target == "MARK":
				k = kindSteer
			case m.target == "DROP":
				k = kindHold
			case strings.HasPrefix(m.target, chainPrePrefix):
				r.chain(pod, strings.ToLower(strings.TrimPrefix(m.target, chainPrePrefix)))
				continue
			case m.target != "RETURN":
				continue
			}
			p, isPort := port(m)
			switch {
			case isPort && k == 0:
				r.accept(pod, p)
			case isPort:
				r.port(pod, p, action{kind: k}, m.comment)
			case m.proto == "" && k != 0:
				r.all(pod, action{kind: k}, m.comment)
			}
		}
	}
	ks.plans = r.done()
	return ks
}

// services returns the comments of the rules of owned chains that do
// something to a pod's traffic.
func (rs ruleset) services() []string {
	var out []string
	for _, t := range rs {
		for _, c := range t.owned() {
			for _, r := range t.chains[c] {
				if r.m.comment != "" && !strings.HasPrefix(r.m.comment, "egressvip:") {
					out = append(out, r.m.comment)
				}
			}
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// parseMatch reads the options egressvip understands from a rule spec.
func parseMatch(words []string) match {
	var m match
	neg := false
	for i := 0; i < len(words); i++ {
		w, next := words[i], ""
		if i+1 < len(words) {
			next = words[i+1]
		}
		switch w {
		case "!":
			neg = true
			continue
		case "-s", "--source":
			m.src, m.notSrc = parsePrefix(next), neg
			i++
		case "-d", "--destination":
			m.dst, m.notDst = parsePrefix(next), neg
			i++
		case "-i", "--in-interface":
			m.in = next
			i++
		case "-o", "--out-interface":
			m.out = next
			i++
		case "-p", "--protocol":
			m.proto = strings.ToLower(next)
			i++
		case "--dport", "--destination-port":
			if n, err := strconv.ParseUint(next, 10, 16); err == nil {
				m.dport = uint16(n)
			}
			i++
		case "--mark":
			m.mark = next
			i++
		case "--ctorigdst":
			m.ctOrigDst = parsePrefix(next)
			i++
		case "rpfilter":
			m.rpfilter = true
		case "--tcp-flags":
			if i+2 < len(words) {
				m.tcpFlags = next + " " + words[i+2]
				i += 2
			}
		case "--comment":
			m.comment = next
			i++
		case "-j", "--jump":
			m.target = next
			i++
		case "--to-source":
			m.toSource = parseToSource(next)
			i++
		case "--set-xmark":
			m.setXmark = next
			i++
		}
		neg = false
	}
	return m
}

func parsePrefix(s string) netip.Prefix {
	if p, err := netip.ParsePrefix(s); err == nil {
		return netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-ifMapped(p.Addr())).Masked()
	}
	if a, err := netip.ParseAddr(s); err == nil {
		a = a.Unmap()
		return netip.PrefixFrom(a, a.BitLen())
	}
	return netip.Prefix{}
}

// parseToSource reads the address of an SNAT --to-source; ranges and ports
// are not rendered by egressvip and read as the first address.
func parseToSource(s string) netip.Addr {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap.Addr()
	}
	s, _, _ = strings.Cut(s, "-")
	s = strings.Trim(s, "[]")
	a, _ := netip.ParseAddr(s)
	return a
}

// splitWords splits a rule spec into words like iptables-restore does:
// on blanks, with double quotes grouping and backslash escaping.
func splitWords(s string) []string {
	var (
		words  []string
		cur    strings.Builder
		inWord bool
		quoted bool
	)
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '\\' && i+1 < len(s):
			i++
			cur.WriteByte(s[i])
			inWord = true
		case c == '"':
			quoted = !quoted
			inWord = true
		case (c == ' ' || c == '\t') && !quoted:
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteByte(c)
			inWord = true
		}
	}
	if inWord {
		words = append(words, cur.String())
	}
	return words
}

// joinWords is the inverse of splitWords; like iptables-save it always
// quotes comments.
func joinWords(words []string) string {
	var b strings.Builder
	for i, w := range words {
		if i > 0 {
			b.WriteByte(' ')
		}
		if w == "" || strings.ContainsAny(w, " \t\"\\") || (i > 0 && words[i-1] == "--comment") {
			b.WriteString(strconv.Quote(w))
			continue
		}
		b.WriteString(w)
	}
	return b.String()
}
