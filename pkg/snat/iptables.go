package snat

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
)

// iptablesWriter is the iptables backend (legacy or nft binaries): the owned
// chain per family, written with one iptables-restore --noflush, and its
// hook at position 1 of nat POSTROUTING.
type iptablesWriter struct {
	backend string
	runners [2]Runner
	// gen reads the nftables ruleset generation (iptables-nft: its rules
	// are nftables objects); nil without one (iptables-legacy, Fakes).
	gen func() (uint32, error)
	// present says whether family f's nat table may hold anything; nil
	// means always. Set for leftover clean-up of iptables-legacy, whose
	// listing would create the table (and load its module).
	present func(f Family) bool
	fam     [2]iptablesState
}

// iptablesState is what the writer knows of one family's chain.
type iptablesState struct {
	// written is the payload of the last successful restore of the chain,
	// or nil when the kernel's chain is unknown or differs.
	written []byte
	// rules is the number of rules in written, last the last one (words
	// joined as joinWords does), for the cheap check.
	rules int
	last  string
	// gen is a ruleset generation (iptables-nft) at which the chain and
	// the hook were known to be as written (genOK).
	gen   uint32
	genOK bool
}

func (st *iptablesState) setWritten(payload []byte) {
	st.written, st.rules, st.last = payload, 0, ""
	for l := range bytes.Lines(payload) {
		if bytes.HasPrefix(l, []byte("-A ")) {
			st.rules++
			st.last = string(bytes.TrimSpace(l))
		}
	}
	if st.last != "" {
		st.last = canonicalRule(st.last)
	}
}

// canonicalRule re-joins the words of a rule line, so that quoting
// differences do not count.
func canonicalRule(line string) string { return joinWords(splitWords(line)) }

// newIPTablesWriter returns the writer of an iptables backend; nil runners
// are the backend's binaries, which must exist.
func newIPTablesWriter(b backend, runners [2]Runner) (*iptablesWriter, error) {
	w := &iptablesWriter{backend: "iptables-" + b.name, runners: runners}
	real := false
	for _, f := range Families {
		if w.runners[f] != nil {
			continue
		}
		real = true
		for _, bin := range b.binaries[f] {
			if _, err := exec.LookPath(bin); err != nil {
				return nil, fmt.Errorf("SNAT backend iptables-%s needs %s, which is not installed (%w); the env vars %s (%s) and %s (true: iptables-nft) select the backend",
					b.name, bin, err, backendEnv, strings.Join(Backends, ", "), withNFTablesEnv)
			}
		}
		r, err := newExecRunner(f, b.binaries[f])
		if err != nil {
			return nil, fmt.Errorf("SNAT backend iptables-%s: %w", b.name, err)
		}
		w.runners[f] = r
	}
	if real && b.name == nftBackend.name {
		w.gen = nftGeneration
	}
	return w, nil
}

func (w *iptablesWriter) generation() (uint32, error) {
	if w.gen == nil {
		return 0, errNoGeneration
	}
	return w.gen()
}

// hookLines returns the rules of nat POSTROUTING ("-A POSTROUTING ...")
// that jump to Chain.
func hookLines(rules []string) []string {
	var out []string
	for _, l := range rules {
		if isHook(l) {
			out = append(out, l)
		}
	}
	return out
}

func isHook(line string) bool { return parseMatch(splitWords(line)).target == Chain }

// writeHookRepair appends to an iptables-restore payload the lines that
// leave exactly one hook, first in nat POSTROUTING: every existing copy is
// deleted by its rule spec, then the hook is inserted at position 1. Being
// part of one restore, it is atomic, and a rule someone inserts meanwhile
// is never deleted by a stale position.
func writeHookRepair(b *bytes.Buffer, hooks []string) {
	for _, h := range hooks {
		b.WriteString("-D " + strings.TrimPrefix(h, "-A ") + "\n")
	}
	b.WriteString("-I " + hookChain + " 1 " + joinWords(hookSpec) + "\n")
}

// write makes family f's chain render next and its hook the one first rule
// of nat POSTROUTING, with at most one iptables-restore: the chain when its
// payload changed (or the hook vanished, and the chain may have gone with
// it), the hook repair when the hook is not alone at position 1.
func (w *iptablesWriter) write(ctx context.Context, f Family, next Desired) error {
	r, st := w.runners[f], &w.fam[f]
	rules, err := r.List(hookChain)
	if err != nil {
		return fmt.Errorf("list nat %s: %w", hookChain, err)
	}
	hooks := hookLines(rules)
	hookOK := len(hooks) == 1 && isHook(rules[0])
	payload := render(next)
	rewrite := !bytes.Equal(payload, st.written) || len(hooks) == 0
	if !rewrite && hookOK {
		return nil
	}
	var b bytes.Buffer
	if rewrite {
		b.Write(bytes.TrimSuffix(payload, []byte("COMMIT\n")))
	} else {
		b.WriteString("*nat\n")
	}
	if !hookOK {
		writeHookRepair(&b, hooks)
	}
	b.WriteString("COMMIT\n")
	g0, gerr := w.generation()
	st.genOK = false
	if err := r.Restore(ctx, b.Bytes()); err != nil {
		st.written = nil
		return fmt.Errorf("write chain %s: %w", Chain, err)
	}
	if !rewrite {
		// Only the hook was repaired: the chain is believed, not known,
		// to be intact, so the next check looks at it.
		return nil
	}
	st.setWritten(payload)
	if gerr == nil {
		if g1, err := w.generation(); err == nil && g1 == g0+1 {
			st.gen, st.genOK = g1, true
		}
	}
	return nil
}

// check says whether, in every family of fams, the chain is as last
// written and its hook is the only one and first in nat POSTROUTING. It
// costs one netlink round trip while nothing in nftables changed
// (iptables-nft), else two listings: nat POSTROUTING and the chain's last
// rule (a flushed, shortened or edited chain has no such rule).
func (w *iptablesWriter) check(_ context.Context, fams []Family) (bool, error) {
	for _, f := range fams {
		r, st := w.runners[f], &w.fam[f]
		if st.written == nil {
			return false, nil
		}
		g, gerr := w.generation()
		if gerr == nil && st.genOK && g == st.gen {
			continue
		}
		rules, err := r.List(hookChain)
		if err != nil {
			return false, fmt.Errorf("snat %s: list nat %s: %w", f, hookChain, err)
		}
		if len(hookLines(rules)) != 1 || !isHook(rules[0]) {
			return false, nil
		}
		if st.rules == 0 {
			if _, err := r.List(Chain); err != nil {
				return false, nil // the chain is gone
			}
		} else {
			line, err := r.ListAt(Chain, st.rules)
			if err != nil || canonicalRule(line) != st.last {
				return false, nil
			}
		}
		if gerr == nil {
			if g2, err := w.generation(); err == nil && g2 == g {
				st.gen, st.genOK = g, true
			}
		}
	}
	return true, nil
}

// seed reads the chain left by a previous process (or changed by someone):
// its rules are returned, and if they are exactly what Render makes of
// them, the next write of the same state writes nothing.
func (w *iptablesWriter) seed(ctx context.Context, f Family) (Desired, bool, error) {
	st := &w.fam[f]
	*st = iptablesState{}
	out, err := w.runners[f].Save(ctx)
	if err != nil {
		return Desired{}, false, err
	}
	t, err := ParseSave(out)
	if err != nil {
		return Desired{}, false, fmt.Errorf("parse iptables-save output: %w", err)
	}
	if _, ok := t.chains[Chain]; !ok {
		return Desired{}, false, nil
	}
	prev := t.Owned().forFamily(f)
	payload := render(prev)
	if rendered, err := ParseSave(payload); err == nil && slices.Equal(rendered.Rules(Chain), t.Rules(Chain)) {
		st.setWritten(payload)
	}
	return prev, false, nil
}

// cleanup removes the hooks and every chain starting with ChainPrefix in
// both families, one iptables-restore per family; nothing else.
func (w *iptablesWriter) cleanup(ctx context.Context) error {
	var errs []error
	for _, f := range Families {
		w.fam[f] = iptablesState{}
		if w.present != nil && !w.present(f) {
			continue
		}
		if err := cleanupFamily(ctx, w.runners[f]); err != nil {
			errs = append(errs, fmt.Errorf("snat %s cleanup: %w", f, err))
		}
	}
	return errors.Join(errs...)
}

func cleanupFamily(ctx context.Context, r Runner) error {
	rules, err := r.List(hookChain)
	if err != nil {
		return fmt.Errorf("list nat %s: %w", hookChain, err)
	}
	chains, err := r.ListChains()
	if err != nil {
		return fmt.Errorf("list nat chains: %w", err)
	}
	var owned []string
	for _, c := range chains {
		if strings.HasPrefix(c, ChainPrefix) {
			owned = append(owned, c)
		}
	}
	hooks := hookLines(rules)
	if len(hooks) == 0 && len(owned) == 0 {
		return nil
	}
	var b bytes.Buffer
	b.WriteString("*nat\n")
	for _, h := range hooks {
		b.WriteString("-D " + strings.TrimPrefix(h, "-A ") + "\n")
	}
	for _, c := range owned {
		b.WriteString("-F " + c + "\n")
	}
	for _, c := range owned {
		b.WriteString("-X " + c + "\n")
	}
	b.WriteString("COMMIT\n")
	if err := r.Restore(ctx, b.Bytes()); err != nil {
		return fmt.Errorf("delete hooks and chains %s: %w", strings.Join(owned, ", "), err)
	}
	return nil
}

// services returns the comments of the SNAT rules in the owned chains.
func (w *iptablesWriter) services(ctx context.Context) ([]string, error) {
	var out []string
	for _, f := range Families {
		save, err := w.runners[f].Save(ctx)
		if err != nil {
			return nil, fmt.Errorf("snat %s: %w", f, err)
		}
		t, err := ParseSave(save)
		if err != nil {
			return nil, fmt.Errorf("snat %s: parse iptables-save output: %w", f, err)
		}
		out = append(out, t.Services()...)
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}

// legacyTablePresent says whether family f's legacy nat table exists in
// the network namespace of the calling thread, without creating it: the
// kernel lists the tables of loaded ip_tables/ip6_tables modules there.
func legacyTablePresent(f Family) bool {
	name := "/proc/thread-self/net/ip_tables_names"
	if f == IPv6 {
		name = "/proc/thread-self/net/ip6_tables_names"
	}
	data, err := os.ReadFile(name)
	if err != nil {
		return false
	}
	return slices.Contains(strings.Fields(string(data)), "nat")
}
