package netif

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/mdlayher/packet"

	"github.com/egressvip/egressvip/internal/privtest"
)

// lan: hosts whose eth1 are ports of a bridge in a namespace of its own,
// as nodes on one switch. Host i has 203.0.113.(1+i)/24 and
// 2001:db8:1::(1+i)/64.
type lan struct {
	bridge *privtest.NS
	hosts  []*lanHost
}

type lanHost struct {
	ns   *privtest.NS
	mac  net.HardwareAddr
	port string
}

func newLAN(t testing.TB, n int) *lan {
	t.Helper()
	privtest.Require(t)
	l := &lan{bridge: privtest.NewNS(t, "nif-br")}
	l.bridge.Exec(t, "ip", "link", "add", "br0", "type", "bridge", "forward_delay", "0")
	l.bridge.Exec(t, "ip", "link", "set", "br0", "up")
	for i := range n {
		h := &lanHost{ns: privtest.NewNS(t, fmt.Sprintf("nif-h%d", i)), port: fmt.Sprintf("p%d", i)}
		l.hosts = append(l.hosts, h)
		l.plug(t, h)
		h.ns.Exec(t, "ip", "addr", "add", fmt.Sprintf("203.0.113.%d/24", 1+i), "dev", "eth1")
		h.ns.Exec(t, "ip", "addr", "add", fmt.Sprintf("2001:db8:1::%d/64", 1+i), "dev", "eth1", "nodad")
	}
	for _, h := range l.hosts {
		waitLinkRunning(t, h.ns, "eth1")
	}
	return l
}

// plug connects h's eth1 to the bridge (again, after a test deleted it).
func (l *lan) plug(t testing.TB, h *lanHost) {
	t.Helper()
	privtest.Veth(t, h.ns, "eth1", l.bridge, h.port)
	l.bridge.Exec(t, "ip", "link", "set", h.port, "master", "br0")
	mac, err := net.ParseMAC(linkMAC(t, h.ns, "eth1"))
	if err != nil {
		t.Fatal(err)
	}
	h.mac = mac
}

// sender returns a function that sends raw Ethernet frames from h's eth1.
func (h *lanHost) sender(t testing.TB) func(frame []byte) {
	t.Helper()
	var (
		c   *packet.Conn
		err error
	)
	h.ns.Do(t, func() {
		var ifi *net.Interface
		if ifi, err = net.InterfaceByName("eth1"); err == nil {
			// Protocol 0: it sends only.
			c, err = packet.Listen(ifi, packet.Raw, 0, nil)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return func(frame []byte) {
		t.Helper()
		if _, err := c.WriteTo(frame, &packet.Addr{HardwareAddr: frame[0:6]}); err != nil {
			t.Fatalf("send from %s: %v", h.ns.Name, err)
		}
	}
}

// resolves makes h resolve ip (it sends it a datagram, so its kernel asks
// with an ARP request or a neighbour solicitation) and waits until its
// neighbour table maps ip to mac.
func (h *lanHost) resolves(t testing.TB, ip netip.Addr, mac net.HardwareAddr) {
	t.Helper()
	var (
		c   *net.UDPConn
		err error
	)
	h.ns.Do(t, func() { c, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(ip, 9))) })
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for end := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		_, _ = c.Write([]byte("who has it?"))
		if strings.Contains(h.ns.Exec(t, "ip", "neigh", "show", ip.String(), "dev", "eth1"), mac.String()) {
			return
		}
		if time.Now().After(end) {
			t.Fatalf("%s did not resolve %s to %s within 5 s", h.ns.Name, ip, mac)
		}
	}
}

// joined waits until h's kernel has joined the solicited-node group of
// ip: it does so from a work item a moment after the address was bound,
// and until then it does not hear DAD probes for it.
func (h *lanHost) joined(t testing.TB, ip netip.Addr) {
	t.Helper()
	group, _ := solicitedNode(ip)
	for end := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if strings.Contains(h.ns.Exec(t, "ip", "-6", "maddr", "show", "dev", "eth1"), group.String()) {
			return
		}
		if time.Now().After(end) {
			t.Fatalf("%s did not join %s within 5 s", h.ns.Name, group)
		}
	}
}

// A host that holds addresses as egressvip binds them (with a lifetime,
// preferred 0, IPv6 NODAD) answers the probes of another: Probe finds them
// with its MAC, and not the free ones, nor the prober's own addresses.
func TestPrivilegedProbeFindsTheHolder(t *testing.T) {
	l := newLAN(t, 2)
	a, b := l.hosts[0], l.hosts[1]
	ctx := context.Background()
	held4, held6 := netip.MustParseAddr("203.0.113.20"), netip.MustParseAddr("2001:db8:1::20")
	free4, free6 := netip.MustParseAddr("203.0.113.21"), netip.MustParseAddr("2001:db8:1::21")
	// Held by both: A must not probe what it holds itself (B would answer).
	both4, both6 := netip.MustParseAddr("203.0.113.30"), netip.MustParseAddr("2001:db8:1::30")
	mb := managerIn(t, b.ns, Config{Interface: "eth1", Lifetime: 30 * time.Second})
	if _, _, err := syncAddrs(ctx, mb, []netip.Addr{held4, held6, both4, both6}); err != nil {
		t.Fatal(err)
	}
	b.joined(t, held6)
	a.ns.Exec(t, "ip", "addr", "add", both4.String()+"/32", "dev", "eth1")
	a.ns.Exec(t, "ip", "addr", "add", both6.String()+"/128", "dev", "eth1", "nodad")
	ma := managerIn(t, a.ns, Config{Interface: "eth1"})
	bNode4 := netip.MustParseAddr("203.0.113.2") // B's own /24 address

	found, err := ma.Probe(ctx, []netip.Addr{held4, held6, free4, free6, both4, both6, bNode4, netip.MustParseAddr("203.0.113.1")}, 300*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	want := map[netip.Addr]net.HardwareAddr{held4: b.mac, held6: b.mac, bNode4: b.mac}
	if len(found) != len(want) {
		t.Fatalf("found %v, want %v", found, want)
	}
	for ip, mac := range want {
		if !sameMAC(found[ip], mac) {
			t.Fatalf("found %v, want %s answered by %s", found, ip, mac)
		}
	}

	// Once B let go, nobody answers.
	if _, _, err := syncAddrs(ctx, mb, nil); err != nil {
		t.Fatal(err)
	}
	if found, err := ma.Probe(ctx, []netip.Addr{held4, held6}, 300*time.Millisecond); err != nil || len(found) != 0 {
		t.Fatalf("after B let go: found %v, %v", found, err)
	}

	// Time from the probe to the answer, both families at once.
	if _, _, err := syncAddrs(ctx, mb, []netip.Addr{held4, held6}); err != nil {
		t.Fatal(err)
	}
	b.joined(t, held6)
	var rtts []time.Duration
	for range 20 {
		start := time.Now()
		found, err := ma.Probe(ctx, []netip.Addr{held4, held6}, time.Second)
		if err != nil || len(found) != 2 {
			t.Fatalf("found %v, %v", found, err)
		}
		rtts = append(rtts, time.Since(start))
	}
	t.Logf("Probe of 2 held addresses (IPv4 and IPv6) until both answered, socket set-up included: %s", durations(rtts))

	// The wire alone: a probe sent, its answer read, on Probe's socket.
	ifi, err := ma.ethernet()
	if err != nil {
		t.Fatal(err)
	}
	conn, err := ma.listenACD(ifi, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	buf := make([]byte, snapLen)
	for _, ip := range []netip.Addr{held4, held6} {
		rtts = rtts[:0]
		for range 20 {
			frame, dst := appendARPProbe(nil, a.mac, ip), broadcast
			if ip.Is6() {
				frame = appendDADSolicitation(nil, a.mac, ip)
				dst = frame[0:6]
			}
			start := time.Now()
			if err := sendFrame(conn, frame, dst); err != nil {
				t.Fatal(err)
			}
			_ = conn.SetReadDeadline(time.Now().Add(time.Second))
			for {
				n, _, err := conn.ReadFrom(buf)
				if err != nil {
					t.Fatalf("no answer for %s: %v", ip, err)
				}
				if c, ok := parseClaim(buf[:n]); ok && c.ip == ip && sameMAC(c.mac, b.mac) {
					break
				}
			}
			rtts = append(rtts, time.Since(start))
		}
		t.Logf("probe for %s → B's answer read: %s", ip, durations(rtts))
	}
}

// One Probe of 2,000 addresses: every one held is found, from one socket.
func TestPrivilegedProbeScale(t *testing.T) {
	l := newLAN(t, 2)
	a, b := l.hosts[0], l.hosts[1]
	ctx := context.Background()
	var addrs []netip.Addr
	for i := range 250 {
		addrs = append(addrs, netip.MustParseAddr(fmt.Sprintf("198.51.100.%d", 1+i)))
	}
	addrs = append(addrs, manyIPv6(1750)...)
	mb := managerIn(t, b.ns, Config{Interface: "eth1", Lifetime: time.Minute})
	if added, _, err := syncAddrs(ctx, mb, addrs); err != nil || len(added) != len(addrs) {
		t.Fatalf("B binds %d of %d: %v", len(added), len(addrs), err)
	}
	b.joined(t, addrs[len(addrs)-1])
	ma := managerIn(t, a.ns, Config{Interface: "eth1"})
	start := time.Now()
	found, err := ma.Probe(ctx, addrs, 5*time.Second)
	took := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	missing := 0
	for _, ip := range addrs {
		if !sameMAC(found[ip], b.mac) {
			missing++
		}
	}
	if missing > 0 || len(found) != len(addrs) {
		t.Fatalf("found %d of %d held addresses (%d missing or wrong MAC)", len(found), len(addrs), missing)
	}
	t.Logf("Probe of %d held addresses (250 IPv4, 1,750 IPv6): all answered after %v", len(addrs), took.Round(time.Millisecond))

	if _, _, err := syncAddrs(ctx, mb, nil); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	found, err = ma.Probe(ctx, addrs, 200*time.Millisecond)
	if err != nil || len(found) != 0 {
		t.Fatalf("after B let go: found %d, %v", len(found), err)
	}
	t.Logf("Probe of %d free addresses with wait 200ms: %v", len(addrs), time.Since(start).Round(time.Millisecond))
}

// conflicts runs m.Conflicts until the test ends.
func conflicts(t testing.TB, m *Manager) <-chan Conflict {
	t.Helper()
	ch := make(chan Conflict, 1024)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- m.Conflicts(ctx, func(c Conflict) {
			select {
			case ch <- c:
			default:
				t.Errorf("conflict dropped: %+v", c)
			}
		})
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Conflicts returned %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("Conflicts did not return after its context ended")
		}
	})
	return ch
}

// next is the next conflict, which must be about ip, from mac, with probe.
func next(t testing.TB, ch <-chan Conflict, ip netip.Addr, mac net.HardwareAddr, probe bool, what string) Conflict {
	t.Helper()
	select {
	case c := <-ch:
		if c.Addr != ip || !sameMAC(c.MAC, mac) || c.Probe != probe {
			t.Fatalf("%s: conflict %+v; want %s from %s, probe %v", what, c, ip, mac, probe)
		}
		return c
	case <-time.After(2 * time.Second):
		t.Fatalf("%s: no conflict within 2 s", what)
		return Conflict{}
	}
}

// untilListening sends frame until ch reports a conflict (Conflicts is
// listening), then sends a probe for ip and discards everything up to its
// conflict: the channel is empty and in step afterwards.
func untilListening(t testing.TB, ch <-chan Conflict, send func([]byte), frame []byte, mac net.HardwareAddr, ip netip.Addr) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for listening := false; !listening; {
		send(frame)
		select {
		case <-ch:
			listening = true
		case <-time.After(100 * time.Millisecond):
		case <-deadline:
			t.Fatal("Conflicts reported nothing within 10 s")
		}
	}
	send(appendARPProbe(nil, mac, ip))
	for {
		select {
		case c := <-ch:
			if c.Addr == ip && c.Probe {
				return
			}
		case <-deadline:
			t.Fatal("the barrier probe was not reported")
		}
	}
}

// Another host's claims and probes of the addresses A owns are reported
// at once with its MAC; A's own announcements, ordinary address
// resolution and addresses A does not own are not.
func TestPrivilegedConflicts(t *testing.T) {
	l := newLAN(t, 2)
	a, b := l.hosts[0], l.hosts[1]
	ctx := context.Background()
	ma := managerIn(t, a.ns, Config{Interface: "eth1", Announce: true, AnnounceCount: 3, AnnounceInterval: 100 * time.Millisecond, Lifetime: time.Minute})
	if _, _, err := syncAddrs(ctx, ma, []netip.Addr{lb4, lb6}); err != nil {
		t.Fatal(err)
	}
	ch := conflicts(t, ma)
	send := b.sender(t)
	untilListening(t, ch, send, appendGARP(nil, b.mac, lb4), b.mac, lb4)

	// Each kind, in order.
	send(appendGARP(nil, b.mac, lb4))
	next(t, ch, lb4, b.mac, false, "gratuitous ARP")
	send(appendARPProbe(nil, b.mac, lb4))
	next(t, ch, lb4, b.mac, true, "ARP probe")
	send(appendARP(nil, 2, b.mac, lb4, a.mac, netip.MustParseAddr("203.0.113.1"), a.mac))
	next(t, ch, lb4, b.mac, false, "ARP reply")
	send(appendUnsolicitedNA(nil, b.mac, lb6))
	next(t, ch, lb6, b.mac, false, "unsolicited NA")
	send(appendDADSolicitation(nil, b.mac, lb6))
	next(t, ch, lb6, b.mac, true, "DAD solicitation")
	snm, _ := solicitedNode(netip.MustParseAddr("2001:db8:1::1"))
	send(appendNDP(nil, typeNS, b.mac, lb6, snm, netip.MustParseAddr("2001:db8:1::1"), optSLLA, 0))
	next(t, ch, lb6, b.mac, false, "solicitation from our address")

	// How fast: from B's send to A's callback.
	var lat []time.Duration
	for i := range 20 {
		frame, ip := appendGARP(nil, b.mac, lb4), lb4
		if i%2 == 1 {
			frame, ip = appendUnsolicitedNA(nil, b.mac, lb6), lb6
		}
		start := time.Now()
		send(frame)
		c := next(t, ch, ip, b.mac, false, "timing")
		lat = append(lat, c.At.Sub(start))
	}
	t.Logf("frame sent by B → A's callback: %s", durations(lat))

	// None of these may fire; the claim after them must be the next
	// conflict.
	lb4b := netip.MustParseAddr("203.0.113.11")
	if _, _, err := syncAddrs(ctx, ma, []netip.Addr{lb4, lb6, lb4b}); err != nil {
		t.Fatal(err)
	}
	ma.Wait() // A announced lb4b three times
	b.resolves(t, lb4, a.mac)
	b.resolves(t, lb6, a.mac)
	notOurs := netip.MustParseAddr("203.0.113.77")
	send(appendGARP(nil, b.mac, notOurs))
	send(appendARPProbe(nil, b.mac, notOurs))
	send(appendUnsolicitedNA(nil, b.mac, netip.MustParseAddr("2001:db8:1::77")))
	send(appendGARP(nil, a.mac, lb4)) // A's MAC, sent by B: not a stranger
	send(appendGARP(nil, b.mac, lb4b))
	next(t, ch, lb4b, b.mac, false, "after A's announcements, pings and frames about other addresses")

	// An address A no longer owns is not defended.
	if _, _, err := syncAddrs(ctx, ma, []netip.Addr{lb6}); err != nil {
		t.Fatal(err)
	}
	send(appendGARP(nil, b.mac, lb4))
	send(appendUnsolicitedNA(nil, b.mac, lb6))
	next(t, ch, lb6, b.mac, false, "after A removed "+lb4.String())
}

// Conflicts keeps listening when the interface goes down and up, and
// listens on the new one when it is deleted and created again.
func TestPrivilegedConflictsFollowTheInterface(t *testing.T) {
	l := newLAN(t, 2)
	a, b := l.hosts[0], l.hosts[1]
	ctx := context.Background()
	ma := managerIn(t, a.ns, Config{Interface: "eth1"})
	if _, _, err := syncAddrs(ctx, ma, []netip.Addr{lb4}); err != nil {
		t.Fatal(err)
	}
	ch := conflicts(t, ma)
	send := b.sender(t)
	garp := appendGARP(nil, b.mac, lb4)
	untilListening(t, ch, send, garp, b.mac, lb4)

	a.ns.Exec(t, "ip", "link", "set", "eth1", "down")
	a.ns.Exec(t, "ip", "link", "set", "eth1", "up")
	waitLinkRunning(t, a.ns, "eth1")
	start := time.Now()
	untilListening(t, ch, send, garp, b.mac, lb4)
	t.Logf("down and up → reported again after %v", time.Since(start).Round(time.Microsecond))

	a.ns.Exec(t, "ip", "link", "del", "eth1")
	l.plug(t, a)
	waitLinkRunning(t, a.ns, "eth1")
	if _, _, err := syncAddrs(ctx, ma, []netip.Addr{lb4}); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	untilListening(t, ch, send, garp, b.mac, lb4)
	t.Logf("re-created and bound again → reported again after %v", time.Since(start).Round(time.Microsecond))
	send(garp)
	next(t, ch, lb4, b.mac, false, "a claim on the new interface")
}
