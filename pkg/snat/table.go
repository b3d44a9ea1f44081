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

// builtinChains are the chains of the nat table that always exist.
var builtinChains = []string{"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"}

// Table is a parsed nat table, as iptables-save prints it: enough to read
// back what egressvip owns and to trace a packet through POSTROUTING.
type Table struct {
	order  []string
	chains map[string][]tableRule
}

type tableRule struct {
	words []string
	m     match
}

// match is the subset of a rule spec egressvip understands.
type match struct {
	src, dst       netip.Prefix
	notSrc, notDst bool
	proto          string
	dport          uint16
	comment        string
	target         string
	toSource       netip.Addr
}

// NewTable returns a nat table with only the built-in chains.
func NewTable() *Table {
	t := &Table{chains: map[string][]tableRule{}}
	for _, c := range builtinChains {
		t.addChain(c)
	}
	return t
}

func (t *Table) addChain(name string) {
	if _, ok := t.chains[name]; !ok {
		t.order = append(t.order, name)
		t.chains[name] = nil
	}
}

// ParseSave parses the *nat section of iptables-save output.
func ParseSave(data []byte) (*Table, error) {
	t := NewTable()
	inNat := false
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(nil, 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || line[0] == '#':
		case line[0] == '*':
			inNat = line == "*nat"
		case !inNat:
		case line == "COMMIT":
			inNat = false
		case line[0] == ':':
			name, _, _ := strings.Cut(line[1:], " ")
			t.addChain(name)
		case strings.HasPrefix(line, "-A "):
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
	return t, sc.Err()
}

func (t *Table) append(chain string, words []string) {
	t.chains[chain] = append(t.chains[chain], tableRule{words: words, m: parseMatch(words)})
}

// Chains returns the chain names in table order.
func (t *Table) Chains() []string { return slices.Clone(t.order) }

// Rules returns the rules of chain as "-A CHAIN ..." lines.
func (t *Table) Rules(chain string) []string {
	var out []string
	for _, r := range t.chains[chain] {
		out = append(out, "-A "+chain+" "+joinWords(r.words))
	}
	return out
}

// Save prints the table as iptables-save does (without counters).
func (t *Table) Save() []byte {
	var b bytes.Buffer
	b.WriteString("*nat\n")
	for _, c := range t.order {
		policy := "-"
		if slices.Contains(builtinChains, c) {
			policy = "ACCEPT"
		}
		fmt.Fprintf(&b, ":%s %s [0:0]\n", c, policy)
	}
	for _, c := range t.order {
		for _, l := range t.Rules(c) {
			b.WriteString(l + "\n")
		}
	}
	b.WriteString("COMMIT\n")
	return b.Bytes()
}

// Owned reads back the Desired state that Render would turn into the
// current contents of Chain. Rules it does not recognise are left out.
func (t *Table) Owned() Desired {
	type key struct {
		service  string
		pod, src netip.Addr
	}
	var d Desired
	idx := map[key]int{}
	all := map[int]bool{}
	for _, r := range t.chains[Chain] {
		m := r.m
		switch {
		case m.target == "RETURN" && m.dst.IsValid() && !m.notDst && !m.src.IsValid():
			d.Exclude = append(d.Exclude, m.dst)
		case m.target == "SNAT" && m.src.IsValid() && m.src.IsSingleIP() && !m.notSrc && !m.dst.IsValid() && m.toSource.IsValid():
			k := key{m.comment, m.src.Addr(), m.toSource}
			i, ok := idx[k]
			if !ok {
				i = len(d.Rules)
				idx[k] = i
				d.Rules = append(d.Rules, Rule{Service: m.comment, PodIP: k.pod, SourceIP: k.src})
			}
			if m.proto == "" {
				all[i] = true
			} else if m.dport != 0 {
				d.Rules[i].Ports = append(d.Rules[i].Ports, annotations.DestinationPort{Protocol: annotations.Protocol(m.proto), Port: m.dport})
			}
		}
	}
	for i := range all {
		d.Rules[i].Ports = nil
	}
	return d
}

// Services returns the sorted, distinct comments (namespace/name) of the
// SNAT rules in the chains egressvip owns.
func (t *Table) Services() []string {
	var out []string
	for _, c := range t.order {
		if !strings.HasPrefix(c, ChainPrefix) {
			continue
		}
		for _, r := range t.chains[c] {
			if r.m.target == "SNAT" && r.m.comment != "" {
				out = append(out, r.m.comment)
			}
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// Verdict is the outcome of tracing a packet through nat POSTROUTING.
type Verdict struct {
	// Source is the address the packet leaves with; the zero Addr when it
	// is masqueraded (the kernel picks a node address).
	Source     netip.Addr
	Masquerade bool
	// Rule is the rule that decided, "" when the packet left unchanged by
	// falling off the end of POSTROUTING.
	Rule string
}

func (v Verdict) String() string {
	switch {
	case v.Masquerade:
		return "is masqueraded to a node address by " + v.Rule
	case v.Rule == "":
		return "leaves with source " + v.Source.String() + " (no rule matched)"
	default:
		return "leaves with source " + v.Source.String() + " by " + v.Rule
	}
}

type packet struct {
	src, dst netip.Addr
	proto    string
	dport    uint16
}

// Trace walks a packet through nat POSTROUTING like the kernel would, the
// way kube-proxy's tracePacket does, and says which source it leaves with:
// "a packet from 10.244.1.5 to 198.51.100.9:5060/udp leaves with source
// 203.0.113.10". It follows jumps to user chains, RETURN, ACCEPT, SNAT and
// MASQUERADE, and understands -s, -d (with !), -p and --dport; other match
// options are assumed to match.
func (t *Table) Trace(src, dst netip.Addr, proto annotations.Protocol, dport uint16) Verdict {
	p := packet{src: src.Unmap(), dst: dst.Unmap(), proto: string(proto), dport: dport}
	if v, done := t.walk(hookChain, p, 0); done {
		return v
	}
	return Verdict{Source: p.src}
}

func (t *Table) walk(chain string, p packet, depth int) (Verdict, bool) {
	if depth > 32 {
		return Verdict{}, false
	}
	for _, r := range t.chains[chain] {
		m := r.m
		if !m.matches(p) {
			continue
		}
		rule := "-A " + chain + " " + joinWords(r.words)
		switch m.target {
		case "SNAT":
			return Verdict{Source: m.toSource, Rule: rule}, true
		case "MASQUERADE":
			return Verdict{Masquerade: true, Rule: rule}, true
		case "ACCEPT":
			return Verdict{Source: p.src, Rule: rule}, true
		case "RETURN":
			return Verdict{}, false
		}
		if _, ok := t.chains[m.target]; ok && !slices.Contains(builtinChains, m.target) {
			if v, done := t.walk(m.target, p, depth+1); done {
				return v, true
			}
		}
	}
	return Verdict{}, false
}

func (m match) matches(p packet) bool {
	if m.src.IsValid() && m.src.Contains(p.src) == m.notSrc {
		return false
	}
	if m.dst.IsValid() && m.dst.Contains(p.dst) == m.notDst {
		return false
	}
	if m.proto != "" && m.proto != "all" && m.proto != p.proto {
		return false
	}
	return m.dport == 0 || m.dport == p.dport
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
		case "-p", "--protocol":
			m.proto = strings.ToLower(next)
			i++
		case "--dport", "--destination-port":
			if n, err := strconv.ParseUint(next, 10, 16); err == nil {
				m.dport = uint16(n)
			}
			i++
		case "--comment":
			m.comment = next
			i++
		case "-j", "--jump":
			m.target = next
			i++
		case "--to-source":
			m.toSource = parseToSource(next)
			i++
		}
		neg = false
	}
	return m
}

func parsePrefix(s string) netip.Prefix {
	if p, err := netip.ParsePrefix(s); err == nil {
		return p.Masked()
	}
	if a, err := netip.ParseAddr(s); err == nil {
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
