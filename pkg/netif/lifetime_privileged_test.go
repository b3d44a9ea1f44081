package netif

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/egressvip/egressvip/internal/privtest"
	"github.com/egressvip/egressvip/pkg/model"
)

// deletions follows the address deletions of ns: gone waits for the
// deletion of ip and says when it was read (within a millisecond of the
// kernel's).
type deletions struct {
	ch   chan netlink.AddrUpdate
	seen map[netip.Addr]time.Time
}

func followDeletions(t testing.TB, ns *privtest.NS) *deletions {
	t.Helper()
	d := &deletions{ch: make(chan netlink.AddrUpdate, 4096), seen: map[netip.Addr]time.Time{}}
	done := make(chan struct{})
	h := ns.Handle
	if err := netlink.AddrSubscribeWithOptions(d.ch, done, netlink.AddrSubscribeOptions{Namespace: &h, ReceiveBufferSize: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		close(done)
		for range d.ch {
		}
	})
	return d
}

// gone waits until ip is deleted, at most within, and returns when.
func (d *deletions) gone(t testing.TB, ip netip.Addr, within time.Duration) time.Time {
	t.Helper()
	timeout := time.After(within)
	for {
		if at, ok := d.seen[ip]; ok {
			return at
		}
		select {
		case u, ok := <-d.ch:
			if !ok {
				t.Fatal("address subscription ended")
			}
			if a, ok := netip.AddrFromSlice(u.LinkAddress.IP); ok && !u.NewAddr {
				if _, dup := d.seen[a.Unmap()]; !dup {
					d.seen[a.Unmap()] = time.Now()
				}
			}
		case <-timeout:
			t.Fatalf("%s not deleted within %v", ip, within)
		}
	}
}

// lifetimes reads the remaining lifetimes of ip as ip(8) shows them.
func lifetimes(t testing.TB, tp *topology, ip netip.Addr) (valid, preferred uint64, found bool) {
	t.Helper()
	a, ok := kernelAddrs(t, tp.node, tp.iface)[ip.String()]
	return a.Valid, a.Preferred, ok
}

// expiryBound is how late after its lifetime the kernel may remove an
// address: its lifetime work is rounded up to whole seconds, and -race on
// two busy cores adds its share.
const expiryBound = 1500 * time.Millisecond

// An address whose lifetime nobody renews is removed by the kernel
// within the bound, never before its lifetime; the daemon need not run.
func TestPrivilegedLifetimeExpires(t *testing.T) {
	tp := newTopology(t)
	const lifetime = 2 * time.Second
	m := managerIn(t, tp.node, Config{Interface: "eth1", Lifetime: lifetime})
	del := followDeletions(t, tp.node)
	start := time.Now()
	if added, _, err := syncAddrs(context.Background(), m, []netip.Addr{lb4, lb6}); err != nil || len(added) != 2 {
		t.Fatalf("Sync: added %v, err %v", added, err)
	}
	bound := time.Since(start)
	for _, ip := range []netip.Addr{lb4, lb6} {
		valid, preferred, ok := lifetimes(t, tp, ip)
		if !ok || valid > 2 || valid < 1 || preferred != 0 {
			t.Fatalf("%s: valid %d preferred %d (found %v): want valid 2 s (or 1 if a second passed), preferred 0", ip, valid, preferred, ok)
		}
	}
	a := kernelAddrs(t, tp.node, "eth1")
	if x := a[lb6.String()]; !x.NoDAD || !x.NoPrefixRoute || !x.Deprecated || a[lb4.String()].Label != "eth1:evip" {
		t.Fatalf("a finite lifetime changed the markers: %+v %+v", a[lb4.String()], x)
	}
	for _, ip := range []netip.Addr{lb4, lb6} {
		at := del.gone(t, ip, lifetime+expiryBound+time.Second)
		// The address was bound between start and start+bound.
		early, late := at.Sub(start.Add(bound)), at.Sub(start)
		t.Logf("%s: removed by the kernel %v–%v after it was bound with a lifetime of %v", ip, early.Round(time.Millisecond), late.Round(time.Millisecond), lifetime)
		if late < lifetime-50*time.Millisecond {
			t.Errorf("%s removed %v after it was bound, before its lifetime of %v", ip, late, lifetime)
		}
		if early > lifetime+expiryBound {
			t.Errorf("%s removed %v after its lifetime began: later than %v", ip, early, lifetime+expiryBound)
		}
	}
	if owned, err := m.Owned(); err != nil || len(owned) != 0 {
		t.Fatalf("Owned after the expiry: %v, %v", owned, err)
	}
	// The daemon resumes (it was frozen): Refresh binds nothing again,
	// and KeepOnly bindings report the loss instead of binding.
	if err := m.Refresh(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	res, err := m.Sync(context.Background(), []model.Binding{{Addr: lb4, KeepOnly: true}, {Addr: lb6, KeepOnly: true}})
	if err != nil || len(res.Added) != 0 || !slices.Equal(res.Absent, []netip.Addr{lb4, lb6}) {
		t.Fatalf("KeepOnly Sync after the expiry: %+v, %v; want both absent", res, err)
	}
	if owned, err := m.Owned(); err != nil || len(owned) != 0 {
		t.Fatalf("Owned after resuming: %v, %v", owned, err)
	}
}

// Refresh every 500 ms, as the daemon's sync loop calls it, keeps the
// addresses well past their lifetime, writing only now and then; once it
// stops they expire.
func TestPrivilegedRefreshKeepsAddresses(t *testing.T) {
	tp := newTopology(t)
	const lifetime = 2 * time.Second
	m := managerIn(t, tp.node, Config{Interface: "eth1", Lifetime: lifetime})
	ctx := context.Background()
	del := followDeletions(t, tp.node)
	if _, _, err := syncAddrs(ctx, m, []netip.Addr{lb4, lb6}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	calls, writes := 0, 0
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for time.Since(start) < 3*lifetime {
		<-tick.C
		n, err := m.refresh(ctx)
		if err != nil {
			t.Fatal(err)
		}
		calls++
		writes += n
		if owned, err := m.Owned(); err != nil || !slices.Equal(owned, []netip.Addr{lb4, lb6}) {
			t.Fatalf("%v after the first Sync: Owned %v, %v", time.Since(start).Round(time.Millisecond), owned, err)
		}
	}
	t.Logf("%d Refresh calls in %v wrote %d renewals for 2 addresses", calls, time.Since(start).Round(time.Millisecond), writes)
	if writes == 0 || writes > calls {
		t.Fatalf("%d calls wrote %d renewals: want renewals now and then, most calls writing nothing", calls, writes)
	}
	stopped := time.Now()
	for _, ip := range []netip.Addr{lb4, lb6} {
		at := del.gone(t, ip, lifetime+expiryBound+time.Second)
		t.Logf("%s removed %v after the last Refresh", ip, at.Sub(stopped).Round(time.Millisecond))
	}
}

// Refresh renews in slices: a slice that reaches its deadline stops
// (having written at least one) and says more is due; the whole Refresh
// writes the rest.
func TestPrivilegedRefreshInSlices(t *testing.T) {
	tp := newTopology(t)
	m := managerIn(t, tp.node, Config{Interface: "eth1", Lifetime: 6 * time.Second})
	ctx := context.Background()
	var want []netip.Addr
	for i := range 20 {
		want = append(want, netip.AddrFrom4([4]byte{203, 0, 113, byte(100 + i)}))
	}
	if _, _, err := syncAddrs(ctx, m, want); err != nil {
		t.Fatal(err)
	}
	// Due once the kernel reports 4 s left (two thirds), from 2 s on.
	time.Sleep(2200 * time.Millisecond)
	var locked time.Time
	n, more, err := m.refreshSome(ctx, 0, &locked)
	if err != nil || n != 1 || !more {
		t.Fatalf("a slice past its deadline wrote %d (more %v, %v); want 1 and more", n, more, err)
	}
	if n, err := m.refresh(ctx); err != nil || n != len(want)-1 {
		t.Fatalf("Refresh wrote %d, %v; want the %d left", n, err, len(want)-1)
	}
	for _, ip := range want {
		if valid, _, ok := lifetimes(t, tp, ip); !ok || valid > 6 {
			t.Fatalf("%s: valid %d (found %v), want at most 6 s", ip, valid, ok)
		}
	}
	if n, err := m.refresh(ctx); err != nil || n != 0 {
		t.Fatalf("a second Refresh wrote %d, %v; want nothing", n, err)
	}
}

// SetLifetime: the next Refresh writes every wanted address with the new
// lifetime, longer or shorter; RenewCost reports what a renewal cost.
func TestPrivilegedSetLifetime(t *testing.T) {
	tp := newTopology(t)
	m := managerIn(t, tp.node, Config{Interface: "eth1", Lifetime: 2 * time.Second})
	ctx := context.Background()
	if _, _, err := syncAddrs(ctx, m, []netip.Addr{lb4, lb6}); err != nil {
		t.Fatal(err)
	}
	for _, want := range []uint64{8, 3} {
		if err := m.SetLifetime(time.Duration(want) * time.Second); err != nil {
			t.Fatal(err)
		}
		if got := m.Lifetime(); got != time.Duration(want)*time.Second {
			t.Fatalf("Lifetime %v, want %ds", got, want)
		}
		if n, err := m.refresh(ctx); err != nil || n != 2 {
			t.Fatalf("Refresh after SetLifetime(%ds) wrote %d, %v; want both", want, n, err)
		}
		for _, ip := range []netip.Addr{lb4, lb6} {
			if valid, _, ok := lifetimes(t, tp, ip); !ok || valid > want || valid < want-1 {
				t.Fatalf("%s: valid %d (found %v), want %d s", ip, valid, ok, want)
			}
		}
	}
	if per, at, held := m.RenewCost(); per <= 0 || at != 2 || held != 2 {
		t.Fatalf("RenewCost %v measured at %d, %d held; want a cost, 2 and 2", per, at, held)
	}
	// Without a lifetime, SetLifetime changes nothing.
	forever := managerIn(t, tp.node, Config{Interface: "eth1"})
	if err := forever.SetLifetime(5 * time.Second); err != nil || forever.Lifetime() != 0 {
		t.Fatalf("SetLifetime without a lifetime: %v, Lifetime %v", err, forever.Lifetime())
	}
}

// Sync with KeepOnly bindings keeps and renews what the kernel holds and
// adds nothing; Sync resets lifetimes a previous process left (forever);
// Persist makes addresses permanent, and Sync and Refresh leave them so.
func TestPrivilegedKeepOnlyLifetimesAndPersist(t *testing.T) {
	tp := newTopology(t)
	ctx := context.Background()
	const lifetime = 30 * time.Second
	m := managerIn(t, tp.node, Config{Interface: "eth1", Lifetime: lifetime})
	keep := []model.Binding{{Addr: lb4, KeepOnly: true}, {Addr: lb6, KeepOnly: true}}

	res, err := m.Sync(ctx, keep)
	if err != nil || len(res.Added)+len(res.Removed)+len(res.Failed) != 0 || !slices.Equal(res.Absent, []netip.Addr{lb4, lb6}) {
		t.Fatalf("KeepOnly on an empty interface: %+v, %v; want both absent, nothing added", res, err)
	}
	if has(t, tp, lb4) || has(t, tp, lb6) {
		t.Fatal("a KeepOnly address was added")
	}

	// A previous process bound them forever (as Persist leaves them).
	previous := managerIn(t, tp.node, Config{Interface: "eth1"})
	if _, _, err := syncAddrs(ctx, previous, []netip.Addr{lb4, lb6}); err != nil {
		t.Fatal(err)
	}
	for _, ip := range []netip.Addr{lb4, lb6} {
		if valid, _, _ := lifetimes(t, tp, ip); valid != infinity {
			t.Fatalf("%s bound without a lifetime: valid %d", ip, valid)
		}
	}
	res, err = m.Sync(ctx, keep)
	if err != nil || len(res.Added)+len(res.Absent)+len(res.Failed) != 0 {
		t.Fatalf("KeepOnly of held addresses: %+v, %v; want them kept", res, err)
	}
	for _, ip := range []netip.Addr{lb4, lb6} {
		if valid, preferred, _ := lifetimes(t, tp, ip); valid > 30 || valid < 29 || preferred != 0 {
			t.Fatalf("%s after Sync: valid %d preferred %d; want the 30 s lifetime", ip, valid, preferred)
		}
	}
	// Nothing is due: Sync and Refresh write nothing more.
	if n, err := m.refresh(ctx); err != nil || n != 0 {
		t.Fatalf("Refresh right after Sync wrote %d, %v", n, err)
	}

	// Graceful shutdown: lb4 is handed over forever; an address that is
	// not bound is not bound by Persist.
	absent := netip.MustParseAddr("203.0.113.12")
	if err := m.Persist(ctx, []netip.Addr{lb4, absent}); err != nil {
		t.Fatal(err)
	}
	// (The kernel shows the preferred lifetime of an IPv4 address valid
	// forever as forever; the deprecated flag says it is 0.)
	if a := kernelAddrs(t, tp.node, "eth1")[lb4.String()]; a.Valid != infinity || !a.Deprecated {
		t.Fatalf("persisted %s: %+v; want valid forever, deprecated", lb4, a)
	}
	if has(t, tp, absent) {
		t.Fatal("Persist bound an address")
	}
	if valid, _, _ := lifetimes(t, tp, lb6); valid == infinity {
		t.Fatalf("%s was not persisted but is valid forever", lb6)
	}
	// The sync loop still running does not undo it.
	if _, err := m.refresh(ctx); err != nil {
		t.Fatal(err)
	}
	if res, err := m.Sync(ctx, keep); err != nil || len(res.Added)+len(res.Absent)+len(res.Failed) != 0 {
		t.Fatalf("Sync after Persist: %+v, %v", res, err)
	}
	if valid, _, _ := lifetimes(t, tp, lb4); valid != infinity {
		t.Fatalf("Sync after Persist gave %s a lifetime again: %d", lb4, valid)
	}
	// The next process sets its own lifetime.
	next := managerIn(t, tp.node, Config{Interface: "eth1", Lifetime: 10 * time.Second})
	if res, err := next.Sync(ctx, keep); err != nil || len(res.Added)+len(res.Absent)+len(res.Failed) != 0 {
		t.Fatalf("the next process's Sync: %+v, %v", res, err)
	}
	for _, ip := range []netip.Addr{lb4, lb6} {
		if valid, _, _ := lifetimes(t, tp, ip); valid > 10 {
			t.Fatalf("%s after the next process's Sync: valid %d, want its 10 s", ip, valid)
		}
	}
}

// One address the kernel refuses (IPv6 disabled on the interface) does not
// stop the others, and is no error of the interface.
func TestPrivilegedSyncFailureIsPerAddress(t *testing.T) {
	tp := newTopology(t)
	m := tp.manager(t, "eth1", false)
	tp.node.Exec(t, "sysctl", "-qw", "net.ipv6.conf.eth1.disable_ipv6=1")
	lb4b := netip.MustParseAddr("203.0.113.11")
	res, err := m.Sync(context.Background(), bindings(lb4, lb6, lb4b))
	if err != nil {
		t.Fatalf("Sync: %v", err)
	}
	if !slices.Equal(res.Added, []netip.Addr{lb4, lb4b}) || len(res.Failed) != 1 || res.Failed[lb6] == nil {
		t.Fatalf("Sync: %+v; want both IPv4 addresses added, %s failed", res, lb6)
	}
	t.Logf("IPv6 disabled: %v", res.Failed[lb6])
	if !has(t, tp, lb4, lb4b) || has(t, tp, lb6) {
		t.Fatal("the kernel does not hold what Sync reported")
	}
}

// On an interface that is down Sync adds nothing, still removes what is
// not wanted, and says ErrInterfaceDown; once up it binds the rest.
func TestPrivilegedSyncInterfaceDown(t *testing.T) {
	tp := newTopology(t)
	m := tp.manager(t, "eth1", false)
	ctx := context.Background()
	gone, later := netip.MustParseAddr("203.0.113.11"), netip.MustParseAddr("203.0.113.12")
	if _, _, err := syncAddrs(ctx, m, []netip.Addr{lb4, lb6, gone}); err != nil {
		t.Fatal(err)
	}
	tp.node.Exec(t, "ip", "link", "set", "eth1", "down")
	res, err := m.Sync(ctx, bindings(lb4, lb6, later))
	if !errors.Is(err, ErrInterfaceDown) {
		t.Fatalf("Sync on a down interface: %v, want ErrInterfaceDown", err)
	}
	// The kernel dropped IPv6 when the interface went down.
	if len(res.Added) != 0 || !slices.Equal(res.Removed, []netip.Addr{gone}) || !slices.Equal(res.Absent, []netip.Addr{later, lb6}) || len(res.Failed) != 0 {
		t.Fatalf("Sync on a down interface: %+v; want %s removed, %s and %s absent, nothing added", res, gone, later, lb6)
	}
	if h, err := m.Host(); err != nil || h.Up {
		t.Fatalf("Host on a down interface: Up %v, %v", h.Up, err)
	}
	tp.node.Exec(t, "ip", "link", "set", "eth1", "up")
	waitLinkRunning(t, tp.node, "eth1")
	res, err = m.Sync(ctx, bindings(lb4, lb6, later))
	if err != nil || !slices.Equal(res.Added, []netip.Addr{later, lb6}) {
		t.Fatalf("Sync once up: %+v, %v", res, err)
	}
	if h, err := m.Host(); err != nil || !h.Up {
		t.Fatalf("Host once up: Up %v, %v", h.Up, err)
	}
}

// A Sync or Refresh that finds every lifetime as it should be writes
// nothing to the kernel, with a lifetime or without.
func TestPrivilegedUnchangedSyncWritesNothing(t *testing.T) {
	for _, lifetime := range []time.Duration{0, time.Minute} {
		t.Run(fmt.Sprint("lifetime ", lifetime), func(t *testing.T) {
			tp := newTopology(t)
			ctx := context.Background()
			m := managerIn(t, tp.node, Config{Interface: "eth1", Lifetime: lifetime})
			updates := make(chan netlink.AddrUpdate, 64)
			done := make(chan struct{})
			h := tp.node.Handle
			if err := netlink.AddrSubscribeWithOptions(updates, done, netlink.AddrSubscribeOptions{Namespace: &h}); err != nil {
				t.Fatal(err)
			}
			defer func() {
				close(done)
				for range updates {
				}
			}()
			if _, _, err := syncAddrs(ctx, m, []netip.Addr{lb4, lb6}); err != nil {
				t.Fatal(err)
			}
			// The kernel announces a new IPv6 address from a work item,
			// a moment after it was added.
			for seen := map[string]bool{}; !seen[lb4.String()] || !seen[lb6.String()]; {
				select {
				case u := <-updates:
					seen[u.LinkAddress.IP.String()] = u.NewAddr
				case <-time.After(5 * time.Second):
					t.Fatalf("no notification of the new addresses: %v", seen)
				}
			}
			for range 3 {
				if added, removed, err := syncAddrs(ctx, m, []netip.Addr{lb4, lb6}); err != nil || len(added)+len(removed) != 0 {
					t.Fatalf("Sync: added %v removed %v, %v", added, removed, err)
				}
				if err := m.Refresh(ctx, nil); err != nil {
					t.Fatal(err)
				}
			}
			// A change of our own after them: the first notification
			// must be it.
			tp.node.Exec(t, "ip", "addr", "add", "198.51.100.99/32", "dev", "eth1")
			select {
			case u := <-updates:
				if u.LinkAddress.IP.String() != "198.51.100.99" {
					t.Fatalf("an unchanged Sync or Refresh wrote %s (new %v)", u.LinkAddress.IP, u.NewAddr)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("no notification of the marker address")
			}
		})
	}
}

// BenchmarkRefresh measures Refresh at 2,000 owned addresses (400 IPv4,
// all the test ranges hold, and 1,600 IPv6): the usual call, with nothing
// due; a call that lists the interface and finds nothing stale; and the
// call every third of the lifetime that renews every address. Sync with
// nothing to change, for comparison.
func BenchmarkRefresh(b *testing.B) {
	tp := newTopology(b)
	ctx := context.Background()
	var want []netip.Addr
	for i := range 250 {
		want = append(want, netip.MustParseAddr(fmt.Sprintf("198.51.100.%d", 1+i)))
	}
	for i := range 150 {
		want = append(want, netip.MustParseAddr(fmt.Sprintf("203.0.113.%d", 100+i)))
	}
	for i := range 600 {
		want = append(want, netip.MustParseAddr(fmt.Sprintf("2001:db8:6::%x", 1+i)))
	}
	want = append(want, manyIPv6(1000)...)
	m := managerIn(b, tp.node, Config{Interface: "eth1", Lifetime: time.Hour})
	if added, _, err := syncAddrs(ctx, m, want); err != nil || len(added) != len(want) {
		b.Fatalf("Sync: added %d of %d, err %v", len(added), len(want), err)
	}
	b.Run("nothing-due-2000", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if n, err := m.refresh(ctx); err != nil || n != 0 {
				b.Fatalf("Refresh wrote %d, %v", n, err)
			}
		}
	})
	// When a renewal is due by this Manager's clock, Refresh lists the
	// interface; here the kernel's clock says nothing is stale yet.
	b.Run("listing-nothing-stale-2000", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			m.syncMu.Lock()
			m.refreshAt = time.Time{}
			m.syncMu.Unlock()
			if n, err := m.refresh(ctx); err != nil || n != 0 {
				b.Fatalf("Refresh wrote %d, %v", n, err)
			}
		}
	})
	b.Run("all-due-2000", func(b *testing.B) {
		b.ReportAllocs()
		// A Manager without lifetime makes them permanent again between
		// the measured calls.
		forever := managerIn(b, tp.node, Config{Interface: "eth1"})
		for b.Loop() {
			b.StopTimer()
			if _, _, err := syncAddrs(ctx, forever, want); err != nil {
				b.Fatal(err)
			}
			// m's own clock cannot know: as when a third of the
			// lifetime has passed.
			m.syncMu.Lock()
			m.refreshAt = time.Time{}
			m.syncMu.Unlock()
			b.StartTimer()
			if n, err := m.refresh(ctx); err != nil || n != len(want) {
				b.Fatalf("Refresh wrote %d of %d, %v", n, len(want), err)
			}
		}
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(len(want)), "ns/renewal")
	})
	b.Run("sync-unchanged-2000", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if added, removed, err := syncAddrs(ctx, m, want); err != nil || len(added)+len(removed) != 0 {
				b.Fatalf("Sync: added %d removed %d, %v", len(added), len(removed), err)
			}
		}
	})
}
