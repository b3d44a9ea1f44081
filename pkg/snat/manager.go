package snat

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"slices"
	"strings"
	"sync"

	"github.com/sirupsen/logrus"
	"github.com/vishvananda/netlink"
)

// backendEnv is the kube-vip environment variable that selects the backend.
const backendEnv = "egress_withnftables"

// Config configures a Manager.
type Config struct {
	// NFTables selects the iptables-nft binaries; false selects
	// iptables-legacy. It must match what the node's other components
	// (CNI, kube-proxy) use, or rule order across the two is undefined.
	NFTables bool
	// Log receives per-sync detail at debug level; nil means the standard
	// logger.
	Log *logrus.Entry
	// Runners, indexed by Family, replace the iptables binaries (tests pass
	// Fakes). A nil entry means the binaries of the selected backend.
	Runners [2]Runner
	// Conntrack deletes conntrack entries; nil means the netlink package
	// handle, which works in the network namespace of the calling thread.
	// Pass netlink.NewHandleAt(ns) to work in another namespace.
	Conntrack Conntrack
}

// Manager keeps the chains egressvip owns in the nat table of both families
// equal to a Desired state. It is safe for concurrent use, but meant to be
// called from one sync loop.
type Manager struct {
	log     *logrus.Entry
	runners [2]Runner
	ct      Conntrack

	mu    sync.Mutex
	state [2]familyState
}

// familyState is what the Manager knows about one family's chain.
type familyState struct {
	// seeded is set once prev and written were read from the kernel.
	seeded bool
	// prev is the state whose rules are in the kernel and whose conntrack
	// consequences have been dealt with.
	prev Desired
	// written is the payload of the last successful restore, or nil when
	// the kernel's chain is unknown or differs.
	written []byte
	// unusable is set while writing failed and no rule needed the family.
	unusable bool
}

// New returns a Manager for the configured backend. It fails, naming the
// binary and the environment variable, when a backend binary is missing.
func New(cfg Config) (*Manager, error) {
	m := &Manager{log: cfg.Log, runners: cfg.Runners, ct: cfg.Conntrack}
	if m.log == nil {
		m.log = logrus.NewEntry(logrus.StandardLogger())
	}
	if m.ct == nil {
		m.ct = netlinkConntrack{}
	}
	b := legacyBackend
	if cfg.NFTables {
		b = nftBackend
	}
	for _, f := range Families {
		if m.runners[f] != nil {
			continue
		}
		for _, bin := range b.binaries[f] {
			if _, err := exec.LookPath(bin); err != nil {
				return nil, fmt.Errorf("SNAT backend iptables-%s needs %s, which is not installed (%w); the env var %s selects the backend (true: iptables-nft, false: iptables-legacy)",
					b.name, bin, err, backendEnv)
			}
		}
		r, err := newExecRunner(f, b.binaries[f])
		if err != nil {
			return nil, fmt.Errorf("SNAT backend iptables-%s: %w", b.name, err)
		}
		m.runners[f] = r
	}
	return m, nil
}

// Apply makes the owned chains of both families match d: one
// iptables-restore per family whose rendered chain changed (or whose hook
// vanished), the hook moved back to position 1 of nat POSTROUTING if
// needed, then conntrack entries deleted for pods whose SNAT changed. The
// first Apply of a process reads the existing chains, so a restart with
// unchanged rules writes nothing and deletes no entry.
func (m *Manager) Apply(ctx context.Context, d Desired) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, r := range d.Rules {
		if !r.valid() {
			m.log.WithFields(logrus.Fields{"service": r.Service, "pod": r.PodIP, "ip": r.SourceIP}).
				Warn("Skipping SNAT rule with a missing address or mixed families")
		}
	}
	var errs []error
	for _, f := range Families {
		next := d.forFamily(f)
		err := m.applyFamily(ctx, f, next)
		st := &m.state[f]
		switch {
		case err == nil:
			st.unusable = false
		case len(next.Rules) == 0 && len(st.prev.Rules) == 0:
			// A family whose nat table cannot be used (IPv6 disabled
			// on the node) only matters once a rule needs it.
			if !st.unusable {
				m.log.WithError(err).WithField("family", f.String()).Warn("nat table unusable; ignored while no rule needs it")
			}
			st.unusable = true
		default:
			errs = append(errs, fmt.Errorf("snat %s: %w", f, err))
		}
	}
	return errors.Join(errs...)
}

func (m *Manager) applyFamily(ctx context.Context, f Family, next Desired) error {
	r, st := m.runners[f], &m.state[f]
	log := m.log.WithFields(logrus.Fields{"family": f.String(), "chain": Chain})
	if !st.seeded {
		if err := m.seed(ctx, f); err != nil {
			return fmt.Errorf("read existing chain %s: %w", Chain, err)
		}
	}
	hooks, err := hookPositions(r)
	if err != nil {
		return fmt.Errorf("list nat %s: %w", hookChain, err)
	}
	payload := render(next)
	// Without a hook the chain itself may be gone too: write it again.
	if !bytes.Equal(payload, st.written) || len(hooks) == 0 {
		if err := r.Restore(ctx, payload); err != nil {
			st.written = nil
			return fmt.Errorf("write chain %s: %w", Chain, err)
		}
		st.written = payload
		log.WithField("rules", len(next.Rules)).Debug("Wrote SNAT chain")
	}
	if err := ensureHook(r, hooks); err != nil {
		return fmt.Errorf("hook %s into nat %s: %w", Chain, hookChain, err)
	}
	if flushes := ConntrackFlushes(st.prev, next); len(flushes) > 0 {
		filters := make([]netlink.CustomConntrackFilter, len(flushes))
		for i, fl := range flushes {
			filters[i] = fl
		}
		n, err := m.ct.ConntrackDeleteFilters(netlink.ConntrackTable, netlinkFamily(f), filters...)
		if err != nil {
			// prev stays, so the next sync tries again.
			return fmt.Errorf("delete conntrack entries of %d pods: %w", len(flushes), err)
		}
		log.WithFields(logrus.Fields{"pods": len(flushes), "entries": n}).Debug("Deleted conntrack entries of pods whose SNAT changed")
	}
	st.prev = next
	return nil
}

// Recheck makes the next Apply read the chains back from the kernel, as
// after a restart, and rewrite them if someone else changed or flushed
// them. The sync loop calls it on its periodic full resync; in between, an
// unchanged payload is not rewritten.
func (m *Manager) Recheck() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for i := range m.state {
		m.state[i].seeded = false
	}
}

// seed reads the chain left by a previous process: its rules become prev,
// and if they are exactly what Render makes of them, also written.
func (m *Manager) seed(ctx context.Context, f Family) error {
	st := &m.state[f]
	out, err := m.runners[f].Save(ctx)
	if err != nil {
		return err
	}
	t, err := ParseSave(out)
	if err != nil {
		return fmt.Errorf("parse iptables-save output: %w", err)
	}
	st.prev, st.written = Desired{}, nil
	if _, ok := t.chains[Chain]; ok {
		st.prev = t.Owned().forFamily(f)
		payload := render(st.prev)
		if rendered, err := ParseSave(payload); err == nil && slices.Equal(rendered.Rules(Chain), t.Rules(Chain)) {
			st.written = payload
		}
	}
	st.seeded = true
	return nil
}

// hookPositions returns the 1-based positions of jumps to Chain in nat
// POSTROUTING.
func hookPositions(r Runner) ([]int, error) {
	rules, err := r.List(hookChain)
	if err != nil {
		return nil, err
	}
	var pos []int
	for i, l := range rules {
		if parseMatch(splitWords(l)).target == Chain {
			pos = append(pos, i+1)
		}
	}
	return pos, nil
}

// ensureHook leaves exactly one jump to Chain, at position 1. It inserts
// before it deletes, so packets always pass the chain.
func ensureHook(r Runner, pos []int) error {
	if len(pos) == 1 && pos[0] == 1 {
		return nil
	}
	if len(pos) == 0 || pos[0] != 1 {
		if err := r.Insert(hookChain, 1, hookSpec...); err != nil {
			return err
		}
		for i := range pos {
			pos[i]++
		}
	} else {
		pos = pos[1:]
	}
	for _, p := range slices.Backward(pos) {
		if err := r.DeleteAt(hookChain, p); err != nil {
			return err
		}
	}
	return nil
}

// Cleanup removes the hooks and deletes every chain starting with
// ChainPrefix in both families; nothing else is touched. The next Apply
// starts from scratch.
func (m *Manager) Cleanup() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	var errs []error
	for _, f := range Families {
		m.state[f] = familyState{}
		if err := cleanup(m.runners[f]); err != nil {
			errs = append(errs, fmt.Errorf("snat %s cleanup: %w", f, err))
		}
	}
	return errors.Join(errs...)
}

func cleanup(r Runner) error {
	pos, err := hookPositions(r)
	if err != nil {
		return fmt.Errorf("list nat %s: %w", hookChain, err)
	}
	for _, p := range slices.Backward(pos) {
		if err := r.DeleteAt(hookChain, p); err != nil {
			return fmt.Errorf("delete hook: %w", err)
		}
	}
	chains, err := r.ListChains()
	if err != nil {
		return fmt.Errorf("list nat chains: %w", err)
	}
	for _, c := range chains {
		if strings.HasPrefix(c, ChainPrefix) {
			if err := r.DeleteChain(c); err != nil {
				return fmt.Errorf("delete chain %s: %w", c, err)
			}
		}
	}
	return nil
}

// Services returns the sorted, distinct Services (namespace/name comments)
// that have SNAT rules in the owned chains of either family right now.
func (m *Manager) Services(ctx context.Context) ([]string, error) {
	var out []string
	for _, f := range Families {
		save, err := m.runners[f].Save(ctx)
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

func netlinkFamily(f Family) netlink.InetFamily {
	if f == IPv6 {
		return netlink.FAMILY_V6
	}
	return netlink.FAMILY_V4
}
