package snat

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/bits"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"sync"

	"github.com/egressvip/egressvip/pkg/model"
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
	// BackendIPTablesNFT is the EGRESSVIP-* chains through the
	// iptables-nft binaries.
	BackendIPTablesNFT = "iptables-nft"
	// BackendIPTablesLegacy is the EGRESSVIP-* chains through the
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

// probeIPTablesFlavour says which iptables binaries the node's other
// components (kube-proxy, the CNI) use, as kube-proxy's iptables-wrapper
// decides: the flavour whose tables hold more rules; iptables-nft when
// neither holds any (the default of current distributions), iptables-legacy
// when only its binaries exist. Tests replace it.
var probeIPTablesFlavour = func() (string, string) {
	count := func(bin string) (int, bool) {
		path, err := exec.LookPath(bin)
		if err != nil {
			return 0, false
		}
		out, err := exec.Command(path).Output()
		if err != nil {
			return 0, true
		}
		n := 0
		for l := range bytes.Lines(out) {
			if bytes.HasPrefix(l, []byte("-A ")) {
				n++
			}
		}
		return n, true
	}
	legacy, hasLegacy := count("iptables-legacy-save")
	nft, hasNFT := count("iptables-nft-save")
	switch {
	case hasLegacy && legacy > nft:
		return BackendIPTablesLegacy, fmt.Sprintf("iptables-legacy holds %d rules, iptables-nft %d", legacy, nft)
	case hasNFT:
		return BackendIPTablesNFT, fmt.Sprintf("iptables-nft holds %d rules, iptables-legacy %d", nft, legacy)
	}
	return BackendIPTablesLegacy, "no iptables-nft binaries"
}

// SelectBackend resolves egress_backend (backend) and egress_withnftables
// (withNFTables) to one of nftables, iptables-nft and iptables-legacy. An
// explicit backend wins. auto (or empty) follows kube-vip 1.2.2 and later:
// withNFTables (its default) means the native nftables backend, or, where
// nft does not work, the iptables binaries; false means the iptables
// binaries the node's other components use (see probeIPTablesFlavour).
// (kube-vip 0.5.12 to 1.2.1 meant iptables-nft by true.) An unknown value
// is an error naming egress_backend.
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
	if !withNFTables {
		b, why := probeIPTablesFlavour()
		return b, withNFTablesEnv + "=false: " + why, nil
	}
	if err := probeNFTables(); err != nil {
		b, why := probeIPTablesFlavour()
		return b, withNFTablesEnv + "=true but nft does not work here (" + err.Error() + "): " + why, nil
	}
	return BackendNFTables, withNFTablesEnv + "=true: the native nftables backend", nil
}

// DefaultMark is the steering mark when Config.Mark is 0.
const DefaultMark uint32 = 0x1000

// Config configures a Manager.
type Config struct {
	// Backend is egress_backend: nftables, iptables-nft, iptables-legacy,
	// or auto/empty (see SelectBackend). When empty and Runners or Tables
	// are set, those select the backend without probing.
	Backend string
	// NFTables is egress_withnftables: with Backend auto, true (kube-vip's
	// default) selects the native nftables backend, false the iptables
	// flavour the node's other components (CNI, kube-proxy) use: rule
	// order across the two flavours is undefined; the nftables backend runs
	// before both.
	NFTables bool
	// Mark is the steering mark: one bit, set (never cleared, other bits
	// kept) on packets of steered pods, for the policy routing that sends
	// them to the holder. 0 means DefaultMark.
	Mark uint32
	// TunnelDevice names egressvip's VXLAN device, "" when there is none.
	// Only nodes can send on it, so packets arriving on it skip the
	// anti-spoofing check (steered pods live behind other nodes), and
	// steered TCP SYNs leaving through it get their MSS clamped to the
	// route's MTU.
	TunnelDevice string
	// TunnelPort is the VXLAN device's UDP port, 0 when there is none.
	// When set, packets to it from inside PodCIDRs are dropped (the
	// tunnel guard): a pod could otherwise inject packets into another
	// node's tunnel.
	TunnelPort uint16
	// PodCIDRs are the cluster's pod CIDRs, both families, for the tunnel
	// guard.
	PodCIDRs []netip.Prefix
	// Log receives per-sync detail at debug level; nil means the standard
	// logger.
	Log *logrus.Entry
	// Runners, indexed by Family, replace the iptables binaries (tests pass
	// fakes). A nil entry means the binaries of the selected backend.
	Runners [2]Runner
	// Tables, indexed by Family, replace egressvip's nftables tables (tests
	// pass fakes): the nftables backend's table, or the iptables backends'
	// fence table. A nil entry means the nft binary.
	Tables [2]NFTables
	// Conntrack deletes conntrack entries; nil means the netlink package
	// handle, which works in the network namespace of the calling thread.
	// Pass netlink.NewHandleAt(ns) to work in another namespace.
	Conntrack Conntrack
}

// options checks what the rules are written with.
func (cfg Config) options() (datapathOptions, error) {
	o := datapathOptions{mark: cfg.Mark, tunnelDevice: cfg.TunnelDevice, tunnelPort: cfg.TunnelPort}
	if o.mark == 0 {
		o.mark = DefaultMark
	}
	if bits.OnesCount32(o.mark) != 1 {
		return o, fmt.Errorf("steering mark %#x: want exactly one bit set", o.mark)
	}
	if d := o.tunnelDevice; len(d) > 15 || strings.ContainsAny(d, "\" \\/\t\n") {
		return o, fmt.Errorf("tunnel device %q: not an interface name", d)
	}
	return o, nil
}

// kernelState is what a family's kernel state does to pods, as far as the
// conntrack clean-up is concerned.
type kernelState struct {
	plans   map[netip.Addr]*podPlan
	exclude []netip.Prefix
	// keep are the pods whose entries are left alone
	// (kube-vip.io/flush-conntrack: "false"); unknown after a restart.
	keep map[netip.Addr]bool
}

// writer is one backend's kernel side.
type writer interface {
	// seed forgets what the writer knew of family f and reads what the
	// kernel holds, or keep when it is still exactly what the last write
	// left (the caller keeps its own).
	seed(ctx context.Context, f Family) (prev kernelState, keep bool, err error)
	// write makes family f's kernel state implement c, atomically: a
	// failed write changed nothing the writer wrote.
	write(ctx context.Context, f Family, c *compiled) error
	// check compares the kernel with the last writes of fams, cheaply.
	check(ctx context.Context, fams []Family) (bool, error)
	// cleanup removes everything egressvip owns in this backend.
	cleanup(ctx context.Context) error
	services(ctx context.Context) ([]string, error)
}

// Manager keeps what egressvip owns in the selected backend equal to a
// model.Datapath, for both families, and removes what it owns in the other
// backends. It is safe for concurrent use, but meant to be called from one
// sync loop.
type Manager struct {
	log     *logrus.Entry
	backend string
	w       writer
	guard   []netip.Prefix
	// tunnelDevice is Config.TunnelDevice.
	tunnelDevice string
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
	// prev is what the kernel does and whose conntrack consequences have
	// been dealt with.
	prev kernelState
	// written is what this process last wrote; nil when unknown (read
	// back after a restart). Services whose rules are as written are not
	// suspected when a write fails.
	written *famDesired
	// unusable is set while writing failed and no rule needed the family.
	unusable bool
	// sweep is set when Check found the family changed by someone else
	// (not merely unverified):
	// the next write is followed by deleting the conntrack entries set up
	// meanwhile with another translation than ours.
	sweep bool
}

// New returns a Manager for the selected backend (see SelectBackend). It
// fails, naming the missing binary and the environment variables, when the
// backend's tools are missing, on an unknown backend, and on an invalid
// mark or tunnel device.
func New(cfg Config) (*Manager, error) {
	m := &Manager{log: cfg.Log, ct: cfg.Conntrack}
	if m.log == nil {
		m.log = logrus.NewEntry(logrus.StandardLogger())
	}
	if m.ct == nil {
		m.ct = netlinkConntrack{}
	}
	opts, err := cfg.options()
	if err != nil {
		return nil, err
	}
	if opts.tunnelPort != 0 {
		m.guard = cfg.PodCIDRs
		m.tunnelDevice = cfg.TunnelDevice
	}
	fakes := cfg.Runners != [2]Runner{} || cfg.Tables != [2]NFTables{}
	requested := strings.ToLower(strings.TrimSpace(cfg.Backend))
	switch {
	case requested != "" && requested != BackendAuto:
	case cfg.Runners != [2]Runner{} && cfg.NFTables:
		requested = BackendIPTablesNFT
	case cfg.Runners != [2]Runner{}:
		requested = BackendIPTablesLegacy
	case cfg.Tables != [2]NFTables{}:
		requested = BackendNFTables
	}
	b, why, err := selectBackend(requested, cfg.NFTables)
	if err != nil {
		return nil, err
	}
	m.backend = b
	if m.w, err = newWriter(b, opts, cfg.Runners, cfg.Tables, m.log); err != nil {
		return nil, err
	}
	if !fakes {
		// Only real kernels have leftovers; tests with fakes add theirs.
		m.others = realLeftovers(b, opts)
	}
	m.log.WithFields(logrus.Fields{"backend": b, "why": why}).Info("egress datapath backend selected")
	return m, nil
}

func newWriter(b string, opts datapathOptions, runners [2]Runner, tables [2]NFTables, log *logrus.Entry) (writer, error) {
	switch b {
	case BackendNFTables:
		w, err := newNFTWriter(TableName, false, opts, tables)
		if err != nil {
			return nil, fmt.Errorf("backend nftables %w; the env var %s selects the backend (%s)", err, backendEnv, strings.Join(Backends, ", "))
		}
		return w, nil
	case BackendIPTablesNFT:
		return newIPTablesWriter(nftBackend, opts, runners, tables, log)
	default:
		return newIPTablesWriter(legacyBackend, opts, runners, tables, log)
	}
}

// realLeftovers returns the backends other than b, with their real tools.
func realLeftovers(b string, opts datapathOptions) []leftovers {
	var out []leftovers
	for _, other := range []string{BackendNFTables, BackendIPTablesNFT, BackendIPTablesLegacy} {
		if other == b {
			continue
		}
		l := leftovers{name: other}
		if w, err := newWriter(other, opts, [2]Runner{}, [2]NFTables{}, nil); err != nil {
			l.missing = err.Error()
		} else {
			l.w = w
		}
		out = append(out, l)
	}
	return out
}

// Backend returns the selected backend: nftables, iptables-nft or
// iptables-legacy.
func (m *Manager) Backend() string { return m.backend }

// Apply makes what egressvip owns in the selected backend implement d, for
// both families: per family one atomic write (one nftables transaction of
// the changed elements, or the whole table when its state is unknown; one
// iptables-restore), only when something changed; then conntrack entries
// are deleted for pods whose treatment changed. The first Apply of a
// process reads the existing state, so a restart does not delete conntrack
// entries of unchanged rules. The first Apply that writes both families
// then removes what egressvip owns in the other backends: a backend switch
// leaves no gap.
//
// failed are the Services ("namespace/name") whose rules could not be
// written, with why, while the others are in place: when a family's write
// fails, the Services whose rules changed are isolated by writing part of
// them (bisection: about log2(N)+2 writes for one bad Service among N), so
// one Service's bad rule does not keep the others out; when the family
// cannot be written at all, every Service with rules in it failed. err is
// a failure that affects every Service: nothing of d could be written.
// A family whose tables are unusable (IPv6 disabled on the node) only
// matters once a rule needs it.
func (m *Manager) Apply(ctx context.Context, d model.Datapath) (failed map[string]error, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	fams, bad := normalize(d, m.guard, m.tunnelDevice)
	failed = map[string]error{}
	for svc, err := range bad {
		m.log.WithError(err).WithField("service", svc).Warn("Skipping egress rule")
		failed[svc] = err
	}
	var (
		errs     []error
		needed   int // families with rules, now or before
		whole    int // of those, the ones that failed as a whole
		famError bool
	)
	for _, f := range Families {
		fd := fams[f]
		st := &m.state[f]
		hadRules := len(st.prev.plans) > 0
		famFailed, err := m.applyFamily(ctx, f, fd)
		for svc, e := range famFailed {
			failed[svc] = fmt.Errorf("%s: %w", f, e)
		}
		isNeeded := len(fd.clauses) > 0 || hadRules
		if isNeeded {
			needed++
		}
		switch {
		case err == nil:
			st.unusable = false
		case !isNeeded && ctx.Err() != nil:
			// Cut short by the caller (shutdown), not unusable.
		case !isNeeded:
			// A family whose tables cannot be used (IPv6 disabled on
			// the node) only matters once a rule needs it.
			if !st.unusable {
				m.log.WithError(err).WithField("family", f.String()).Warn("family unusable; ignored while no rule needs it")
			}
			st.unusable = true
		default:
			famError = true
			whole++
			err = fmt.Errorf("%s: %w", f, err)
			errs = append(errs, err)
			for _, svc := range fd.services() {
				failed[svc] = err
			}
		}
	}
	// Only once our own rules are in place: the old ones keep egress
	// working until then.
	if !m.othersRemoved && !famError {
		if err := m.removeOthers(ctx); err != nil {
			m.log.WithError(err).Warn("Cannot remove egressvip's leftovers of another backend; retrying at the next sync")
		} else {
			m.othersRemoved = true
		}
	}
	if whole > 0 && whole == needed {
		return nil, errors.Join(errs...)
	}
	if len(failed) == 0 {
		failed = nil
	}
	return failed, nil
}

// applyFamily writes family f and deletes the conntrack entries its
// changes call for. err is a failure of the whole family; failed are the
// Services isolated as the cause of a failed write, and those whose pods'
// conntrack entries could not be deleted.
func (m *Manager) applyFamily(ctx context.Context, f Family, fd *famDesired) (failed map[string]error, err error) {
	st := &m.state[f]
	log := m.log.WithFields(logrus.Fields{"family": f.String(), "backend": m.backend})
	if !st.seeded {
		prev, keep, err := m.w.seed(ctx, f)
		if err != nil {
			return nil, fmt.Errorf("read existing rules: %w", err)
		}
		if !keep {
			st.prev, st.written = prev, nil
		}
		st.seeded = true
	}
	next := compile(fd)
	if err := m.w.write(ctx, f, next); err != nil {
		if len(fd.clauses) == 0 && len(st.prev.plans) == 0 {
			return nil, err
		}
		if next, failed, err = m.isolate(ctx, f, fd, err); err != nil {
			return nil, err
		}
		for svc, e := range failed {
			log.WithError(e).WithField("service", svc).Warn("Rules of this Service cannot be written; the others are in place")
		}
	}
	st.written = next.famDesired
	exclude := append(slices.Clone(st.prev.exclude), fd.exclude...)
	keep := next.keepPods()
	fl := slices.DeleteFunc(flushes(st.prev.plans, next.plans, exclude), func(x flush) bool { return keep[x.pod] || st.prev.keep[x.pod] })
	if len(fl) > 0 {
		filters := make([]netlink.CustomConntrackFilter, len(fl))
		for i, x := range fl {
			filters[i] = x
		}
		n, err := m.ct.ConntrackDeleteFilters(netlink.ConntrackTable, netlinkFamily(f), filters...)
		if err != nil {
			// prev stays, so the next sync tries again.
			err = fmt.Errorf("delete conntrack entries of %d pods: %w", len(fl), err)
			log.WithError(err).Warn("Existing connections may keep their old source until the next sync")
			if failed == nil {
				failed = map[string]error{}
			}
			for _, x := range fl {
				for _, c := range fd.clauses {
					if c.pod == x.pod {
						failed[c.service] = err
					}
				}
			}
			return failed, nil
		}
		log.WithFields(logrus.Fields{"pods": len(fl), "entries": n}).Debug("Deleted conntrack entries of pods whose treatment changed")
	}
	st.prev = kernelState{plans: next.plans, exclude: fd.exclude, keep: keep}
	if st.sweep {
		if sw := newMistranslated(next.famDesired, keep); len(sw.clauses) > 0 {
			n, err := m.ct.ConntrackDeleteFilters(netlink.ConntrackTable, netlinkFamily(f), sw)
			if err != nil {
				// sweep stays, so the next sync tries again.
				log.WithError(err).Warn("Cannot delete the connections set up while the rules were changed by someone else; they may keep the wrong source until the next sync")
				return failed, nil
			}
			if n > 0 {
				log.WithField("entries", n).Info("Deleted connections set up with another source while the rules were changed by someone else")
			}
		}
		st.sweep = false
	}
	return failed, nil
}

// isolate finds, after the write of fd failed with firstErr, the Services
// whose rules make it fail, and writes the others. Suspects are the
// Services whose rules differ from the last write of this process (all of
// them after a restart); the rest is the base. If even the base cannot be
// written, the failure is the family's (err). Otherwise the suspects are
// bisected: a failing group is split, its first half written with what
// is known to work; when that works the second half is known to fail and
// split in turn. One bad Service among N costs about log2(N)+2 writes; the
// number of writes is bounded, and Services not cleared by then fail too.
// Each successful write leaves the kernel with what is known to work, so
// the last one is what stays; it is returned.
func (m *Manager) isolate(ctx context.Context, f Family, fd *famDesired, firstErr error) (*compiled, map[string]error, error) {
	st := &m.state[f]
	byService := func(d *famDesired) map[string][]clause {
		out := map[string][]clause{}
		if d != nil {
			for _, c := range d.clauses {
				out[c.service] = append(out[c.service], c)
			}
		}
		return out
	}
	var suspects []string
	old, cur := byService(st.written), byService(fd)
	for _, svc := range fd.services() {
		if st.written == nil || !slices.EqualFunc(old[svc], cur[svc], func(a, b clause) bool { return compareClause(a, b) == 0 }) {
			suspects = append(suspects, svc)
		}
	}
	if len(suspects) == 0 {
		return nil, nil, firstErr
	}
	isSuspect := map[string]bool{}
	for _, s := range suspects {
		isSuspect[s] = true
	}
	good := map[string]bool{}
	writes := 1
	try := func(extra []string) (*compiled, error) {
		writes++
		c := compile(fd.only(func(svc string) bool { return !isSuspect[svc] || good[svc] || slices.Contains(extra, svc) }))
		return c, m.w.write(ctx, f, c)
	}
	last, err := try(nil)
	if err != nil {
		// Without any suspect it fails too: not theirs.
		return nil, nil, firstErr
	}
	type group struct {
		services []string
		// bad says that the group is known to fail with what is known
		// to work, with err.
		bad bool
		err error
	}
	failed := map[string]error{}
	limit := 2*bits.Len(uint(len(suspects))) + 4
	giveUp := func(g group) {
		for _, svc := range g.services {
			e := g.err
			if e == nil {
				e = fmt.Errorf("not written: %d writes failed while isolating a bad Service's rules; retrying at the next sync", writes-1)
			}
			failed[svc] = e
		}
	}
	stack := []group{{services: suspects, bad: true, err: firstErr}}
	for len(stack) > 0 {
		g := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		if !g.bad {
			if writes >= limit {
				giveUp(g)
				continue
			}
			c, err := try(g.services)
			if err == nil {
				last = c
				for _, s := range g.services {
					good[s] = true
				}
				continue
			}
			g.bad, g.err = true, err
		}
		if len(g.services) == 1 {
			failed[g.services[0]] = g.err
			// The untested groups below are tested together.
			var merged []string
			for len(stack) > 0 && !stack[len(stack)-1].bad {
				merged = append(merged, stack[len(stack)-1].services...)
				stack = stack[:len(stack)-1]
			}
			if len(merged) > 0 {
				stack = append(stack, group{services: merged})
			}
			continue
		}
		if writes >= limit {
			giveUp(g)
			continue
		}
		half := len(g.services) / 2
		a, b := g.services[:half], g.services[half:]
		c, err := try(a)
		if err == nil {
			last = c
			for _, s := range a {
				good[s] = true
			}
			// good + b is what just failed.
			stack = append(stack, group{services: b, bad: true, err: g.err})
			continue
		}
		stack = append(stack, group{services: b}, group{services: a, bad: true, err: err})
	}
	m.log.WithFields(logrus.Fields{"family": f.String(), "writes": writes, "suspects": len(suspects), "failed": len(failed)}).
		Info("Isolated the Services whose rules cannot be written")
	return last, failed, nil
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
// compared with the one taken after the write. iptables: the generation
// (iptables-nft), else one iptables-save: the owned chains as written and
// every hook the only one and first in its built-in chain; then the fence
// table like nftables. A family that was never written, or is unusable,
// is not checked. An error comes with false.
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
	// Unverified is no sign of a foreign change: the rewrite alone takes a
	// reference, without a dump of the conntrack table.
	if (!ok || err != nil) && !errors.Is(err, model.ErrUnverified) {
		for _, f := range fams {
			m.state[f].sweep = true
		}
	}
	return ok && err == nil, err
}

// RemoveOtherBackends removes what egressvip owns in the backends other
// than the selected one: the EGRESSVIP-* chains and their hooks of
// iptables-legacy and iptables-nft (both families) with their fence
// tables, and the egressvip nftables tables. Nothing else is touched. The
// first Apply does it too (after writing its own rules); a backend whose
// tools are missing here is skipped (logged once).
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
			errs = append(errs, fmt.Errorf("remove leftovers of backend %s: %w", o.name, err))
		}
	}
	return errors.Join(errs...)
}

// Cleanup removes everything egressvip owns in every backend: the hooks
// and chains starting with ChainPrefix of iptables-legacy and iptables-nft
// (raw, mangle and nat tables, both families), their fence tables and the
// egressvip nftables tables. Nothing else is touched. The next Apply
// starts from scratch.
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
// that have rules (or nftables elements) of the selected backend, in
// either family, right now.
func (m *Manager) Services(ctx context.Context) ([]string, error) {
	return m.w.services(ctx)
}

func netlinkFamily(f Family) netlink.InetFamily {
	if f == IPv6 {
		return netlink.FAMILY_V6
	}
	return netlink.FAMILY_V4
}
