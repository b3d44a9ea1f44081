package snat

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/egressvip/egressvip/pkg/annotations"
)

// Fake is a stateful Runner for one family: it keeps a nat Table and
// applies restores (-A, -I, -D by spec, -F, -X), inserts and deletes to it
// with the kernel's checks that matter here (jumps need their chain,
// referenced chains cannot go, a failed restore changes nothing). Tests assert on its end state or Trace packets
// through it.
type Fake struct {
	mu    sync.Mutex
	table *Table
	// Restores counts successful Restore calls.
	Restores int
	// RestoreErr, when set, makes Restore fail with it.
	RestoreErr error
}

var _ Runner = (*Fake)(nil)

// NewFake returns a Fake with an empty nat table.
func NewFake() *Fake { return &Fake{table: NewTable()} }

// Restore applies payload like iptables-restore --noflush: declared chains
// are created or flushed, -A lines appended, all or nothing.
func (f *Fake) Restore(_ context.Context, payload []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.RestoreErr != nil {
		return f.RestoreErr
	}
	t := f.table.clone()
	sc := bufio.NewScanner(bytes.NewReader(payload))
	committed := false
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || line[0] == '#':
		case line == "*nat":
		case line[0] == '*':
			return fmt.Errorf("fake iptables-restore: line %d: only the nat table is supported", n)
		case line == "COMMIT":
			committed = true
		case line[0] == ':':
			name, _, _ := strings.Cut(line[1:], " ")
			t.addChain(name)
			if !slices.Contains(builtinChains, name) {
				t.chains[name] = nil
			}
		case strings.HasPrefix(line, "-A "):
			words := splitWords(line[3:])
			if err := t.checkAppend(words); err != nil {
				return fmt.Errorf("fake iptables-restore: line %d: %w", n, err)
			}
			t.append(words[0], words[1:])
		case strings.HasPrefix(line, "-I "):
			words := splitWords(line[3:])
			pos := 1
			if len(words) > 1 {
				if p, err := strconv.Atoi(words[1]); err == nil {
					pos, words = p, append(words[:1:1], words[2:]...)
				}
			}
			if err := t.insert(words[0], pos, words[1:]); err != nil {
				return fmt.Errorf("fake iptables-restore: line %d: %w", n, err)
			}
		case strings.HasPrefix(line, "-D "):
			if err := t.deleteSpec(splitWords(line[3:])); err != nil {
				return fmt.Errorf("fake iptables-restore: line %d: %w", n, err)
			}
		case strings.HasPrefix(line, "-F "):
			if err := t.flush(strings.TrimSpace(line[3:])); err != nil {
				return fmt.Errorf("fake iptables-restore: line %d: %w", n, err)
			}
		case strings.HasPrefix(line, "-X "):
			if err := t.deleteChain(strings.TrimSpace(line[3:])); err != nil {
				return fmt.Errorf("fake iptables-restore: line %d: %w", n, err)
			}
		default:
			return fmt.Errorf("fake iptables-restore: line %d: unsupported %q", n, line)
		}
	}
	if !committed {
		return fmt.Errorf("fake iptables-restore: no COMMIT")
	}
	f.table = t
	f.Restores++
	return nil
}

// Save returns the table as iptables-save prints it.
func (f *Fake) Save(context.Context) ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.table.Save(), nil
}

// List returns the rules of chain.
func (f *Fake) List(chain string) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.table.chains[chain]; !ok {
		return nil, fmt.Errorf("fake iptables: chain %s does not exist", chain)
	}
	return f.table.Rules(chain), nil
}

// Insert inserts a rule at pos (1-based).
func (f *Fake) Insert(chain string, pos int, rulespec ...string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.table.insert(chain, pos, rulespec)
}

func (t *Table) insert(chain string, pos int, rulespec []string) error {
	words := append([]string{chain}, rulespec...)
	if err := t.checkAppend(words); err != nil {
		return fmt.Errorf("fake iptables: %w", err)
	}
	rules := t.chains[chain]
	if pos < 1 || pos > len(rules)+1 {
		return fmt.Errorf("fake iptables: index of insertion too big")
	}
	r := tableRule{words: slices.Clone(rulespec), m: parseMatch(rulespec)}
	t.chains[chain] = slices.Insert(rules, pos-1, r)
	return nil
}

// deleteSpec deletes the first rule of words[0] whose spec is words[1:],
// like iptables -D CHAIN spec.
func (t *Table) deleteSpec(words []string) error {
	if len(words) == 0 {
		return fmt.Errorf("rule without chain")
	}
	rules, ok := t.chains[words[0]]
	if !ok {
		return fmt.Errorf("chain %s does not exist", words[0])
	}
	want := joinWords(words[1:])
	i := slices.IndexFunc(rules, func(r tableRule) bool { return joinWords(r.words) == want })
	if i < 0 {
		return fmt.Errorf("bad rule (does a matching rule exist in that chain?)")
	}
	t.chains[words[0]] = slices.Delete(rules, i, i+1)
	return nil
}

func (t *Table) flush(chain string) error {
	if _, ok := t.chains[chain]; !ok {
		return fmt.Errorf("chain %s does not exist", chain)
	}
	t.chains[chain] = nil
	return nil
}

// deleteChain deletes an empty user chain that nothing jumps to.
func (t *Table) deleteChain(chain string) error {
	rules, ok := t.chains[chain]
	if !ok || slices.Contains(builtinChains, chain) {
		return fmt.Errorf("no user chain %s", chain)
	}
	if len(rules) > 0 {
		return fmt.Errorf("chain %s is not empty", chain)
	}
	for c, rules := range t.chains {
		for _, r := range rules {
			if r.m.target == chain && c != chain {
				return fmt.Errorf("chain %s is referenced from %s", chain, c)
			}
		}
	}
	delete(t.chains, chain)
	t.order = slices.DeleteFunc(t.order, func(c string) bool { return c == chain })
	return nil
}

// Append appends a rule; tests use it for foreign rules.
func (f *Fake) Append(chain string, rulespec ...string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.table.insert(chain, len(f.table.chains[chain])+1, rulespec)
}

// DeleteAt deletes the rule at pos (1-based).
func (f *Fake) DeleteAt(chain string, pos int) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	rules, ok := f.table.chains[chain]
	if !ok || pos < 1 || pos > len(rules) {
		return fmt.Errorf("fake iptables: no rule %d in chain %s", pos, chain)
	}
	f.table.chains[chain] = slices.Delete(rules, pos-1, pos)
	return nil
}

// ListChains returns all chain names.
func (f *Fake) ListChains() ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.table.Chains(), nil
}

// ListAt returns rule pos (1-based) of chain.
func (f *Fake) ListAt(chain string, pos int) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	rules := f.table.Rules(chain)
	if _, ok := f.table.chains[chain]; !ok || pos < 1 || pos > len(rules) {
		return "", fmt.Errorf("fake iptables: no rule %d in chain %s", pos, chain)
	}
	return rules[pos-1], nil
}

// DeleteChain flushes and deletes a user chain that nothing jumps to.
func (f *Fake) DeleteChain(chain string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.table.chains[chain]; !ok {
		return fmt.Errorf("fake iptables: no user chain %s", chain)
	}
	t := f.table.clone()
	t.chains[chain] = nil
	if err := t.deleteChain(chain); err != nil {
		return fmt.Errorf("fake iptables: %w", err)
	}
	f.table = t
	return nil
}

// Trace walks a packet through the fake's nat POSTROUTING; see Table.Trace.
func (f *Fake) Trace(src, dst netip.Addr, proto annotations.Protocol, dport uint16) Verdict {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.table.Trace(src, dst, proto, dport)
}

// Table returns a copy of the fake's table.
func (f *Fake) Table() *Table {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.table.clone()
}

func (t *Table) clone() *Table {
	c := &Table{order: slices.Clone(t.order), chains: make(map[string][]tableRule, len(t.chains))}
	for k, v := range t.chains {
		c.chains[k] = slices.Clone(v)
	}
	return c
}

// checkAppend checks that words ("CHAIN spec...") names an existing chain
// and, when it jumps to a chain that is not a built-in target, that it
// exists.
func (t *Table) checkAppend(words []string) error {
	if len(words) == 0 {
		return fmt.Errorf("rule without chain")
	}
	if _, ok := t.chains[words[0]]; !ok {
		return fmt.Errorf("chain %s does not exist", words[0])
	}
	target := parseMatch(words[1:]).target
	switch target {
	case "", "ACCEPT", "DROP", "RETURN", "SNAT", "DNAT", "MASQUERADE", "MARK", "LOG", "REDIRECT":
		return nil
	}
	if _, ok := t.chains[target]; !ok || slices.Contains(builtinChains, target) {
		return fmt.Errorf("couldn't load target %s: no such chain", target)
	}
	return nil
}
