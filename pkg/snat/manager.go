package snat

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/sirupsen/logrus"
	"github.com/vishvananda/netlink"
	"sigs.k8s.io/knftables"
)

// Backends of egress SNAT, as the env var egress_backend names them.
const (
	// BackendAuto picks iptables-nft when egress_withnftables is set,
	// else nftables when nft works, else iptables-legacy.
	BackendAuto = "auto"
	// BackendNFTables is egressvip's own nftables table per family
	// (knftables, the nft binary).
	BackendNFTables = "nftables"
	// BackendIPTablesNFT is the EGRESSVIP-SNAT chain through the
	// iptables-nft binaries.
	BackendIPTablesNFT = "iptables-nft"
	// BackendIPTablesLegacy is the EGRESSVIP-SNAT chain through the
	// iptables-legacy binaries.
	BackendIPTablesLegacy = "iptables-legacy"
)

// Backends lists the values egress_backend accepts.
var Backends = []string{BackendAuto, BackendNFTables, BackendIPTablesNFT, BackendIPTablesLegacy}

// The kube-vip environment variables that select the backend.
const (
	backendEnv      = "egress_backend"
	withNFTablesEnv = "egress_withnftables"
)

// probeNFTables says whether nft works in this network namespace (a dry
// run, nothing is written); tests replace it.
var probeNFTables = func() error {
	_, err := knftables.New(knftables.IPv4Family, TableName)
	return err
}

// SelectBackend resolves egress_backend (backend) and egress_withnftables
// (withNFTables) to one of nftables, iptables-nft and iptables-legacy. An
// explicit backend wins; auto (or empty) means iptables-nft when
// withNFTables is set (kube-vip's meaning of egress_withnftables), else
// nftables when nft works here, else iptables-legacy. An unknown value is
// an error naming egress_backend.
func SelectBackend(backend string, withNFTables bool) (string, error) {
	b, _, err := selectBackend(backend, withNFTables)
	return b, err
}

// selectBackend is SelectBackend that also says why.
func selectBackend(backend string, withNFTables bool) (string, string, error) {
	switch b := strings.ToLower(strings.TrimSpace(backend)); b {
	case BackendNFTables, BackendIPTablesNFT, BackendIPTablesLegacy:
		return b, backendEnv + "=" + b, nil
	case "", BackendAuto:
	default:
		return "", "", fmt.Errorf("%s: unknown SNAT backend %q; use one of %s", backendEnv, backend, strings.Join(Backends, ", "))
	}
	if withNFTables {
		return BackendIPTablesNFT, withNFTablesEnv + "=true", nil
	}
	if err := probeNFTables(); err != nil {
		return BackendIPTablesLegacy, "auto: nft does not work here (" + err.Error() + ")", nil
	}
	return BackendNFTables, "auto: nft works here", nil
}

// Config configures a Manager.
type Config struct {
	// Backend is egress_backend: nftables, iptables-nft, iptables-legacy,
	// or auto/empty (see SelectBackend). When empty and Runners or Tables
	// are set, those select the backend without probing.
	Backend string
	// NFTables is egress_withnftables: with Backend auto, iptables-nft
	// (false: nftables if nft works, else iptables-legacy). The iptables
	// flavour must match what the node's other components (CNI,
	// kube-proxy) use, or rule order across the two is undefined; the
	// nftables backend runs before both.
	NFTables bool
	// Log receives per-sync detail at debug level; nil means the standard
	// logger.
	Log *logrus.Entry
	// Runners, indexed by Family, replace the iptables binaries (tests pass
	// Fakes). A nil entry means the binaries of the selected backend.
	Runners [2]Runner
	// Tables, indexed by Family, replace egressvip's nftables tables (tests
	// pass FakeNFTs). A nil entry means the nft binary.
	Tables [2]NFTables
	// Conntrack deletes conntrack entries; nil means the netlink package
	// handle, which works in the network namespace of the calling thread.
	// Pass netlink.NewHandleAt(ns) to work in another namespace.
	Conntrack Conntrack
}

// writer is one backend's kernel side.
type writer interface {
	// seed forgets what the writer knew of family f and reads what the
	// kernel holds: the Desired state it implements, or keep when it is
	// still exactly what the last write left (the caller keeps its own).
	seed(ctx context.Context, f Family) (prev Desired, keep bool, err error)
	// write makes family f's kernel state implement next.
	write(ctx context.Context, f Family, next Desired) error
	// check compares the kernel with the last writes of fams, cheaply.
	check(ctx context.Context, fams []Family) (bool, error)
	// cleanup removes everything egressvip owns in this backend.
	cleanup(ctx context.Context) error
	services(ctx context.Context) ([]string, error)
}

// Manager keeps what egressvip owns in the selected backend equal to a
// Desired state, for both families, and removes what it owns in the other
// backends. It is safe for concurrent use, but meant to be called from one
// sync loop.
type Manager struct {
	log     *logrus.Entry
	backend string
	w       writer
	// others are the other backends, for leftovers; nil entries are
	// backends whose tools are missing here.
	others []leftovers
	ct     Conntrack

	mu    sync.Mutex
	state [2]familyState
	// othersRemoved is set once the other backends' leftovers are gone.
	othersRemoved bool
}

// leftovers is another backend, whose leftovers are removed.
type leftovers struct {
	name string
	w    writer
	// missing, when set, says why the backend cannot be looked at here.
	missing string
}

// familyState is what the Manager knows about one family.
type familyState struct {
	// seeded is set once prev was read from the kernel.
	seeded bool
	// prev is the state that is in the kernel and whose conntrack
	// consequences have been dealt with.
	prev Desired
	// unusable is set while writing failed and no rule needed the family.
	unusable bool
}

// New returns a Manager for the selected backend (see SelectBackend). It
// fails, naming the missing binary and the environment variables, when the
// backend's tools are missing, and on an unknown backend.
func New(cfg Config) (*Manager, error) {
	m := &Manager{log: cfg.Log, ct: cfg.Conntrack}
	if m.log == nil {
		m.log = logrus.NewEntry(logrus.StandardLogger())
	}
	if m.ct == nil {
		m.ct = netlinkConntrack{}
	}
	fakes := cfg.Runners != [2]Runner{} || cfg.Tables != [2]NFTables{}
	requested := strings.ToLower(strings.TrimSpace(cfg.Backend))
	switch {
	case requested != "" && requested != BackendAuto:
	case cfg.Tables != [2]NFTables{}:
		requested = BackendNFTables
	case cfg.Runners != [2]Runner{} && cfg.NFTables:
		requested = BackendIPTablesNFT
	case cfg.Runners != [2]Runner{}:
		requested = BackendIPTablesLegacy
	}
	b, why, err := selectBackend(requested, cfg.NFTables)
	if err != nil {
		return nil, err
	}
	m.backend = b
	if m.w, err = newWriter(b, cfg); err != nil {
		return nil, err
	}
	if !fakes {
		// Only real kernels have leftovers; tests with fakes add theirs.
		m.others = realLeftovers(b)
	}
	m.log.WithFields(logrus.Fields{"backend": b, "why": why}).Info("SNAT backend selected")
	return m, nil
}

func newWriter(b string, cfg Config) (writer, error) {
	switch b {
	case BackendNFTables:
		return newNFTWriter(cfg.Tables)
	case BackendIPTablesNFT:
		return newIPTablesWriter(nftBackend, cfg.Runners)
	default:
		return newIPTablesWriter(legacyBackend, cfg.Runners)
	}
}

// realLeftovers returns the backends other than b, with their real tools.
func realLeftovers(b string) []leftovers {
	var out []leftovers
	for _, other := range []string{BackendNFTables, BackendIPTablesNFT, BackendIPTablesLegacy} {
		if other == b {
			continue
		}
		l := leftovers{name: other}
		switch other {
		case BackendNFTables:
			if w, err := newNFTWriter([2]NFTables{}); err != nil {
				l.missing = err.Error()
			} else {
				l.w = w
			}
		case BackendIPTablesNFT:
			if w, err := newIPTablesWriter(nftBackend, [2]Runner{}); err != nil {
				l.missing = err.Error()
			} else {
				l.w = w
			}
		case BackendIPTablesLegacy:
			if w, err := newIPTablesWriter(legacyBackend, [2]Runner{}); err != nil {
				l.missing = err.Error()
			} else {
				// Listing a legacy table creates it: look only where
				// one exists.
				w.present = legacyTablePresent
				l.w = w
			}
		}
		out = append(out, l)
	}
	return out
}

// Backend returns the selected backend: nftables, iptables-nft or
// iptables-legacy.
func (m *Manager) Backend() string { return m.backend }

// Apply makes what egressvip owns in the selected backend implement d, for
// both families: per family one atomic write (one iptables-restore, or one
// nftables transaction: the changed elements, or the whole table when its
// state is unknown or the change did not apply), only when something
// changed; then conntrack entries are deleted for pods whose SNAT changed.
// The first Apply of a process reads the existing state, so a restart does
// not delete conntrack entries of unchanged rules. The first Apply that
// writes both families without error then removes what egressvip owns in
// the other backends: a backend switch leaves no gap.
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
	// Only once our own rules are in place: the old ones keep egress
	// working until then.
	if !m.othersRemoved && len(errs) == 0 {
		if err := m.removeOthers(ctx); err != nil {
			errs = append(errs, err)
		} else {
			m.othersRemoved = true
		}
	}
	return errors.Join(errs...)
}

func (m *Manager) applyFamily(ctx context.Context, f Family, next Desired) error {
	st := &m.state[f]
	log := m.log.WithFields(logrus.Fields{"family": f.String(), "backend": m.backend})
	if !st.seeded {
		prev, keep, err := m.w.seed(ctx, f)
		if err != nil {
			return fmt.Errorf("read existing rules: %w", err)
		}
		if !keep {
			st.prev = prev
		}
		st.seeded = true
	}
	if err := m.w.write(ctx, f, next); err != nil {
		return err
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

// Recheck makes the next Apply read the state back from the kernel, as
// after a restart, and rewrite it if someone else changed or flushed it.
// The sync loop calls it on its periodic full resync and when Check fails;
// in between, an unchanged state is not rewritten.
func (m *Manager) Recheck() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for i := range m.state {
		m.state[i].seeded = false
	}
}

// Check reports whether the kernel still holds what the last Apply wrote,
// cheaply enough for the sync loop to call it every second; on false the
// caller calls Recheck and Apply, which rewrites it. nftables: the ruleset
// generation (one netlink round trip) and, only when anyone committed
// anything since, the table's fingerprint (its netlink dumps, digested)
// compared with the one taken after the write. iptables: the hook is the
// only one and the first rule of nat POSTROUTING, and the owned chain still
// ends with the last rule written (iptables-nft skips both while the
// generation is unchanged). A family that was never written, or is
// unusable, is not checked. An error comes with false.
func (m *Manager) Check(ctx context.Context) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var fams []Family
	for _, f := range Families {
		if st := m.state[f]; st.seeded && !st.unusable {
			fams = append(fams, f)
		}
	}
	if len(fams) == 0 {
		return true, nil
	}
	ok, err := m.w.check(ctx, fams)
	if err != nil {
		return false, err
	}
	return ok, nil
}

// RemoveOtherBackends removes what egressvip owns in the backends other
// than the selected one: the EGRESSVIP-* chains and their hooks in the nat
// tables of iptables-legacy and iptables-nft (both families), and the
// egressvip nftables tables. Nothing else is touched. The first Apply does
// it too (after writing its own rules); a backend whose tools are missing
// here is skipped (logged once).
func (m *Manager) RemoveOtherBackends(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	err := m.removeOthers(ctx)
	if err == nil {
		m.othersRemoved = true
	}
	return err
}

func (m *Manager) removeOthers(ctx context.Context) error {
	var errs []error
	for i, o := range m.others {
		if o.w == nil {
			if o.missing != "" {
				m.log.WithField("backend", o.name).Infof("cannot look for egressvip's leftovers in this backend: %s", o.missing)
				m.others[i].missing = "" // once
			}
			continue
		}
		if err := o.w.cleanup(ctx); err != nil {
			errs = append(errs, fmt.Errorf("remove leftovers of SNAT backend %s: %w", o.name, err))
		}
	}
	return errors.Join(errs...)
}

// Cleanup removes everything egressvip owns in every backend: the hooks
// and chains starting with ChainPrefix of iptables-legacy and iptables-nft
// (both families), and the egressvip nftables tables. Nothing else is
// touched. The next Apply starts from scratch.
func (m *Manager) Cleanup() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	ctx := context.Background()
	for f := range m.state {
		m.state[f] = familyState{}
	}
	var errs []error
	if err := m.w.cleanup(ctx); err != nil {
		errs = append(errs, err)
	}
	if err := m.removeOthers(ctx); err != nil {
		errs = append(errs, err)
	}
	m.othersRemoved = false
	return errors.Join(errs...)
}

// Services returns the sorted, distinct Services (namespace/name comments)
// that have SNAT rules (or nftables map elements) of the selected backend,
// in either family, right now.
func (m *Manager) Services(ctx context.Context) ([]string, error) {
	return m.w.services(ctx)
}

func netlinkFamily(f Family) netlink.InetFamily {
	if f == IPv6 {
		return netlink.FAMILY_V6
	}
	return netlink.FAMILY_V4
}
