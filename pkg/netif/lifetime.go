package netif

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"golang.org/x/sys/unix"
)

// Lifetimes fence the addresses in the kernel. With Config.Lifetime set,
// every owned address is bound with that valid lifetime (its preferred
// lifetime stays 0), and the kernel deletes it by itself once nobody
// renewed it for that long: a daemon that is killed, frozen (SIGSTOP) or
// stuck stops holding its addresses without having to run. Refresh renews
// them from the sync loop; Persist hands them to the next process at a
// graceful shutdown.
//
// What the kernel does (Linux 6.18, measured by the privileged tests):
//
//   - It reports the remaining lifetimes in IFA_CACHEINFO in whole seconds,
//     rounded down: a reported r means between r-1 and r seconds are left.
//   - It deletes expired addresses from a work item, IPv4 and IPv6 each on
//     its own, never before L - 20 ms after the last renewal: with L = 2 s
//     they went 2.01 s after the write on an idle machine, 2.46 s at a load
//     of 20 on two cores. Its scheduling rounds up to whole seconds
//     (round_jiffies_up), so L + 1 s is the bound to plan with.
//   - Every change of an IPv6 address (a renewal too) makes it walk all the
//     IPv6 addresses of the namespace (addrconf_verify_rtnl, which skips
//     only those preferred forever, never egressvip's): a renewal costs
//     0.1–0.5 ms at 2,000 addresses, an IPv4 one about 50 µs. Renewing
//     2,000 IPv6 addresses takes the better part of a second, once every
//     third of the lifetime.
//   - A replacement (RTM_NEWADDR with NLM_F_REPLACE) of an address that no
//     longer exists creates it, with or without NLM_F_CREATE. A renewal
//     written after the address expired would therefore bind it again,
//     possibly while another node holds it: renewable refuses any renewal
//     it cannot prove comes before the expiry.

// renewMargin is how long before the earliest possible expiry a renewal
// is no longer written: the kernel may delete an address 20 ms before its
// lifetime ends (ADDRCONF_TIMER_FUZZ_MINUS), and the request takes a
// moment to reach it.
const renewMargin = 200 * time.Millisecond

// lifetimeSeconds converts Config.Lifetime to the kernel's unit: whole
// seconds, rounded up, or infinity for 0.
func lifetimeSeconds(d time.Duration) (uint32, error) {
	switch {
	case d == 0:
		return infinity, nil
	case d < minLifetime:
		return 0, fmt.Errorf("address lifetime %v: must be 0 (forever) or at least %v", d, minLifetime)
	case d >= time.Duration(infinity-1)*time.Second:
		return 0, fmt.Errorf("address lifetime %v is too long for the kernel", d)
	}
	return uint32((d + time.Second - 1) / time.Second), nil
}

// SetLifetime changes the valid lifetime of the owned addresses (Config.
// Lifetime) from now on: the next Refresh renews every wanted address
// with it. A Manager without a lifetime keeps its addresses forever. The
// caller makes sure nobody takes the addresses over before a longer
// lifetime runs out (see node: the heartbeat announces it first).
func (m *Manager) SetLifetime(d time.Duration) error {
	if !m.finite {
		return nil
	}
	l, err := lifetimeSeconds(d)
	if err != nil || l == infinity {
		return fmt.Errorf("address lifetime %v: %w", d, err)
	}
	m.syncMu.Lock()
	defer m.syncMu.Unlock()
	if l == m.lifetime {
		return nil
	}
	if m.prevLifetime == 0 || m.lifetime < m.prevLifetime {
		m.prevLifetime = m.lifetime
	}
	m.lifetime, m.changedAt, m.refreshAt = l, time.Now(), time.Time{}
	return nil
}

// Lifetime is the valid lifetime addresses are written with now (0:
// forever).
func (m *Manager) Lifetime() time.Duration {
	m.syncMu.Lock()
	defer m.syncMu.Unlock()
	if m.lifetime == infinity {
		return 0
	}
	return time.Duration(m.lifetime) * time.Second
}

// RenewCost is what renewing one address's lifetime cost in the last
// round that renewed any (0 before the first), how many addresses were
// wanted then, and how many the last Sync wanted.
func (m *Manager) RenewCost() (perAddress time.Duration, measuredAt, held int) {
	m.state.mu.Lock()
	if w := m.state.wanted; w != nil {
		held = len(w.index)
	}
	m.state.mu.Unlock()
	m.syncMu.Lock()
	defer m.syncMu.Unlock()
	return m.renewCost, m.renewHeld, held
}

// writtenLifetime is the lifetime an address written at at may count on:
// after a change, what was written before it only the shortest earlier
// one. Called with syncMu held.
func (m *Manager) writtenLifetime(at time.Time) uint32 {
	if m.prevLifetime != 0 && at.Before(m.changedAt) {
		return min(m.prevLifetime, m.lifetime)
	}
	return m.lifetime
}

// validFor is the valid lifetime ip is written with. Called with syncMu
// held.
func (m *Manager) validFor(ip netip.Addr) uint32 {
	if m.persisted[ip] {
		return infinity
	}
	return m.lifetime
}

// lifetimeStale says whether an owned address needs its lifetimes written
// for its valid lifetime to be want: it is not deprecated (its preferred
// lifetime is not 0: the kernel would pick it as a source for the node's
// own traffic), it is valid forever or longer than
// want when it should not be (a previous process bound it so, or Persist
// did), or at most two thirds of want are left. The last rule makes a
// renewal every third of the lifetime, so most calls of Refresh every
// 500 ms write nothing: the kernel reports whole seconds, and a reported r
// at most 2/3 of want means that less than 2/3 are really left.
func lifetimeStale(a ifAddr, want uint32) bool {
	switch {
	case !a.cacheinfo || a.flags&unix.IFA_F_DEPRECATED == 0:
		return true
	case want == infinity:
		return a.valid != infinity
	case a.valid == infinity || a.valid > want:
		return true
	}
	return 3*uint64(a.valid) <= 2*uint64(want)
}

// needsRenewal says whether an owned address is to be written at this
// Sync or Refresh: its lifetimes are stale, or this Manager never wrote it
// (a previous process bound it). Adopting such an address at once, while
// the listing proves it is still bound, starts this Manager's own record
// of when it expires. Called with syncMu held.
//
// Sync writes at most refreshSlice of them, the least time left first,
// and leaves the rest to Refresh, which goes on in slices: at thousands of
// IPv6 addresses on a busy node a round takes seconds, and the Sync that
// binds a new Service's address must not wait for it.
func (m *Manager) needsRenewal(a ifAddr) bool {
	want := m.validFor(a.ip)
	if lifetimeStale(a, want) {
		return true
	}
	_, known := m.renewedAt[a.ip]
	return want != infinity && !known
}

// renewal is an owned address of a listing to be written again.
type renewal struct {
	addr ifAddr
	// upgradeOnly: its lifetimes are right, only IFA_F_NOPREFIXROUTE is
	// missing (see Sync): a failure then is harmless and only logged.
	upgradeOnly bool
}

// renewable says whether the address a, listed at listed, is certainly
// still bound now, so that replacing it cannot bind it anew (see the
// kernel's behaviour above). It is when it is valid forever, or when the
// earliest expiry that either this Manager's last write or the listing
// allows is more than renewMargin away. Called with syncMu held.
func (m *Manager) renewable(a ifAddr, listed, now time.Time) bool {
	if a.cacheinfo && a.valid == infinity {
		return true
	}
	var until time.Time
	if a.cacheinfo && a.valid > 0 {
		// Reported r: more than r-1 seconds were left at the listing.
		until = listed.Add(time.Duration(a.valid-1) * time.Second)
	}
	if at, ok := m.renewedAt[a.ip]; ok && m.lifetime != infinity {
		until = latest(until, at.Add(time.Duration(m.writtenLifetime(at))*time.Second))
	}
	return now.Before(until.Add(-renewMargin))
}

func latest(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// renewAll writes the renewals of a listing taken at listed, with the
// lifetime validFor gives, and returns how many it wrote; complete is
// false when one was not written. An address it cannot prove still bound
// is left to expire (logged): the next Sync sees it missing. Kernel
// refusals go to res.Failed, except for a renewal that was only the
// prefix-route upgrade, which costs a useless route at worst and is tried
// again at the next Sync. Called with syncMu held.
//
// A non-zero until stops it there (complete false, more true): the caller
// lists again and goes on, after a Sync waiting for the lock had its turn.
func (m *Manager) renewAll(ctx context.Context, index int, listed time.Time, renew []renewal, res *Result, until time.Time) (written int, complete, more bool) {
	var (
		upgraded, unproven int
		upgradeErr         error
	)
	complete = true
	start := time.Now()
	defer func() {
		// A sliced round is measured whole, by refreshWhile.
		if written > 0 && until.IsZero() {
			m.measureRenewals(time.Since(start), written)
		}
	}()
	for i, r := range renew {
		if ctx.Err() != nil {
			complete = false
			break
		}
		ip := r.addr.ip
		now := time.Now()
		if i > 0 && !until.IsZero() && !now.Before(until) {
			complete, more = false, true
			break
		}
		if !m.renewable(r.addr, listed, now) {
			unproven++
			complete = false
			m.log.WithField("ip", ip.String()).WithField("valid_left_s", r.addr.valid).
				Info("not renewing an address that may have expired already: it is left to expire")
			continue
		}
		valid := m.validFor(ip)
		if err := m.addOwned(index, ip, true, valid); err != nil {
			if r.upgradeOnly {
				upgradeErr = fmt.Errorf("%s: %w", ip, err)
				continue
			}
			complete = false
			res.fail(ip, fmt.Errorf("renew %s on %s: %w", ip, m.cfg.Interface, err))
			continue
		}
		written++
		if valid == infinity {
			delete(m.renewedAt, ip)
		} else {
			m.renewedAt[ip] = now
		}
		if ip.Is6() && r.addr.flags&unix.IFA_F_NOPREFIXROUTE == 0 {
			upgraded++
		}
	}
	if upgraded > 0 && kernelHasNoPrefixRoute() {
		m.log.WithField("addresses", upgraded).Info("removed the prefix routes of addresses an earlier version bound")
	}
	if upgradeErr != nil {
		m.log.WithError(upgradeErr).Warn("cannot remove the prefix routes of addresses an earlier version bound")
	}
	if written > 0 || unproven > 0 {
		m.log.WithField("renewed", written).WithField("left_to_expire", unproven).Debug("address lifetimes")
	}
	return written, complete, more
}

// sortRenewals puts the least time left first: a slice that stops early
// leaves the addresses that can wait.
func sortRenewals(r []renewal) {
	slices.SortFunc(r, func(a, b renewal) int { return cmp.Compare(a.addr.valid, b.addr.valid) })
}

// measureRenewals records that written renewals took took, for
// RenewCost. Called with syncMu held.
func (m *Manager) measureRenewals(took time.Duration, written int) {
	m.renewCost = took / time.Duration(written)
	m.state.mu.Lock()
	if w := m.state.wanted; w != nil {
		m.renewHeld = len(w.index)
	}
	m.state.mu.Unlock()
}

// planRefresh sets when Refresh has to look at the interface again: when
// the first wanted address this Manager wrote reaches a third of its
// lifetime, as the kernel will then report it (lifetimeStale), or at once
// when a renewal was not written (complete false). Until then Refresh
// costs no system call. Addresses this Manager did not write are absent,
// foreign or persisted: nothing to renew. Called with syncMu held.
func (m *Manager) planRefresh(wanted *wantSet, complete bool) {
	if m.lifetime == infinity {
		return
	}
	if !complete {
		m.refreshAt = time.Time{}
		return
	}
	// The kernel reports an address stale once floor(age) >= ceil(L/3);
	// its clock started a moment after ours.
	third := func(l uint32) time.Duration { return time.Duration((l+2)/3)*time.Second + 50*time.Millisecond }
	next := time.Now().Add(time.Duration(m.lifetime) * time.Second)
	for ip := range wanted.index {
		if at, ok := m.renewedAt[ip]; ok && at.Add(third(m.writtenLifetime(at))).Before(next) {
			next = at.Add(third(m.writtenLifetime(at)))
		}
	}
	m.refreshAt = next
}

// Refresh renews the lifetime of the owned addresses the last Sync wanted
// (KeepOnly ones included) that the interface still holds, so that the
// kernel keeps them for another Config.Lifetime. It never adds or removes
// an address, and does nothing without a Lifetime.
//
// It is cheap enough for every 500 ms with thousands of addresses: a write
// is due only for addresses with at most two thirds of their lifetime
// left, that is once every third of the lifetime, and until the first is
// due (this Manager knows when it wrote each) a call makes no system call
// at all. When one is due, one listing of the interface, filtered by the
// kernel, tells which addresses are still bound and how much of their
// lifetime is left, as the kernel counts it; those at two thirds or less
// are written. See BenchmarkRefresh for the figures. An address whose write
// the kernel refuses does not stop the others; the errors are joined. Each
// write keeps what Sync writes: flags, protocol and label.
//
// The writes go in slices of refreshSlice, each with a listing of its own:
// between two, a Sync waiting for the interface goes first, so that a
// round of thousands of renewals on a busy node does not hold up binding
// a new Service's address. While is asked before every slice (nil: always
// go on); the round stops when it says no. The node renews only while its
// heartbeat is fresh, and a round that takes seconds must stop when it no
// longer is.
//
// RenewCost reports a whole round's time, waits for the lock included, by
// the addresses it wrote: what the lifetime must leave room for.
func (m *Manager) Refresh(ctx context.Context, while func() bool) error {
	_, err := m.refreshWhile(ctx, while)
	return err
}

// refreshSlice is how long Refresh holds the lock of the interface at a
// time: between slices a Sync that waits for it goes first (sync.Mutex
// hands a lock over to a waiter of more than a millisecond).
const refreshSlice = 20 * time.Millisecond

// refresh is a whole Refresh; it also says how many addresses it wrote.
func (m *Manager) refresh(ctx context.Context) (int, error) {
	return m.refreshWhile(ctx, nil)
}

// refreshWhile is Refresh; it also says how many addresses it wrote.
func (m *Manager) refreshWhile(ctx context.Context, while func() bool) (int, error) {
	var (
		total int
		start time.Time // the first slice got the lock
	)
	for while == nil || while() {
		n, more, err := m.refreshSome(ctx, refreshSlice, &start)
		total += n
		if err != nil {
			return total, err
		}
		if !more {
			if total > 0 {
				m.syncMu.Lock()
				m.measureRenewals(time.Since(start), total)
				m.syncMu.Unlock()
			}
			return total, nil
		}
	}
	return total, nil
}

// refreshSome is one slice of refresh: it lists the interface and renews
// what is due for slice from when it got the lock (at least one); more
// says that some is left. It sets a zero *locked to when it got the lock.
func (m *Manager) refreshSome(ctx context.Context, slice time.Duration, locked *time.Time) (int, bool, error) {
	if !m.finite {
		return 0, false, nil
	}
	m.syncMu.Lock()
	defer m.syncMu.Unlock()
	now := time.Now()
	if locked.IsZero() {
		*locked = now
	}
	until := now.Add(slice)
	if now.Before(m.refreshAt) {
		return 0, false, nil
	}
	m.state.mu.Lock()
	wanted := m.state.wanted
	m.state.mu.Unlock()
	if wanted == nil || len(wanted.index) == 0 {
		return 0, false, nil
	}
	l, err := m.link()
	if err != nil {
		return 0, false, err
	}
	index := l.Attrs().Index
	var due []renewal
	bound := make([]bool, len(wanted.index))
	listed := time.Now()
	err = m.eachAddr(index, func() { due, listed = due[:0], time.Now(); clear(bound) }, func(a ifAddr, _ []byte) error {
		i, ok := wanted.index[a.ip]
		if !ok || !m.owned(a) {
			return nil
		}
		bound[i] = true
		if m.needsRenewal(a) {
			due = append(due, renewal{addr: a})
		}
		return nil
	})
	if err != nil {
		return 0, false, fmt.Errorf("list addresses of %s: %w", m.cfg.Interface, err)
	}
	// What expired or was deleted has nothing left to renew.
	for ip, i := range wanted.index {
		if !bound[i] {
			delete(m.renewedAt, ip)
		}
	}
	sortRenewals(due)
	var res Result
	n, complete, more := m.renewAll(ctx, index, listed, due, &res, until)
	m.planRefresh(wanted, complete)
	return n, more, errors.Join(append(failures(res), ctx.Err())...)
}

// Persist makes the given owned addresses valid forever, for a graceful
// shutdown that hands them to the next process: it keeps them bound
// however long the next process takes to start, and its first Sync sets
// its own lifetime again. From then on this Manager's Sync and Refresh
// keep them forever too (until a Sync no longer wants them), so that a
// renewal still running in the sync loop cannot undo it. Addresses the
// interface lacks, or that are not egressvip's, are skipped: Persist never
// binds anything. Errors of single addresses are joined.
func (m *Manager) Persist(ctx context.Context, addrs []netip.Addr) error {
	m.syncMu.Lock()
	defer m.syncMu.Unlock()
	set := make(map[netip.Addr]bool, len(addrs))
	for _, ip := range addrs {
		set[ip.Unmap()] = true
	}
	l, err := m.link()
	if err != nil {
		return err
	}
	index := l.Attrs().Index
	var due []renewal
	listed := time.Now()
	err = m.eachAddr(index, func() { due, listed = due[:0], time.Now() }, func(a ifAddr, _ []byte) error {
		if set[a.ip] && m.owned(a) {
			due = append(due, renewal{addr: a})
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("list addresses of %s: %w", m.cfg.Interface, err)
	}
	for _, r := range due {
		m.persisted[r.addr.ip] = true
	}
	var res Result
	n, _, _ := m.renewAll(ctx, index, listed, due, &res, time.Time{})
	errs := failures(res)
	if n+len(errs) < len(due) {
		errs = append(errs, fmt.Errorf("%d of %d addresses may have expired already and were not made permanent", len(due)-n-len(errs), len(due)))
	}
	return errors.Join(append(errs, ctx.Err())...)
}

// failures are the errors of res.Failed.
func failures(res Result) []error {
	var errs []error
	for _, err := range res.Failed {
		errs = append(errs, err)
	}
	return errs
}
