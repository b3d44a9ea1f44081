package snat

import (
	"cmp"
	"context"
	"crypto/sha256"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/egressvip/egressvip/pkg/annotations"
	"sigs.k8s.io/knftables"
)

// FakeNFT is an NFTables for one family on a knftables.Fake: transactions
// are all or nothing, every successful Run advances the generation like a
// kernel commit, and Trace walks a packet through the table's nat
// postrouting chains. Tests change the table behind the Manager's back with
// Run, as another process would.
type FakeNFT struct {
	*knftables.Fake
	family Family

	mu  sync.Mutex
	gen uint32
	// Runs counts successful Run calls.
	Runs int
	// RunErr, when set, makes Run fail with it.
	RunErr error
	// AfterRun, when set, is called after each successful Run: someone
	// else committing right after us.
	AfterRun func()
}

var _ NFTables = (*FakeNFT)(nil)

// NewFakeNFT returns a FakeNFT for egressvip's table of family f, with no
// table yet.
func NewFakeNFT(f Family) *FakeNFT {
	return &FakeNFT{Fake: knftables.NewFake(knftFamily(f), TableName), family: f}
}

// Run runs tx on the fake; a successful one is one commit.
func (f *FakeNFT) Run(ctx context.Context, tx *knftables.Transaction) error {
	f.mu.Lock()
	if f.RunErr != nil {
		f.mu.Unlock()
		return f.RunErr
	}
	if err := f.Fake.Run(ctx, tx); err != nil {
		f.mu.Unlock()
		return err
	}
	f.gen++
	f.Runs++
	after := f.AfterRun
	f.mu.Unlock()
	if after != nil {
		after()
	}
	return nil
}

// OtherCommit records a commit by someone else to another table: the
// generation moves, egressvip's table does not change.
func (f *FakeNFT) OtherCommit() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.gen++
}

// Generation returns the number of commits: successful Runs and
// OtherCommits.
func (f *FakeNFT) Generation() (uint32, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.gen, nil
}

// Fingerprint returns the SHA-256 of the fake's dump of the table.
func (f *FakeNFT) Fingerprint(context.Context) ([]byte, error) {
	f.Fake.RLock()
	missing := f.Fake.Table == nil
	f.Fake.RUnlock()
	if missing {
		return nil, fmt.Errorf("%w %s %s", ErrNoTable, knftFamily(f.family), TableName)
	}
	sum := sha256.Sum256([]byte(f.Fake.Dump()))
	return sum[:], nil
}

// Trace walks a packet through the nat postrouting base chains of the
// fake's table in priority order, like the kernel: the first rule that
// translates the source decides; accept and return end a chain and the
// packet goes on to the next one. The Verdict says which source the packet
// leaves with ("a packet from pod 10.244.1.5 to 198.51.100.9:5060/udp
// leaves with source 203.0.113.10"); its Rule is "" when no rule
// translated it, so iptables' nat POSTROUTING (priority 100, after ours)
// has its turn. The rule language understood is the one egressvip writes
// plus plain matches and masquerade: [ip|ip6|meta|th] selectors joined by
// ".", compared with "@set", a value or "!=", and the statements accept,
// return, counter, masquerade and "snat [ip|ip6] to <addr> | <expr> map
// @map". Anything else gives a Verdict whose Rule starts with
// "unsupported".
func (f *FakeNFT) Trace(src, dst netip.Addr, proto annotations.Protocol, dport uint16) Verdict {
	f.Fake.RLock()
	defer f.Fake.RUnlock()
	p := packet{src: src.Unmap(), dst: dst.Unmap(), proto: string(proto), dport: dport}
	t := f.Fake.Table
	if t == nil {
		return Verdict{Source: p.src}
	}
	type base struct {
		name string
		prio int
	}
	var chains []base
	for name, c := range t.Chains {
		if c.Hook == nil || *c.Hook != knftables.PostroutingHook || c.Type == nil || *c.Type != knftables.NATType {
			continue
		}
		prio, err := knftables.ParsePriority(knftFamily(f.family), string(*c.Priority))
		if err != nil {
			return Verdict{Rule: fmt.Sprintf("unsupported priority %q of chain %s", *c.Priority, name)}
		}
		chains = append(chains, base{name, prio})
	}
	slices.SortFunc(chains, func(a, b base) int { return cmp.Or(cmp.Compare(a.prio, b.prio), cmp.Compare(a.name, b.name)) })
	for _, c := range chains {
		for _, r := range t.Chains[c.name].Rules {
			v, next := evalNFTRule(t, f.family, r.Rule, p)
			if v.Rule != "" {
				if !strings.HasPrefix(v.Rule, "unsupported") {
					v.Rule = c.name + ": " + r.Rule
				}
				return v
			}
			if !next {
				break
			}
		}
	}
	return Verdict{Source: p.src}
}

// nftValue is a value a selector reads from the packet.
type nftValue struct {
	kind  string // "addr", "proto" or "port"
	addr  netip.Addr
	value int
}

// matches says whether the element word s (an address or prefix, a
// protocol name or number, a port) holds v.
func (v nftValue) matches(s string) bool {
	switch v.kind {
	case "addr":
		p := parsePrefix(s)
		return p.IsValid() && p.Contains(v.addr)
	case "proto":
		pr, ok := parseProto(s)
		return ok && int(protoNumbers[pr]) == v.value
	default:
		n, err := strconv.Atoi(s)
		return err == nil && n == v.value
	}
}

// evalNFTRule evaluates one rule for p. A Verdict with a Rule means the
// rule decided the source (or is unsupported); next says whether the chain
// goes on with its next rule.
func evalNFTRule(t *knftables.FakeTable, fam Family, rule string, p packet) (v Verdict, next bool) {
	words := strings.Fields(rule)
	unsupported := func(why string) (Verdict, bool) {
		return Verdict{Rule: "unsupported " + why + " in rule: " + rule}, false
	}
	// selector reads "ip saddr . meta l4proto ..." at words[i:].
	selector := func(i int) ([]nftValue, int, bool) {
		var vals []nftValue
		for {
			if i+1 >= len(words) {
				return nil, i, false
			}
			var v nftValue
			switch words[i] + " " + words[i+1] {
			case "ip saddr", "ip6 saddr":
				v = nftValue{kind: "addr", addr: p.src}
			case "ip daddr", "ip6 daddr":
				v = nftValue{kind: "addr", addr: p.dst}
			case "meta l4proto":
				v = nftValue{kind: "proto", value: int(protoNumbers[annotations.Protocol(p.proto)])}
			case "th dport":
				v = nftValue{kind: "port", value: int(p.dport)}
			default:
				return nil, i, false
			}
			if (words[i] == "ip" && fam != IPv4) || (words[i] == "ip6" && fam != IPv6) {
				return nil, i, false
			}
			vals = append(vals, v)
			i += 2
			if i < len(words) && words[i] == "." {
				i++
				continue
			}
			return vals, i, true
		}
	}
	// lookup finds the element of set or map name whose key holds vals.
	lookup := func(name string, vals []nftValue) (*knftables.Element, bool) {
		var elems []*knftables.Element
		if s, ok := t.Sets[name]; ok {
			elems = s.Elements
		} else if m, ok := t.Maps[name]; ok {
			elems = m.Elements
		} else {
			return nil, false
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
	for i := 0; i < len(words); {
		switch w := words[i]; w {
		case "accept", "return":
			return Verdict{}, false
		case "counter":
			i++
		case "masquerade":
			return Verdict{Masquerade: true, Rule: rule}, false
		case "snat":
			i++
			if i < len(words) && (words[i] == "ip" || words[i] == "ip6") {
				i++
			}
			if i >= len(words) || words[i] != "to" {
				return unsupported("snat")
			}
			i++
			if i == len(words)-1 {
				a, err := netip.ParseAddr(words[i])
				if err != nil {
					return unsupported("snat address")
				}
				return Verdict{Source: a, Rule: rule}, false
			}
			vals, j, ok := selector(i)
			if !ok || j+2 != len(words) || words[j] != "map" || !strings.HasPrefix(words[j+1], "@") {
				return unsupported("snat map")
			}
			e, hit := lookup(words[j+1][1:], vals)
			if !hit {
				return Verdict{}, true // no element: the rule breaks
			}
			a, err := netip.ParseAddr(e.Value[0])
			if err != nil {
				return unsupported("map value " + e.Value[0])
			}
			return Verdict{Source: a, Rule: rule}, false
		default:
			vals, j, ok := selector(i)
			if !ok || j >= len(words) {
				return unsupported("match " + w)
			}
			negate := words[j] == "!="
			if negate {
				j++
			}
			if j >= len(words) {
				return unsupported("match " + w)
			}
			var hit bool
			if strings.HasPrefix(words[j], "@") {
				_, hit = lookup(words[j][1:], vals)
			} else {
				hit = len(vals) == 1 && vals[0].matches(words[j])
			}
			if hit == negate {
				return Verdict{}, true
			}
			i = j + 1
		}
	}
	return Verdict{}, true
}
