package steer

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/egressvip/egressvip/pkg/model"
)

// TestPrivilegedSteerOnLink: src and holder on one bridge. The pod's
// marked packets leave with the holder's address and get answered through
// the holder; unmarked ones take src's own uplink; Apply is idempotent and
// survives a restart; stale objects go and foreign ones stay.
func TestPrivilegedSteerOnLink(t *testing.T) {
	c := newCluster(t, false)
	c.servers(t)
	m := c.manager(t, c.src, "src")

	// Before steering everything leaves by src's uplink.
	c.unsteered(t)

	// Foreign objects in the table range and at the priority: never touched.
	c.src.Exec(t, "ip", "rule", "add", "priority", "31000", "from", "10.244.1.99", "fwmark", "0x1000/0x1000", "lookup", "59136")
	c.src.Exec(t, "ip", "route", "add", "192.0.2.0/24", "via", "198.51.100.1", "dev", "eth0", "table", "59999", "proto", "static")

	// A second Service whose holder is not on-link fails alone.
	unreachable := model.SteerRule{Service: "default/far", Pod: netip.MustParseAddr("fd00:10:244:1::77"),
		Holder: "far", Via: []netip.Addr{netip.MustParseAddr("2001:db8:ffff::1")}}
	r := model.Routes{Steer: append(c.steer(false), unreachable)}
	failed := apply(t, m, r)
	if len(failed) != 1 || failed["default/far"] == nil {
		t.Fatalf("failed = %v, want only default/far", failed)
	}
	msg := failed["default/far"].Error()
	t.Logf("default/far: %s", msg)
	for _, want := range []string{"holder far (2001:db8:ffff::1) is not on-link from src", "via 2001:db8:1::100 dev eth1", "enable VXLAN mode"} {
		if !strings.Contains(msg, want) {
			t.Errorf("message %q lacks %q", msg, want)
		}
	}
	t.Logf("kernel objects in src:\n%s", kernelView(t, c.src, DefaultTableMin, DefaultTableMin+1))
	// Each table: the hop's route and the unreachable fallback.
	if rules, routes := ownedCount(t, m); rules != 2 || routes != 4 {
		t.Fatalf("owned rules/routes = %d/%d, want 2/4", rules, routes)
	}
	if n := guardCount(t, m); n != 4 {
		t.Fatalf("guard rules = %d, want 4 (two per family)", n)
	}

	c.steered(t)

	// Idempotent: nothing to write the second time, nor for a new process.
	m.writes = 0
	apply(t, m, r)
	if m.writes != 0 {
		t.Errorf("second Apply wrote %d times, want 0", m.writes)
	}
	m2 := c.manager(t, c.src, "src")
	apply(t, m2, r)
	if m2.writes != 0 {
		t.Errorf("Apply of a restarted daemon wrote %d times, want 0", m2.writes)
	}

	// Only IPv6 steered: the IPv4 rule and table go.
	mustApply(t, m2, model.Routes{Steer: c.steer(false)[1:]})
	if rules, routes := ownedCount(t, m2); rules != 1 || routes != 2 {
		t.Fatalf("owned rules/routes = %d/%d, want 1/2", rules, routes)
	}
	// The test's firewall still marks the IPv4 packets: with no rule
	// for them, the guard drops them.
	if got, err := c.seenFrom(t, "udp", ext4, portUDP); err == nil {
		t.Errorf("marked IPv4 packets with no pod rule arrived from %s, want them dropped", got)
	}
	c.expectSeen(t, "udp", ext6, portUDP, lb6)

	if err := m2.Cleanup(context.Background()); err != nil {
		t.Fatal(err)
	}
	if rules, routes := ownedCount(t, m2); rules != 0 || routes != 0 || guardCount(t, m2) != 0 {
		t.Fatalf("after Cleanup owned rules/routes = %d/%d, guards %d", rules, routes, guardCount(t, m2))
	}
	c.unsteered(t)
	if out := c.src.Exec(t, "ip", "rule"); !strings.Contains(out, "from 10.244.1.99 fwmark 0x1000/0x1000 lookup 59136") {
		t.Errorf("foreign rule removed:\n%s", out)
	}
	if out := c.src.Exec(t, "ip", "route", "show", "table", "59999"); !strings.Contains(out, "192.0.2.0/24") {
		t.Errorf("foreign route removed: %q", out)
	}
	t.Logf("conntrack-invalid drops: src %s; holder %s", invalidDrops(t, c.src), invalidDrops(t, c.holder))
}

// tunnels returns the Tunnel of src and of the holder for VXLAN mode.
func (c *cluster) tunnels(srcMAC, holdMAC string) (src, hold *model.Tunnel) {
	src = &model.Tunnel{VNI: vni, Port: 4789, Device: vxlanDev, Local: c.src4,
		Peers: []model.TunnelPeer{{Node: "holder", Underlay: c.hold4, MAC: holdMAC, Inner: []netip.Addr{c.hold4, c.hold6}}}}
	hold = &model.Tunnel{VNI: vni, Port: 4789, Device: vxlanDev, Local: c.hold4,
		Peers: []model.TunnelPeer{{Node: "src", Underlay: c.src4, MAC: srcMAC, Inner: []netip.Addr{c.src4, c.src6}}}}
	return src, hold
}

// TestPrivilegedSteerVXLAN: src and holder on different subnets, a router
// between them. Without the tunnel the Service fails with a message that
// says what to do, and its marked traffic is dropped; through the tunnel it
// leaves with the holder's address. Large datagrams with DF get ICMP
// frag-needed back.
func TestPrivilegedSteerVXLAN(t *testing.T) {
	c := newCluster(t, true)
	c.servers(t)
	ms := c.manager(t, c.src, "src")
	mh := c.manager(t, c.holder, "holder", "eth0")

	failed := apply(t, ms, model.Routes{Steer: c.steer(false)})
	if len(failed) != 1 || failed[service] == nil {
		t.Fatalf("failed = %v, want %s", failed, service)
	}
	msg := failed[service].Error()
	t.Logf("%s without the tunnel: %s", service, msg)
	for _, want := range []string{"holder holder (198.51.100.141) is not on-link from src", "via 198.51.100.1 dev eth0", "enable VXLAN mode",
		"holder holder (2001:db8:101::141) is not on-link from src"} {
		if !strings.Contains(msg, want) {
			t.Errorf("message %q lacks %q", msg, want)
		}
	}
	// The firewall marks the pod's packets, no rule takes them: dropped,
	// never sent unsteered.
	c.dropped(t)

	ts, th := c.tunnels(ms.TunnelMAC().String(), mh.TunnelMAC().String())
	mustApply(t, mh, model.Routes{Tunnel: th})
	mustApply(t, ms, model.Routes{Steer: c.steer(true), Tunnel: ts})
	t.Logf("kernel objects in src:\n%s$ ip -d link show %s\n%s$ bridge fdb show dev %s\n%s$ ip neigh show dev %s\n%s",
		kernelView(t, c.src, DefaultTableMin, DefaultTableMin+1),
		vxlanDev, c.src.Exec(t, "ip", "-d", "link", "show", vxlanDev),
		vxlanDev, c.src.Exec(t, "bridge", "fdb", "show", "dev", vxlanDev),
		vxlanDev, c.src.Exec(t, "ip", "neigh", "show", "dev", vxlanDev))
	c.steered(t)

	for _, tc := range []struct {
		dst     netip.Addr
		payload int
	}{{ext4, 1472}, {ext4, 1422}, {ext6, 1452}, {ext6, 1402}} {
		res, err := c.bigDatagram(t, tc.dst, tc.payload)
		if err != nil {
			t.Fatalf("%d-byte UDP payload with DF to %s through the tunnel: %v", tc.payload, tc.dst, err)
		}
		t.Logf("MTU: %d-byte UDP payload with DF to %s through the tunnel: %s", tc.payload, tc.dst, res)
	}

	// On the holder, steered packets arrive on the VXLAN device while the
	// route back to the pod leaves by eth0: rp_filter 0 on the device is
	// what makes it work, and an "all" of 1 (the kernel takes the maximum)
	// breaks it.
	expectNoFindings(t, mh)
	c.holder.Exec(t, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1")
	c.expectDropped(t, ext4)
	expectFinding(t, mh, "net.ipv4.conf.all.rp_filter", "arrive on egressvip.vx")
	c.holder.Exec(t, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=2")
	c.expectSeen(t, "tcp", ext4, portTCP, lb4)
	c.holder.Exec(t, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0")
	// IPv6 forwarding off on the holder: dropped, although the device
	// forwards (its per-device forwarding, even force_forwarding of Linux
	// 6.17, would not do: the replies arrive on the external interface).
	c.holder.Exec(t, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=0")
	c.holder.Exec(t, "sysctl", "-qw", "net.ipv6.conf."+strings.ReplaceAll(vxlanDev, ".", "/")+".force_forwarding=1")
	c.expectDropped(t, ext6)
	expectFinding(t, mh, "net.ipv6.conf.all.forwarding", "set net.ipv6.conf.all.forwarding=1")
	c.holder.Exec(t, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
	c.expectSeen(t, "tcp", ext6, portTCP, lb6)

	// A restarted daemon derives the same MAC and rewrites nothing.
	ms2 := c.manager(t, c.src, "src")
	if ms2.TunnelMAC().String() != ms.TunnelMAC().String() {
		t.Fatalf("tunnel MAC changed across restarts: %s, %s", ms.TunnelMAC(), ms2.TunnelMAC())
	}
	mustApply(t, ms2, model.Routes{Steer: c.steer(true), Tunnel: ts})
	if ms2.writes != 0 {
		t.Errorf("Apply of a restarted daemon wrote %d times, want 0", ms2.writes)
	}
	t.Logf("conntrack-invalid drops: src %s; holder %s", invalidDrops(t, c.src), invalidDrops(t, c.holder))

	// Another device name: the old device goes, the new one steers.
	renamed := *ts
	renamed.Device = "evip.vx2"
	mustApply(t, ms2, model.Routes{Steer: c.steer(true), Tunnel: &renamed})
	if out, err := c.src.Try("ip", "link", "show", vxlanDev); err == nil {
		t.Fatalf("old device still there: %s", out)
	}
	c.expectSeen(t, "udp", ext4, portUDP, lb4)
	c.expectSeen(t, "tcp", ext6, portTCP, lb6)

	// VXLAN mode off: the device goes, and with it the steering.
	failed = apply(t, ms2, model.Routes{Steer: c.steer(true)})
	if failed[service] == nil || !strings.Contains(failed[service].Error(), "VXLAN mode is off") {
		t.Fatalf("failed = %v", failed)
	}
	if out, err := c.src.Try("ip", "link", "show", renamed.Device); err == nil {
		t.Fatalf("device still there: %s", out)
	}
	if rules, routes := ownedCount(t, ms2); rules != 0 || routes != 0 {
		t.Fatalf("owned rules/routes = %d/%d, want 0/0", rules, routes)
	}
	c.dropped(t)
	if err := mh.Cleanup(context.Background()); err != nil {
		t.Fatal(err)
	}
	if out, err := c.holder.Try("ip", "link", "show", vxlanDev); err == nil {
		t.Fatalf("device still there after Cleanup: %s", out)
	}
}

// expectDropped asserts that TCP from the pod to dst on the steered port
// gets no answer.
func (c *cluster) expectDropped(t testing.TB, dst netip.Addr) {
	t.Helper()
	if got, err := c.seenFrom(t, "tcp", dst, portTCP); err == nil {
		t.Fatalf("tcp from the pod to %s answered (from %s), want it dropped", dst, got)
	}
}

// finding returns the finding of setting, if any.
func finding(fs []Finding, setting string) (Finding, bool) {
	for _, f := range fs {
		if f.Setting == setting {
			return f, true
		}
	}
	return Finding{}, false
}

func expectFinding(t testing.TB, m *Manager, setting, mention string) {
	t.Helper()
	fs := m.Diagnose()
	f, ok := finding(fs, setting)
	if !ok {
		t.Fatalf("Diagnose lacks %s: %v", setting, fs)
	}
	if !strings.Contains(f.String(), mention) {
		t.Fatalf("finding %q does not mention %q", f, mention)
	}
	t.Logf("finding: %s", f)
}

func expectNoFindings(t testing.TB, m *Manager) {
	t.Helper()
	if fs := m.Diagnose(); len(fs) != 0 {
		t.Fatalf("Diagnose = %v, want nothing", fs)
	}
}

// TestPrivilegedSteerDiagnose breaks the host settings Diagnose knows
// about one at a time, and checks with packets that each one drops steered
// traffic and with Diagnose that it is reported.
func TestPrivilegedSteerDiagnose(t *testing.T) {
	c := newCluster(t, false)
	c.servers(t)
	ms := c.manager(t, c.src, "src")
	mh := c.manager(t, c.holder, "holder", "eth0")
	mustApply(t, ms, model.Routes{Steer: c.steer(false)})
	mustApply(t, mh, model.Routes{})
	expectNoFindings(t, ms)
	expectNoFindings(t, mh)
	c.expectSeen(t, "tcp", ext4, portTCP, lb4)

	// Strict rp_filter where the replies come back to src: the route to
	// ext leaves by src's uplink.
	c.src.Exec(t, "sysctl", "-qw", "net.ipv4.conf.eth0.rp_filter=1")
	c.expectDropped(t, ext4)
	expectFinding(t, ms, "net.ipv4.conf.eth0.rp_filter", "replies to this node's steered pods come back from the holder on eth0")
	c.src.Exec(t, "sysctl", "-qw", "net.ipv4.conf.eth0.rp_filter=2")
	c.expectSeen(t, "tcp", ext4, portTCP, lb4)
	expectNoFindings(t, ms)
	// The same through "all" (the kernel applies the maximum).
	c.src.Exec(t, "sysctl", "-qw", "net.ipv4.conf.eth0.rp_filter=0", "net.ipv4.conf.all.rp_filter=1")
	c.expectDropped(t, ext4)
	expectFinding(t, ms, "net.ipv4.conf.all.rp_filter", "maximum of all and eth0")
	c.src.Exec(t, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0")

	// Forwarding off on the holder.
	c.holder.Exec(t, "sysctl", "-qw", "net.ipv4.ip_forward=0")
	c.expectDropped(t, ext4)
	expectFinding(t, mh, "net.ipv4.ip_forward", "set net.ipv4.ip_forward=1")
	c.holder.Exec(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	c.holder.Exec(t, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=0")
	c.expectDropped(t, ext6)
	expectFinding(t, mh, "net.ipv6.conf.all.forwarding", "set net.ipv6.conf.all.forwarding=1")
	c.holder.Exec(t, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
	// Forwarding off only on the interface where steered packets arrive.
	c.holder.Exec(t, "sysctl", "-qw", "net.ipv4.conf.eth0.forwarding=0")
	c.expectDropped(t, ext4)
	expectFinding(t, mh, "net.ipv4.conf.eth0.forwarding", "set net.ipv4.conf.eth0.forwarding=1")
	c.holder.Exec(t, "sysctl", "-qw", "net.ipv4.conf.eth0.forwarding=1")

	c.steered(t)
	expectNoFindings(t, ms)
	expectNoFindings(t, mh)
}

// bulk sends n bytes over TCP from the pod to the sink on port and checks
// that all of them arrived.
func (c *cluster) bulk(t testing.TB, dst netip.Addr, port int, n int) {
	t.Helper()
	conn, err := c.dial(t, "tcp", dst, port, nil)
	if err != nil {
		t.Fatalf("dial [%s]:%d: %v", dst, port, err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 64<<10)
	for i := range buf {
		buf[i] = byte(i)
	}
	for sent := 0; sent < n; sent += len(buf) {
		if _, err := conn.Write(buf); err != nil {
			t.Fatalf("send to [%s]:%d: %v", dst, port, err)
		}
	}
	_ = conn.(*net.TCPConn).CloseWrite()
	reply, err := io.ReadAll(conn)
	if err != nil {
		t.Fatalf("sink answer: %v", err)
	}
	want := (n + len(buf) - 1) / len(buf) * len(buf)
	if strings.TrimSpace(string(reply)) != fmt.Sprint(want) {
		t.Fatalf("sink got %q bytes, want %d", strings.TrimSpace(string(reply)), want)
	}
}

// TestPrivilegedSteerChecksums sends TCP and UDP through the VXLAN tunnel
// and the holder's SNAT and verifies the checksums of what arrives at the
// router (the encapsulated packets) and at the external host: first with
// the offloads of veth and VXLAN as they are (the checksum is then left to
// a NIC that does not exist), then with transmit checksum offload off on
// the interfaces where a real NIC would compute it (src's underlay, the
// holder's external interface), then also on the VXLAN device (flannel's
// workaround).
func TestPrivilegedSteerChecksums(t *testing.T) {
	c := newCluster(t, true)
	c.servers(t)
	ms := c.manager(t, c.src, "src")
	mh := c.manager(t, c.holder, "holder")
	ts, th := c.tunnels(ms.TunnelMAC().String(), mh.TunnelMAC().String())
	mustApply(t, mh, model.Routes{Tunnel: th})
	mustApply(t, ms, model.Routes{Steer: c.steer(true), Tunnel: ts})
	c.steered(t)

	run := func(name string) {
		atRouter := startCapture(t, c.rtr, "r0")
		atExt := startCapture(t, c.ext, "eth0")
		for _, dst := range []netip.Addr{ext4, ext6} {
			c.bulk(t, dst, portSink, 4<<20)
			for range 20 {
				c.expectSeen(t, "udp", dst, portUDP, map[bool]netip.Addr{true: lb4, false: lb6}[dst.Is4()])
			}
		}
		r, e := atRouter.finish(), atExt.finish()
		t.Logf("%s: at the router: %s", name, r)
		t.Logf("%s: at ext: %s", name, e)
		if r.bad != 0 || e.bad != 0 {
			t.Errorf("%s: wrong checksums", name)
		}
		if r.vxlan == 0 {
			t.Errorf("%s: no VXLAN packets seen at the router", name)
		}
	}
	run("default offloads")
	if setTxChecksum(t, c.src, "eth0", false) || setTxChecksum(t, c.holder, "eth1", false) {
		t.Fatal("tx checksumming still on")
	}
	run("tx checksum offload off on src eth0 and holder eth1")
	if setTxChecksum(t, c.src, vxlanDev, false) || setTxChecksum(t, c.holder, vxlanDev, false) {
		t.Fatal("tx checksumming still on")
	}
	run("also off on egressvip.vx")
}

// TestPrivilegedSteerLostHopRouteDropsInsteadOfLeaking: when a table's
// route to the holder goes (its device went down or away), steered packets
// hit the table's unreachable fallback: dropped, never sent on to the main
// table and out with the node's address; the next Apply restores the
// route.
func TestPrivilegedSteerLostHopRouteDropsInsteadOfLeaking(t *testing.T) {
	c := newCluster(t, false)
	c.servers(t)
	m := c.manager(t, c.src, "src")
	r := model.Routes{Steer: c.steer(false)}
	mustApply(t, m, r)
	c.steered(t)
	// The kernel drops a route whose device goes down; deleting it by
	// hand leaves the table exactly so.
	c.src.Exec(t, "ip", "route", "del", "default", "via", "198.51.100.12", "table", fmt.Sprint(DefaultTableMin))
	got, err := c.seenFrom(t, "udp", ext4, portUDP)
	if err == nil {
		t.Fatalf("a steered datagram left although its holder is unreachable, ext saw %s", got)
	}
	if got, err := c.seenFrom(t, "tcp", ext4, portTCP); err == nil {
		t.Fatalf("a steered connection left although its holder is unreachable, ext saw %s", got)
	}
	t.Logf("with the hop route gone: %v", err)
	mustApply(t, m, r)
	c.expectSeen(t, "udp", ext4, portUDP, lb4)
}
