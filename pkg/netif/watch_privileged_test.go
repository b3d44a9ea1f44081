package netif

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
)

// pokes is the test's stand-in for the sync loop's queue: onChange records
// the time of the first poke since the last take (coalescing, never
// blocking).
type pokes struct {
	ch    chan time.Time
	block atomic.Pointer[chan struct{}] // when set, onChange waits on it
	calls atomic.Int64
}

func (p *pokes) onChange() {
	p.calls.Add(1)
	if c := p.block.Load(); c != nil {
		<-*c
	}
	select {
	case p.ch <- time.Now():
	default:
	}
}

func (p *pokes) drain() {
	select {
	case <-p.ch:
	default:
	}
}

func (p *pokes) expect(t testing.TB, within time.Duration, what string) time.Time {
	t.Helper()
	select {
	case at := <-p.ch:
		return at
	case <-time.After(within):
		t.Fatalf("no onChange within %v after %s", within, what)
		return time.Time{}
	}
}

func (p *pokes) expectNone(t testing.TB, during time.Duration, what string) {
	t.Helper()
	select {
	case <-p.ch:
		t.Fatalf("onChange after %s", what)
	case <-time.After(during):
	}
}

// watch runs m.Watch until the test ends and returns once it has
// subscribed (its first onChange).
func watch(t testing.TB, m *Manager) *pokes {
	t.Helper()
	// A veth just set up reports running a moment later: a Watch
	// started before would see that as the interface coming up.
	waitRunning(t, m)
	p := &pokes{ch: make(chan time.Time, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Watch(ctx, p.onChange) }()
	t.Cleanup(func() {
		if c := p.block.Load(); c != nil {
			close(*c)
			p.block.Store(nil)
		}
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Watch returned %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("Watch did not return after its context ended")
		}
	})
	p.expect(t, 5*time.Second, "subscribing")
	return p
}

// waitRunning waits (at most 5 s) until m's interface is up and running.
func waitRunning(t testing.TB, m *Manager) {
	t.Helper()
	for end := time.Now().Add(5 * time.Second); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		if l, err := m.link(); err == nil && linkUp(l.Attrs()) {
			return
		}
	}
	t.Fatalf("%s is not running after 5 s", m.cfg.Interface)
}

// syncUntil plays the sync loop: Sync after each poke (and at least every
// 200 ms, tolerating a missing or down interface) until ok or the
// deadline.
func syncUntil(t testing.TB, m *Manager, p *pokes, want []netip.Addr, within time.Duration, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		if _, _, err := syncAddrs(context.Background(), m, want); err != nil && !errors.Is(err, ErrInterfaceNotFound) && !errors.Is(err, ErrInterfaceDown) {
			t.Fatal(err)
		}
		if ok() {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("not restored within %v", within)
		}
		select {
		case <-p.ch:
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func has(t testing.TB, tp *topology, ips ...netip.Addr) bool {
	got := kernelAddrs(t, tp.node, tp.iface)
	for _, ip := range ips {
		if _, ok := got[ip.String()]; !ok {
			return false
		}
	}
	return true
}

// restored: both addresses bound and known to the peer (which only
// announcements can have taught, its neighbours having been flushed).
func restored(t testing.TB, tp *topology) func() bool {
	return func() bool {
		return has(t, tp, lb4, lb6) && tp.peerKnows(t, lb4) && tp.peerKnows(t, lb6)
	}
}

func durations(ds []time.Duration) string {
	s := slices.Clone(ds)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return fmt.Sprintf("min %v, median %v, max %v (n=%d)", s[0].Round(time.Microsecond), s[len(s)/2].Round(time.Microsecond), s[len(s)-1].Round(time.Microsecond), len(s))
}

// (a) An owned address deleted by hand is noticed at once and restored by
// the next Sync.
func TestPrivilegedWatchAddressDeleted(t *testing.T) {
	tp := newTopology(t)
	m := tp.manager(t, "eth1", false)
	want := []netip.Addr{lb4, lb6}
	if _, _, err := syncAddrs(context.Background(), m, want); err != nil {
		t.Fatal(err)
	}
	p := watch(t, m)

	for _, ip := range want {
		start := time.Now()
		tp.node.Exec(t, "ip", "addr", "del", netip.PrefixFrom(ip, ip.BitLen()).String(), "dev", "eth1")
		ran := time.Since(start)
		poked := p.expect(t, time.Second, "ip addr del "+ip.String())
		added, _, err := syncAddrs(context.Background(), m, want)
		back := time.Since(start)
		if err != nil || !slices.Equal(added, []netip.Addr{ip}) {
			t.Fatalf("Sync after the poke: added %v, err %v; want %v", added, err, ip)
		}
		if !has(t, tp, ip) {
			t.Fatalf("%s not restored", ip)
		}
		t.Logf("ip addr del %s → onChange %v (the ip command itself ran %v), → address back after Sync %v",
			ip, poked.Sub(start).Round(time.Microsecond), ran.Round(time.Microsecond), back.Round(time.Microsecond))
	}

	// The same through netlink, without a process start in the measure.
	h, err := netlink.NewHandleAt(tp.node.Handle)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	l, err := h.LinkByName("eth1")
	if err != nil {
		t.Fatal(err)
	}
	var toPoke, toBack []time.Duration
	for i := range 20 {
		ip := want[i%2]
		a := &netlink.Addr{IPNet: &net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(ip.BitLen(), ip.BitLen())}}
		start := time.Now()
		if err := h.AddrDel(l, a); err != nil {
			t.Fatal(err)
		}
		poked := p.expect(t, time.Second, "deleting "+ip.String())
		if added, _, err := syncAddrs(context.Background(), m, want); err != nil || len(added) != 1 {
			t.Fatalf("added %v, err %v", added, err)
		}
		toPoke, toBack = append(toPoke, poked.Sub(start)), append(toBack, time.Since(start))
	}
	t.Logf("netlink delete → onChange: %s", durations(toPoke))
	t.Logf("netlink delete → address back after Sync: %s", durations(toBack))
}

// (b) Down and up: IPv6 is restored and every address announced again,
// also the IPv4 one the kernel kept.
func TestPrivilegedWatchLinkDownUp(t *testing.T) {
	tp := newTopology(t)
	m := tp.manager(t, "eth1", true)
	want := []netip.Addr{lb4, lb6}
	if _, _, err := syncAddrs(context.Background(), m, want); err != nil {
		t.Fatal(err)
	}
	tp.peerLearns(t, lb4, 5*time.Second)
	tp.peerLearns(t, lb6, 5*time.Second)
	m.Wait() // no announcement of the first bind is still on its way
	p := watch(t, m)

	start := time.Now()
	tp.node.Exec(t, "ip", "link", "set", "eth1", "down")
	t.Logf("ip link set down → onChange %v", p.expect(t, time.Second, "link down").Sub(start).Round(time.Microsecond))
	// While down: Sync adds nothing (the kernel dropped IPv6), says so,
	// and announces nothing.
	res, err := m.Sync(context.Background(), bindings(want...))
	if !errors.Is(err, ErrInterfaceDown) || len(res.Added) != 0 || !slices.Equal(res.Absent, []netip.Addr{lb6}) {
		t.Fatalf("Sync while down: %+v, %v; want ErrInterfaceDown, nothing added, %s absent", res, err, lb6)
	}
	if h, err := m.Host(); err != nil || h.Up {
		t.Fatalf("Host while down: Up %v, %v", h.Up, err)
	}

	start = time.Now()
	tp.node.Exec(t, "ip", "link", "set", "eth1", "up")
	// Forget what the peer knew, so that only new announcements count.
	tp.peer.Exec(t, "ip", "neigh", "flush", "dev", "ext0")
	if out := tp.peer.Exec(t, "ip", "neigh", "show", "dev", "ext0"); strings.Contains(out, tp.nodeMAC) {
		t.Fatalf("peer neighbours not flushed: %s", out)
	}
	t.Logf("ip link set up → onChange %v", p.expect(t, 2*time.Second, "link up").Sub(start).Round(time.Microsecond))
	syncUntil(t, m, p, want, 5*time.Second, restored(t, tp))
	if owned, err := m.Owned(); err != nil || !slices.Equal(owned, want) {
		t.Fatalf("Owned = %v, %v", owned, err)
	}
	t.Logf("ip link set up → peer re-learned both addresses %v", time.Since(start).Round(time.Millisecond))

	// A flap faster than the sync loop: no Sync sees the interface down,
	// yet the next one restores IPv6 and announces both again.
	m.Wait()
	p.drain()
	start = time.Now()
	tp.node.Exec(t, "sh", "-c", "ip link set eth1 down && ip link set eth1 up")
	tp.peer.Exec(t, "ip", "neigh", "flush", "dev", "ext0")
	p.expect(t, time.Second, "a flap")
	syncUntil(t, m, p, want, 5*time.Second, restored(t, tp))
	t.Logf("flap → IPv6 back and both re-learned %v", time.Since(start).Round(time.Millisecond))
}

// (c) The interface deleted and created again under the same name: both
// families are bound and announced on the new one.
func TestPrivilegedWatchInterfaceRecreated(t *testing.T) {
	tp := newTopology(t)
	m := tp.manager(t, "eth1", true)
	want := []netip.Addr{lb4, lb6}
	if _, _, err := syncAddrs(context.Background(), m, want); err != nil {
		t.Fatal(err)
	}
	m.Wait()
	p := watch(t, m)

	tp.node.Exec(t, "ip", "link", "del", "eth1")
	p.expect(t, time.Second, "ip link del")
	if _, _, err := syncAddrs(context.Background(), m, want); !errors.Is(err, ErrInterfaceNotFound) {
		t.Fatalf("Sync without the interface: %v", err)
	}
	start := time.Now()
	tp.wire(t)
	p.expect(t, time.Second, "re-creating the interface")
	syncUntil(t, m, p, want, 5*time.Second, restored(t, tp))
	if owned, err := m.Owned(); err != nil || !slices.Equal(owned, want) {
		t.Fatalf("Owned = %v, %v", owned, err)
	}
	t.Logf("re-created → both families bound and announced %v", time.Since(start).Round(time.Millisecond))
}

// (d) Churn elsewhere, and Sync's own changes, do not poke.
func TestPrivilegedWatchIgnoresOtherChanges(t *testing.T) {
	tp := newTopology(t)
	m := tp.manager(t, "eth1", false)
	ctx := context.Background()
	if _, _, err := syncAddrs(ctx, m, []netip.Addr{lb4, lb6}); err != nil {
		t.Fatal(err)
	}
	p := watch(t, m)

	// Another interface: created, addresses, down, up, deleted.
	tp.node.Exec(t, "ip", "link", "add", "eth2", "type", "veth", "peer", "name", "ext2", "netns", tp.peer.Name)
	tp.node.Exec(t, "ip", "link", "set", "eth2", "up")
	tp.peer.Exec(t, "ip", "link", "set", "ext2", "up")
	tp.node.Exec(t, "ip", "addr", "add", "198.51.100.5/32", "dev", "eth2", "preferred_lft", "0")
	tp.node.Exec(t, "ip", "addr", "add", "203.0.113.10/32", "dev", "eth2") // the same IP as ours, elsewhere
	tp.node.Exec(t, "ip", "addr", "del", "198.51.100.5/32", "dev", "eth2")
	tp.node.Exec(t, "ip", "addr", "del", "203.0.113.10/32", "dev", "eth2")
	tp.node.Exec(t, "ip", "link", "set", "eth2", "down")
	tp.node.Exec(t, "ip", "link", "set", "eth2", "up")
	tp.node.Exec(t, "ip", "link", "del", "eth2")
	// Foreign addresses on the serviceInterface come and go.
	tp.node.Exec(t, "ip", "addr", "add", "203.0.113.77/32", "dev", "eth1")
	tp.node.Exec(t, "ip", "addr", "del", "203.0.113.77/32", "dev", "eth1")
	tp.node.Exec(t, "ip", "addr", "del", "203.0.113.99/32", "dev", "eth1")
	// Sync removes and adds its own.
	if _, removed, err := syncAddrs(ctx, m, []netip.Addr{lb4}); err != nil || len(removed) != 1 {
		t.Fatalf("removed %v, err %v", removed, err)
	}
	// Let Watch read the removal while the address is unwanted: had the
	// next Sync wanted it again first, the late event would rightly look
	// like a loss (one extra Sync, harmless, but not what this checks).
	time.Sleep(100 * time.Millisecond)
	if added, _, err := syncAddrs(ctx, m, []netip.Addr{lb4, lb6}); err != nil || len(added) != 1 {
		t.Fatalf("added %v, err %v", added, err)
	}
	p.expectNone(t, 500*time.Millisecond, "changes that need no Sync")
	if n := p.calls.Load(); n != 1 {
		t.Fatalf("onChange called %d times, want only the subscription's", n)
	}
}

// When a subscription ends (here: its socket overflows while onChange is
// stuck), Watch subscribes again, pokes, and the next Sync announces again.
func TestPrivilegedWatchResubscribes(t *testing.T) {
	tp := newTopology(t)
	m := tp.manager(t, "eth1", false)
	if _, _, err := syncAddrs(context.Background(), m, []netip.Addr{lb4}); err != nil {
		t.Fatal(err)
	}
	p := watch(t, m)
	unblock := make(chan struct{})
	p.block.Store(&unblock)
	// One poke that blocks, then a flood the reader cannot take.
	tp.node.Exec(t, "ip", "addr", "del", "203.0.113.10/32", "dev", "eth1")
	var batch strings.Builder
	for range 16 {
		for _, op := range []string{"add", "del"} {
			for i := range 250 {
				fmt.Fprintf(&batch, "addr %s 198.51.100.%d/32 dev eth1\n", op, i+1)
			}
		}
	}
	cmd := tp.node.Cmd("ip", "-batch", "-")
	cmd.Stdin = strings.NewReader(batch.String())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("ip -batch: %v: %s", err, out)
	}
	before := p.calls.Load()
	p.block.Store(nil)
	close(unblock)
	p.drain()
	// The first poke (the deletion), then the re-subscription's.
	deadline := time.Now().Add(10 * time.Second)
	for !reannouncePending(m) {
		if time.Now().After(deadline) {
			t.Fatalf("no re-subscription within 10 s (onChange calls: %d before the flood ended, %d now)", before, p.calls.Load())
		}
		time.Sleep(20 * time.Millisecond)
	}
	p.expect(t, 5*time.Second, "re-subscribing")
	// The new subscription works.
	if _, _, err := syncAddrs(context.Background(), m, []netip.Addr{lb4}); err != nil {
		t.Fatal(err)
	}
	p.drain()
	tp.node.Exec(t, "ip", "addr", "del", "203.0.113.10/32", "dev", "eth1")
	p.expect(t, time.Second, "ip addr del after re-subscribing")
}

func reannouncePending(m *Manager) bool {
	m.state.mu.Lock()
	defer m.state.mu.Unlock()
	return m.state.reannounce
}

// BenchmarkWatchRestore: an owned address deleted through netlink, the
// poke, and the Sync that puts it back.
func BenchmarkWatchRestore(b *testing.B) {
	tp := newTopology(b)
	m := tp.manager(b, "eth1", false)
	want := []netip.Addr{lb4}
	if _, _, err := syncAddrs(context.Background(), m, want); err != nil {
		b.Fatal(err)
	}
	p := watch(b, m)
	h, err := netlink.NewHandleAt(tp.node.Handle)
	if err != nil {
		b.Fatal(err)
	}
	defer h.Close()
	l, err := h.LinkByName("eth1")
	if err != nil {
		b.Fatal(err)
	}
	a := &netlink.Addr{IPNet: &net.IPNet{IP: lb4.AsSlice(), Mask: net.CIDRMask(32, 32)}}
	var toPoke time.Duration
	for b.Loop() {
		start := time.Now()
		if err := h.AddrDel(l, a); err != nil {
			b.Fatal(err)
		}
		toPoke += p.expect(b, time.Second, "deleting").Sub(start)
		if added, _, err := syncAddrs(context.Background(), m, want); err != nil || len(added) != 1 {
			b.Fatalf("added %v, err %v", added, err)
		}
	}
	b.ReportMetric(float64(toPoke.Nanoseconds())/float64(b.N), "ns-to-onChange/op")
}
