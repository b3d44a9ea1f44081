package snat

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"os/exec"
	"slices"
	"strings"

	"github.com/sirupsen/logrus"
)

// iptablesWriter is an iptables backend (legacy or nft binaries): the owned
// chains of each family (see iptRender) in the raw, mangle and nat tables,
// written with one iptables-restore --noflush, their hooks at position 1 of
// raw PREROUTING, mangle PREROUTING (and FORWARD) and nat POSTROUTING, and
// the fence in an nftables table of the backend's own.
//
// What iptables cannot do that the nftables backend does:
//   - The steering marks, holds and the gate run in mangle PREROUTING,
//     before kube-proxy's DNAT (nat PREROUTING) and the routing decision
//     they must precede: they see only a connection's original
//     destination. A connection DNATed from an address outside the
//     exclusions (a LoadBalancer IP or external IP kube-proxy
//     short-circuits) to an excluded one (a pod) is still steered or held.
//     The SNAT chain (nat POSTROUTING) checks both destinations, like
//     nftables.
//   - Rules are walked one by one: a new connection costs a walk of the
//     SNAT chain, and every packet one of the mangle chain up to its pod's
//     rules (per-pod sets and maps need nftables). Anti-spoofing costs
//     every packet one reverse path lookup (-m rpfilter); only packets that
//     fail it walk the list of pods.
//   - Destination prefixes of Allow and Deny are expanded into one rule per
//     allowed prefix (Allow minus Deny) and port.
//   - The fence needs to match after the source translation, which
//     iptables cannot: it lives in an nftables table named
//     egressvip-iptables-legacy or egressvip-iptables-nft, written after
//     the restore (a second transaction). Without a working nft there is no
//     fence (logged once).
//   - Steered packets are ACCEPTed at the top of the owned nat chain, which
//     sets up no translation: a MASQUERADE of the other iptables flavour
//     (or of an nftables chain after it) still applies to them. The
//     nftables backend's null SNAT stops every later nat chain.
//   - The tables are committed one by one by iptables-legacy-restore (raw,
//     mangle, nat); iptables-nft-restore commits them at once.
type iptablesWriter struct {
	backend string
	opts    datapathOptions
	runners [2]Runner
	// gen reads the nftables ruleset generation (iptables-nft: its rules
	// are nftables objects); nil without one (iptables-legacy, fakes).
	gen func() (uint32, error)
	// fence writes the fence table; nil without nft.
	fence *nftWriter
	fam   [2]iptablesState
}

// iptablesState is what the writer knows of one family.
type iptablesState struct {
	// written are the owned chains of the last successful write, by
	// table, and their digests; nil when the kernel's state is unknown.
	written map[string][]iptChain
	sums    map[string]map[string][]byte
	// gen is a ruleset generation (iptables-nft) at which the chains, the
	// hooks and the fence were known to be as written (genOK).
	gen   uint32
	genOK bool
}

// fenceTable is the nftables table of an iptables backend's fence.
func fenceTable(b backend) string { return TableName + "-iptables-" + b.name }

// newIPTablesWriter returns the writer of an iptables backend; nil runners
// are the backend's binaries, which must exist. The fence uses tables when
// set, else the nft binary when the runners are the real binaries too;
// without nft there is no fence, said on log (when set).
func newIPTablesWriter(b backend, opts datapathOptions, runners [2]Runner, tables [2]NFTables, log *logrus.Entry) (*iptablesWriter, error) {
	w := &iptablesWriter{backend: "iptables-" + b.name, opts: opts, runners: runners}
	real := runners == [2]Runner{}
	for _, f := range Families {
		if w.runners[f] != nil {
			continue
		}
		for _, bin := range b.binaries[f] {
			if _, err := exec.LookPath(bin); err != nil {
				return nil, fmt.Errorf("backend iptables-%s needs %s, which is not installed (%w); the env vars %s (%s) and %s (true: iptables-nft) select the backend",
					b.name, bin, err, backendEnv, strings.Join(Backends, ", "), withNFTablesEnv)
			}
		}
		r, err := newExecRunner(f, b.binaries[f])
		if err != nil {
			return nil, fmt.Errorf("backend iptables-%s: %w", b.name, err)
		}
		w.runners[f] = r
	}
	if real && b.name == nftBackend.name {
		w.gen = nftGeneration
	}
	if tables != [2]NFTables{} || real {
		fence, err := newNFTWriter(fenceTable(b), true, opts, tables)
		if err != nil {
			if log != nil {
				log.WithError(err).WithField("backend", w.backend).Warn("No fence: an SNAT to an address this node no longer holds is not stopped (the fence needs nft)")
			}
		} else {
			w.fence = fence
		}
	}
	return w, nil
}

func (w *iptablesWriter) generation() (uint32, error) {
	if w.gen == nil {
		return 0, errNoGeneration
	}
	return w.gen()
}

// write makes family f's owned chains render c and every hook the one
// first rule of its built-in chain, with at most one iptables-restore of
// the tables where something differs from what iptables-save shows (owned
// chains declared, which flushes them, and refilled; owned chains nothing
// uses any more deleted; hooks repaired by rule spec), then the fence.
func (w *iptablesWriter) write(ctx context.Context, f Family, c *compiled) error {
	r, st := w.runners[f], &w.fam[f]
	want := iptRender(f, c, w.opts)
	g0, gerr := w.generation()
	ours := 0 // our commits since g0
	if st.written == nil || !st.genOK || gerr != nil || g0 != st.gen || !sameChains(st.written, want) {
		// What the kernel holds: what we wrote, while nothing committed
		// since (iptables-nft), else what iptables-save shows.
		var scans map[string]*tableScan
		if st.written != nil && st.genOK && gerr == nil && g0 == st.gen {
			scans = w.scansOf(st.sums)
		} else {
			save, err := r.Save(ctx)
			if err != nil {
				st.written = nil
				return err
			}
			scans = scanSave(save)
		}
		st.genOK = false
		sums := chainSums(want)
		if payload := w.payload(scans, want, sums); len(payload) > 0 {
			if err := r.Restore(ctx, payload); err != nil {
				st.written = nil
				return fmt.Errorf("write chains %s*: %w", ChainPrefix, err)
			}
			ours++
		}
		st.written, st.sums = want, sums
	}
	if w.fence != nil {
		before := w.fence.commits
		if err := w.fence.write(ctx, f, c); err != nil {
			st.genOK = false
			return fmt.Errorf("fence: %w", err)
		}
		ours += w.fence.commits - before
	}
	// The generation is trusted only when every commit since g0 was ours.
	st.genOK = false
	if gerr == nil {
		if g1, err := w.generation(); err == nil && g1 == g0+uint32(ours) {
			st.gen, st.genOK = g1, true
		}
	}
	return nil
}

func sameChains(a, b map[string][]iptChain) bool {
	eq := func(x, y iptChain) bool { return x.name == y.name && slices.Equal(x.rules, y.rules) }
	for _, t := range iptTables {
		if !slices.EqualFunc(a[t], b[t], eq) {
			return false
		}
	}
	return true
}

// scansOf returns the scans of tables holding the chains sums digests and
// egressvip's hooks, first.
func (w *iptablesWriter) scansOf(sums map[string]map[string][]byte) map[string]*tableScan {
	out := map[string]*tableScan{}
	for _, name := range iptTables {
		t := &tableScan{owned: map[string]*chainSum{}, jumps: map[string][]string{}, first: map[string]string{}}
		for c, sum := range sums[name] {
			t.owned[c] = &chainSum{sum: sum}
		}
		for _, h := range w.opts.hooks() {
			if h.table == name {
				t.jumps[h.chain] = []string{h.spec()}
				t.first[h.chain] = h.spec()
			}
		}
		out[name] = t
	}
	return out
}

// chainSums digests rendered chains, by table and chain.
func chainSums(want map[string][]iptChain) map[string]map[string][]byte {
	out := map[string]map[string][]byte{}
	for t, chains := range want {
		out[t] = map[string][]byte{}
		for _, c := range chains {
			out[t][c.name] = sumRules(c.name, c.rules)
		}
	}
	return out
}

// payload returns the iptables-restore input that turns the scanned
// tables into want (digested in sums), or nil when they already are.
func (w *iptablesWriter) payload(scans map[string]*tableScan, want map[string][]iptChain, sums map[string]map[string][]byte) []byte {
	var b bytes.Buffer
	for _, name := range iptTables {
		t := scans[name]
		if t == nil {
			t = &tableScan{}
		}
		chains := want[name]
		same := true
		wanted := map[string]bool{}
		for _, c := range chains {
			wanted[c.name] = true
			if have := t.owned[c.name]; have == nil || !bytes.Equal(have.value(), sums[name][c.name]) {
				same = false
			}
		}
		var stale []string
		for _, c := range slices.Sorted(maps.Keys(t.owned)) {
			if !wanted[c] {
				stale = append(stale, c)
			}
		}
		// Hooks: every jump from a built-in chain to an owned chain that
		// is not the one hook kept first in its chain goes.
		var deletes, inserts []string
		for _, bc := range builtinChains[name] {
			var keep *hook
			for _, h := range w.opts.hooks() {
				if h.table == name && h.chain == bc {
					keep = &h
				}
			}
			jumps := t.jumps[bc]
			if keep == nil && len(jumps) == 0 {
				continue
			}
			if keep != nil && len(jumps) == 1 && jumps[0] == keep.spec() && t.first[bc] == keep.spec() {
				continue
			}
			for _, j := range jumps {
				deletes = append(deletes, "-D "+bc+" "+j)
			}
			if keep != nil {
				inserts = append(inserts, "-I "+bc+" 1 "+keep.spec())
			}
		}
		if same && len(stale) == 0 && len(deletes) == 0 && len(inserts) == 0 {
			continue
		}
		b.WriteString("*" + name + "\n")
		if !same {
			for _, c := range chains {
				b.WriteString(":" + c.name + " - [0:0]\n")
			}
			for _, c := range chains {
				for _, r := range c.rules {
					b.WriteString("-A " + c.name + " " + r + "\n")
				}
			}
		}
		// Hooks first: a hook may jump to a stale chain.
		for _, l := range deletes {
			b.WriteString(l + "\n")
		}
		for _, c := range stale {
			b.WriteString("-F " + c + "\n")
		}
		for _, c := range stale {
			b.WriteString("-X " + c + "\n")
		}
		for _, l := range inserts {
			b.WriteString(l + "\n")
		}
		b.WriteString("COMMIT\n")
	}
	return b.Bytes()
}

// check says whether, in every family of fams, the owned chains are as last
// written and every hook is the only one and first in its chain, and the
// fence is intact. It costs one netlink round trip while nothing in
// nftables changed (iptables-nft), else one iptables-save.
func (w *iptablesWriter) check(ctx context.Context, fams []Family) (bool, error) {
	for _, f := range fams {
		r, st := w.runners[f], &w.fam[f]
		if st.written == nil {
			return false, nil
		}
		g, gerr := w.generation()
		if gerr == nil && st.genOK && g == st.gen {
			continue
		}
		save, err := r.Save(ctx)
		if err != nil {
			return false, fmt.Errorf("%s: %w", f, err)
		}
		if len(w.payload(scanSave(save), st.written, st.sums)) > 0 {
			return false, nil
		}
		if w.fence != nil {
			if ok, err := w.fence.check(ctx, []Family{f}); !ok || err != nil {
				return false, err
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

// seed reads what the owned chains left by a previous process (or changed
// by someone) do to each pod. The next write compares its chains with the
// kernel's, so an unchanged state writes nothing.
func (w *iptablesWriter) seed(ctx context.Context, f Family) (kernelState, bool, error) {
	w.fam[f] = iptablesState{}
	if w.fence != nil {
		if _, _, err := w.fence.seed(ctx, f); err != nil {
			return kernelState{}, false, err
		}
	}
	out, err := w.runners[f].Save(ctx)
	if err != nil {
		return kernelState{}, false, err
	}
	rs, err := parseSave(out, planChains)
	if err != nil {
		return kernelState{}, false, fmt.Errorf("parse iptables-save output: %w", err)
	}
	return rs.readPlans(), false, nil
}

// cleanup removes the hooks and every chain starting with ChainPrefix in
// the raw, mangle and nat tables of both families (one iptables-restore
// per family), and the fence table; nothing else.
func (w *iptablesWriter) cleanup(ctx context.Context) error {
	var errs []error
	for _, f := range Families {
		w.fam[f] = iptablesState{}
		if err := cleanupFamily(ctx, w.runners[f]); err != nil {
			errs = append(errs, fmt.Errorf("%s cleanup: %w", f, err))
		}
	}
	if w.fence != nil {
		if err := w.fence.cleanup(ctx); err != nil {
			errs = append(errs, fmt.Errorf("fence cleanup: %w", err))
		}
	}
	return errors.Join(errs...)
}

func cleanupFamily(ctx context.Context, r Runner) error {
	save, err := r.Save(ctx)
	if err != nil {
		return err
	}
	scans := scanSave(save)
	var b bytes.Buffer
	var owned []string
	for _, name := range slices.Sorted(maps.Keys(scans)) {
		t := scans[name]
		chains := slices.Sorted(maps.Keys(t.owned))
		if len(t.jumps) == 0 && len(chains) == 0 {
			continue
		}
		b.WriteString("*" + name + "\n")
		for _, bc := range builtinChains[name] {
			for _, spec := range t.jumps[bc] {
				b.WriteString("-D " + bc + " " + spec + "\n")
			}
		}
		for _, c := range chains {
			b.WriteString("-F " + c + "\n")
		}
		for _, c := range chains {
			b.WriteString("-X " + c + "\n")
		}
		b.WriteString("COMMIT\n")
		owned = append(owned, chains...)
	}
	if b.Len() == 0 {
		return nil
	}
	if err := r.Restore(ctx, b.Bytes()); err != nil {
		return fmt.Errorf("delete hooks and chains %s: %w", strings.Join(owned, ", "), err)
	}
	return nil
}

// services returns the comments of the rules in the owned chains.
func (w *iptablesWriter) services(ctx context.Context) ([]string, error) {
	var out []string
	for _, f := range Families {
		save, err := w.runners[f].Save(ctx)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", f, err)
		}
		rs, err := parseSave(save, ownedChain)
		if err != nil {
			return nil, fmt.Errorf("%s: parse iptables-save output: %w", f, err)
		}
		out = append(out, rs.services()...)
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}
