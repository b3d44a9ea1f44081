package snat

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"

	"sigs.k8s.io/knftables"
)

// Fake is a stateful Runner for one family: it keeps the tables and applies
// restores (-A, -I, -D by spec, -F, -X) with the kernel's checks that matter
// here (jumps need their chain, referenced or non-empty chains cannot go, a
// failed restore changes nothing). Tests assert on its end state or trace
// packets through it.
type Fake struct {
	mu sync.Mutex
	rs ruleset
	// Restores counts successful Restore calls, Attempts all of them.
	Restores, Attempts int
	// RestoreErr, when set, makes Restore fail with it.
	RestoreErr error
	// Refuse, when set, makes a restore fail if one of its rules contains
	// it: a rule the kernel refuses (a missing match module, say).
	Refuse string
}

var _ Runner = (*Fake)(nil)

// NewFake returns a Fake with no tables (as iptables-legacy before anything
// touched it).
func NewFake() *Fake { return &Fake{rs: ruleset{}} }

func (rs ruleset) clone() ruleset {
	out := ruleset{}
	for n, t := range rs {
		c := &table{name: n, order: slices.Clone(t.order), chains: map[string][]tableRule{}}
		for k, v := range t.chains {
			c.chains[k] = slices.Clone(v)
		}
		out[n] = c
	}
	return out
}

func (rs ruleset) table(name string) *table {
	t := rs[name]
	if t == nil {
		t = newTable(name)
		rs[name] = t
	}
	return t
}

// Restore applies payload like iptables-restore --noflush: declared chains
// are created or flushed, rules appended, inserted or deleted, all or
// nothing.
func (f *Fake) Restore(_ context.Context, payload []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.Attempts++
	if f.RestoreErr != nil {
		return f.RestoreErr
	}
	rs := f.rs.clone()
	var t *table
	sc := bufio.NewScanner(bytes.NewReader(payload))
	sc.Buffer(nil, 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		fail := func(err error) error { return fmt.Errorf("fake iptables-restore: line %d: %w", n, err) }
		switch {
		case line == "" || line[0] == '#':
		case line[0] == '*':
			if _, ok := builtinChains[line[1:]]; !ok {
				return fail(fmt.Errorf("no table %s", line[1:]))
			}
			t = rs.table(line[1:])
		case t == nil:
			return fail(fmt.Errorf("%q outside a table", line))
		case line == "COMMIT":
			t = nil
		case line[0] == ':':
			name, _, _ := strings.Cut(line[1:], " ")
			t.addChain(name)
			if !isBuiltin(t.name, name) {
				t.chains[name] = nil
			}
		case strings.HasPrefix(line, "-A "):
			words := splitWords(line[3:])
			if f.Refuse != "" && strings.Contains(line, f.Refuse) {
				return fail(fmt.Errorf("refused rule %q", line))
			}
			if err := t.insert(words[0], len(t.chains[words[0]])+1, words[1:]); err != nil {
				return fail(err)
			}
		case strings.HasPrefix(line, "-I "):
			words := splitWords(line[3:])
			pos := 1
			if len(words) > 1 {
				if p, err := strconv.Atoi(words[1]); err == nil {
					pos, words = p, append(words[:1:1], words[2:]...)
				}
			}
			if err := t.insert(words[0], pos, words[1:]); err != nil {
				return fail(err)
			}
		case strings.HasPrefix(line, "-D "):
			if err := t.deleteSpec(splitWords(line[3:])); err != nil {
				return fail(err)
			}
		case strings.HasPrefix(line, "-F "):
			if err := t.flush(strings.TrimSpace(line[3:])); err != nil {
				return fail(err)
			}
		case strings.HasPrefix(line, "-X "):
			if err := t.deleteChain(strings.TrimSpace(line[3:])); err != nil {
				return fail(err)
			}
		default:
			return fail(fmt.Errorf("unsupported %q", line))
		}
	}
	if t != nil {
		return fmt.Errorf("fake iptables-restore: no COMMIT")
	}
	f.rs = rs
	f.Restores++
	return nil
}

// Save prints every table as iptables-save does (without counters).
func (f *Fake) Save(context.Context) ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.rs.save(), nil
}

func (rs ruleset) save() []byte {
	var b bytes.Buffer
	for _, name := range slices.Sorted(maps.Keys(rs)) {
		t := rs[name]
		b.WriteString("*" + name + "\n")
		for _, c := range t.order {
			policy := "-"
			if isBuiltin(name, c) {
				policy = "ACCEPT"
			}
			fmt.Fprintf(&b, ":%s %s [0:0]\n", c, policy)
		}
		for _, c := range t.order {
			for _, r := range t.chains[c] {
				b.WriteString("-A " + c + " " + r.spec + "\n")
			}
		}
		b.WriteString("COMMIT\n")
	}
	return b.Bytes()
}

// Dump returns the tables as iptables-save prints them.
func (f *Fake) Dump() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return string(f.rs.save())
}

// List returns the rules of a chain as "-A CHAIN ..." lines.
func (f *Fake) List(tbl, chain string) []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	if t := f.rs[tbl]; t != nil {
		for _, s := range t.specs(chain) {
			out = append(out, "-A "+chain+" "+s)
		}
	}
	return out
}

// Chains returns the chains of a table.
func (f *Fake) Chains(tbl string) []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if t := f.rs[tbl]; t != nil {
		return slices.Clone(t.order)
	}
	return nil
}

// Insert inserts a rule at pos (1-based), as another program would.
func (f *Fake) Insert(tbl, chain string, pos int, rulespec ...string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.rs.table(tbl).insert(chain, pos, rulespec)
}

// Append appends a rule, as another program would.
func (f *Fake) Append(tbl, chain string, rulespec ...string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	t := f.rs.table(tbl)
	return t.insert(chain, len(t.chains[chain])+1, rulespec)
}

// DeleteAt deletes the rule at pos (1-based).
func (f *Fake) DeleteAt(tbl, chain string, pos int) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	t := f.rs.table(tbl)
	rules, ok := t.chains[chain]
	if !ok || pos < 1 || pos > len(rules) {
		return fmt.Errorf("fake iptables: no rule %d in chain %s", pos, chain)
	}
	t.chains[chain] = slices.Delete(rules, pos-1, pos)
	return nil
}

// Flush deletes every rule of a chain.
func (f *Fake) Flush(tbl, chain string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.rs.table(tbl).flush(chain)
}

// DeleteChain flushes and deletes a user chain that nothing jumps to.
func (f *Fake) DeleteChain(tbl, chain string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	rs := f.rs.clone()
	t := rs.table(tbl)
	if _, ok := t.chains[chain]; !ok {
		return fmt.Errorf("fake iptables: no user chain %s", chain)
	}
	t.chains[chain] = nil
	if err := t.deleteChain(chain); err != nil {
		return fmt.Errorf("fake iptables: %w", err)
	}
	f.rs = rs
	return nil
}

func (t *table) insert(chain string, pos int, rulespec []string) error {
	if _, ok := t.chains[chain]; !ok {
		return fmt.Errorf("chain %s does not exist", chain)
	}
	m := parseMatch(rulespec)
	switch m.target {
	case "", "ACCEPT", "DROP", "RETURN", "SNAT", "DNAT", "MASQUERADE", "MARK", "LOG", "REDIRECT", "TCPMSS":
	default:
		if _, ok := t.chains[m.target]; !ok || isBuiltin(t.name, m.target) {
			return fmt.Errorf("couldn't load target %s: no such chain", m.target)
		}
	}
	rules := t.chains[chain]
	if pos < 1 || pos > len(rules)+1 {
		return fmt.Errorf("index of insertion too big")
	}
	t.chains[chain] = slices.Insert(rules, pos-1, tableRule{spec: joinWords(rulespec), m: m})
	return nil
}

// deleteSpec deletes the first rule of words[0] whose spec is words[1:],
// like iptables -D CHAIN spec.
func (t *table) deleteSpec(words []string) error {
	if len(words) == 0 {
		return fmt.Errorf("rule without chain")
	}
	rules, ok := t.chains[words[0]]
	if !ok {
		return fmt.Errorf("chain %s does not exist", words[0])
	}
	want := joinWords(words[1:])
	i := slices.IndexFunc(rules, func(r tableRule) bool { return r.spec == want })
	if i < 0 {
		return fmt.Errorf("bad rule (does a matching rule exist in that chain?)")
	}
	t.chains[words[0]] = slices.Delete(rules, i, i+1)
	return nil
}

func (t *table) flush(chain string) error {
	if _, ok := t.chains[chain]; !ok {
		return fmt.Errorf("chain %s does not exist", chain)
	}
	t.chains[chain] = nil
	return nil
}

// deleteChain deletes an empty user chain that nothing jumps to.
func (t *table) deleteChain(chain string) error {
	rules, ok := t.chains[chain]
	if !ok || isBuiltin(t.name, chain) {
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

// FakeNFT is an NFTables for one family on a knftables.Fake: transactions
// are all or nothing, every successful Run advances the generation like a
// kernel commit. Tests change the table behind the Manager's back with Run,
// as another process would, and trace packets through it.
type FakeNFT struct {
	*knftables.Fake
	family Family
	table  string

	mu  sync.Mutex
	gen uint32
	// Runs counts successful Run calls, Attempts all of them.
	Runs, Attempts int
	// RunErr, when set, makes Run fail with it.
	RunErr error
	// Refuse, when set, makes a transaction that contains it fail: an
	// element or rule the kernel refuses.
	Refuse string
	// AfterRun, when set, is called after each successful Run: someone
	// else committing right after us.
	AfterRun func()
	// Lists counts ListElements calls (each one an nft run for real).
	Lists int
}

// ListElements counts the call and lists from the fake.
func (f *FakeNFT) ListElements(ctx context.Context, objectType, name string) ([]*knftables.Element, error) {
	f.mu.Lock()
	f.Lists++
	f.mu.Unlock()
	return f.Fake.ListElements(ctx, objectType, name)
}

var _ NFTables = (*FakeNFT)(nil)

// NewFakeNFT returns a FakeNFT for egressvip's table of family f, with no
// table yet.
func NewFakeNFT(f Family) *FakeNFT { return newFakeNFTTable(f, TableName) }

func newFakeNFTTable(f Family, name string) *FakeNFT {
	return &FakeNFT{Fake: knftables.NewFake(knftFamily(f), name), family: f, table: name}
}

// Run runs tx on the fake; a successful one is one commit.
func (f *FakeNFT) Run(ctx context.Context, tx *knftables.Transaction) error {
	f.mu.Lock()
	f.Attempts++
	if f.RunErr != nil {
		f.mu.Unlock()
		return f.RunErr
	}
	if f.Refuse != "" && strings.Contains(tx.String(), f.Refuse) {
		f.mu.Unlock()
		return fmt.Errorf("fake nft: Error: Could not process rule: refused %q", f.Refuse)
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
		return nil, fmt.Errorf("%w %s %s", ErrNoTable, knftFamily(f.family), f.table)
	}
	sum := sha256.Sum256([]byte(f.Fake.Dump()))
	return sum[:], nil
}
