package steer

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/egressvip/egressvip/internal/privtest"
	"github.com/egressvip/egressvip/pkg/model"
)

// The privileged tests build a small cluster in network namespaces:
//
//	pod ─ vpod  src ─ eth0 ─┐                     ┌─ eth0 holder ─ eth1 ─┐
//	10.244.1.5  node        │ node network        │  node                │ external network
//	fd00:10:    198.51.100.11, 2001:db8:100::11   198.51.100.12        │ 203.0.113.0/24
//	 244:1::5          eth1 ──────────────────────────────────── ext ─┘ 2001:db8:1::/64
//	                   203.0.113.11 (its own uplink, MASQUERADE)    203.0.113.100
//
// On-link: src and holder on one bridge (br-node in the fabric namespace).
// Routed: a router namespace between them, src in 198.51.100.0/25 and
// 2001:db8:100::/64, the holder in 198.51.100.128/25 and 2001:db8:101::/64:
// the holder is not on-link from src, steering needs the VXLAN device.
//
// Stand-ins for the rest of egressvip: an nft rule in src marks the pod's
// packets to ports 5060 (udp), 8080 and 8081 (tcp) with the steering bit
// (the firewall's job), and src masquerades what leaves by its uplink (the
// CNI's); an nft rule in the holder SNATs the pod to 203.0.113.10 and
// 2001:db8:1::10 (pkg/snat's). Both nodes drop conntrack-invalid forwarded
// packets, as kube-proxy does.

const (
	portUDP  = 5060 // steered
	portTCP  = 8080 // steered
	portSink = 8081 // steered, TCP throughput
	portOwn  = 9000 // not steered: udp and tcp echo
	portOwnS = 9001 // not steered, TCP throughput
	mark     = 0x1000
	service  = "default/sip"
	vxlanDev = "egressvip.vx"
	vni      = 4242
)

var (
	pod4     = netip.MustParseAddr("10.244.1.5")
	pod6     = netip.MustParseAddr("fd00:10:244:1::5")
	ext4     = netip.MustParseAddr("203.0.113.100")
	ext6     = netip.MustParseAddr("2001:db8:1::100")
	lb4      = netip.MustParseAddr("203.0.113.10")
	lb6      = netip.MustParseAddr("2001:db8:1::10")
	srcUp4   = netip.MustParseAddr("203.0.113.11")
	srcUp6   = netip.MustParseAddr("2001:db8:1::11")
	holdExt4 = "203.0.113.2"
	holdExt6 = "2001:db8:1::2"
)

type cluster struct {
	fabric, pod, src, holder *privtest.NS
	ext, rtr                 *privtest.NS
	// Node addresses: src's and the holder's InternalIPs.
	src4, src6, hold4, hold6 netip.Addr
}

func testLog(t testing.TB) *logrus.Entry {
	log := logrus.New()
	log.SetOutput(io.Discard)
	if testing.Verbose() {
		log.SetOutput(t.Output())
		log.SetLevel(logrus.DebugLevel)
	}
	return logrus.NewEntry(log)
}

// newCluster builds the on-link topology, or the routed one.
func newCluster(t testing.TB, routed bool) *cluster {
	t.Helper()
	privtest.Require(t, "nft")
	c := &cluster{fabric: privtest.NewNS(t, "st-fab"), pod: privtest.NewNS(t, "st-pod"), src: privtest.NewNS(t, "st-src"),
		holder: privtest.NewNS(t, "st-hold"), ext: privtest.NewNS(t, "st-ext")}
	f := c.fabric
	f.Exec(t, "ip", "link", "add", "br-ext", "type", "bridge")
	f.Exec(t, "ip", "link", "set", "br-ext", "up")
	port := func(ns *privtest.NS, dev, fabDev, br string) {
		privtest.Veth(t, ns, dev, f, fabDev)
		f.Exec(t, "ip", "link", "set", fabDev, "master", br)
	}
	nodeSysctls := []string{"net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"}

	// The pod: /32 and /128 with a default route through the node, as a
	// CNI (Calico) sets it up.
	privtest.Veth(t, c.pod, "eth0", c.src, "vpod")
	c.pod.Exec(t, "ip", "addr", "add", pod4.String()+"/32", "dev", "eth0")
	c.pod.Exec(t, "ip", "addr", "add", pod6.String()+"/128", "dev", "eth0", "nodad")
	c.pod.Exec(t, "ip", "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
	c.pod.Exec(t, "ip", "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
	c.src.Exec(t, "ip", "addr", "add", "fe80::1/64", "dev", "vpod", "nodad")
	c.pod.Exec(t, "ip", "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0")
	c.src.Exec(t, "sysctl", "-qw", "net.ipv4.conf.vpod.proxy_arp=1")
	c.src.Exec(t, "ip", "route", "add", pod4.String(), "dev", "vpod")
	c.src.Exec(t, "ip", "-6", "route", "add", pod6.String(), "dev", "vpod")
	c.src.Exec(t, append([]string{"sysctl", "-qw"}, nodeSysctls...)...)
	c.holder.Exec(t, append([]string{"sysctl", "-qw"}, nodeSysctls...)...)

	// The external network: the holder's second interface, src's uplink
	// and the external host.
	port(c.holder, "eth1", "hold1", "br-ext")
	port(c.src, "eth1", "src1", "br-ext")
	port(c.ext, "eth0", "ext0", "br-ext")
	c.holder.Exec(t, "ip", "addr", "add", holdExt4+"/24", "dev", "eth1")
	c.holder.Exec(t, "ip", "addr", "add", holdExt6+"/64", "dev", "eth1", "nodad")
	c.holder.Exec(t, "ip", "addr", "add", lb4.String()+"/32", "dev", "eth1")
	c.holder.Exec(t, "ip", "addr", "add", lb6.String()+"/128", "dev", "eth1", "nodad")
	c.src.Exec(t, "ip", "addr", "add", srcUp4.String()+"/24", "dev", "eth1")
	c.src.Exec(t, "ip", "addr", "add", srcUp6.String()+"/64", "dev", "eth1", "nodad")
	c.src.Exec(t, "ip", "route", "add", "default", "via", ext4.String(), "dev", "eth1")
	c.src.Exec(t, "ip", "-6", "route", "add", "default", "via", ext6.String(), "dev", "eth1")
	c.ext.Exec(t, "ip", "addr", "add", ext4.String()+"/24", "dev", "eth0")
	c.ext.Exec(t, "ip", "addr", "add", ext6.String()+"/64", "dev", "eth0", "nodad")

	if !routed {
		f.Exec(t, "ip", "link", "add", "br-node", "type", "bridge")
		f.Exec(t, "ip", "link", "set", "br-node", "up")
		port(c.src, "eth0", "src0", "br-node")
		port(c.holder, "eth0", "hold0", "br-node")
		c.src4, c.src6 = netip.MustParseAddr("198.51.100.11"), netip.MustParseAddr("2001:db8:100::11")
		c.hold4, c.hold6 = netip.MustParseAddr("198.51.100.12"), netip.MustParseAddr("2001:db8:100::12")
		c.src.Exec(t, "ip", "addr", "add", "198.51.100.11/24", "dev", "eth0")
		c.src.Exec(t, "ip", "addr", "add", "2001:db8:100::11/64", "dev", "eth0", "nodad")
		c.holder.Exec(t, "ip", "addr", "add", "198.51.100.12/24", "dev", "eth0")
		c.holder.Exec(t, "ip", "addr", "add", "2001:db8:100::12/64", "dev", "eth0", "nodad")
		// The cluster's pod routing: the pod range of src through src.
		c.holder.Exec(t, "ip", "route", "add", "10.244.1.0/24", "via", "198.51.100.11")
		c.holder.Exec(t, "ip", "-6", "route", "add", "fd00:10:244:1::/64", "via", "2001:db8:100::11")
	} else {
		c.rtr = privtest.NewNS(t, "st-rtr")
		privtest.Veth(t, c.src, "eth0", c.rtr, "r0")
		privtest.Veth(t, c.holder, "eth0", c.rtr, "r1")
		c.rtr.Exec(t, append([]string{"sysctl", "-qw"}, nodeSysctls...)...)
		c.src4, c.src6 = netip.MustParseAddr("198.51.100.11"), netip.MustParseAddr("2001:db8:100::11")
		c.hold4, c.hold6 = netip.MustParseAddr("198.51.100.141"), netip.MustParseAddr("2001:db8:101::141")
		c.rtr.Exec(t, "ip", "addr", "add", "198.51.100.1/25", "dev", "r0")
		c.rtr.Exec(t, "ip", "addr", "add", "2001:db8:100::1/64", "dev", "r0", "nodad")
		c.rtr.Exec(t, "ip", "addr", "add", "198.51.100.129/25", "dev", "r1")
		c.rtr.Exec(t, "ip", "addr", "add", "2001:db8:101::1/64", "dev", "r1", "nodad")
		c.src.Exec(t, "ip", "addr", "add", "198.51.100.11/25", "dev", "eth0")
		c.src.Exec(t, "ip", "addr", "add", "2001:db8:100::11/64", "dev", "eth0", "nodad")
		c.holder.Exec(t, "ip", "addr", "add", "198.51.100.141/25", "dev", "eth0")
		c.holder.Exec(t, "ip", "addr", "add", "2001:db8:101::141/64", "dev", "eth0", "nodad")
		c.src.Exec(t, "ip", "route", "add", "198.51.100.128/25", "via", "198.51.100.1")
		c.src.Exec(t, "ip", "-6", "route", "add", "2001:db8:101::/64", "via", "2001:db8:100::1")
		c.holder.Exec(t, "ip", "route", "add", "198.51.100.0/25", "via", "198.51.100.129")
		c.holder.Exec(t, "ip", "-6", "route", "add", "2001:db8:100::/64", "via", "2001:db8:101::1")
		// Pod routing across the router (BGP or an overlay in a real
		// cluster).
		c.holder.Exec(t, "ip", "route", "add", "10.244.0.0/16", "via", "198.51.100.129")
		c.holder.Exec(t, "ip", "-6", "route", "add", "fd00:10:244::/56", "via", "2001:db8:101::1")
		c.rtr.Exec(t, "ip", "route", "add", "10.244.1.0/24", "via", "198.51.100.11")
		c.rtr.Exec(t, "ip", "-6", "route", "add", "fd00:10:244:1::/64", "via", "2001:db8:100::11")
	}

	// The firewall's marking and the CNI's MASQUERADE in src.
	nft(t, c.src, fmt.Sprintf(`
table inet fw {
	chain mark_steered {
		type filter hook prerouting priority mangle;
		iifname "vpod" meta l4proto { tcp, udp } th dport { %d, %d, %d } meta mark set meta mark | %#x
	}
	chain forwarding {
		type filter hook forward priority filter;
		ct state invalid counter drop
	}
	chain nat_post {
		type nat hook postrouting priority srcnat;
		oifname "eth1" ip saddr 10.244.0.0/16 masquerade
		oifname "eth1" ip6 saddr fd00:10:244::/56 masquerade
	}
}`, portUDP, portTCP, portSink, mark))
	// pkg/snat's SNAT of the steered pod in the holder.
	nft(t, c.holder, fmt.Sprintf(`
table inet egress {
	chain forwarding {
		type filter hook forward priority filter;
		ct state invalid counter drop
	}
	chain nat_post {
		type nat hook postrouting priority srcnat;
		oifname "eth1" ip saddr %s snat ip to %s
		oifname "eth1" ip6 saddr %s snat ip6 to %s
	}
}`, pod4, lb4, pod6, lb6))
	return c
}

func nft(t testing.TB, ns *privtest.NS, ruleset string) {
	t.Helper()
	cmd := ns.Cmd("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(ruleset)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft in %s: %v: %s", ns.Name, err, out)
	}
}

// invalidDrops sums the counters of the "ct state invalid drop" rules.
func invalidDrops(t testing.TB, ns *privtest.NS) string {
	out := ns.Exec(t, "nft", "list", "ruleset")
	var hits []string
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, "ct state invalid") {
			hits = append(hits, strings.TrimSpace(l))
		}
	}
	return strings.Join(hits, "; ")
}

func (c *cluster) manager(t testing.TB, ns *privtest.NS, node string, ifaces ...string) *Manager {
	t.Helper()
	m, err := New(Config{Node: node, Mark: mark, NetNS: ns.Handle, Log: testLog(t).WithField("node", node), Interfaces: ifaces})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	return m
}

// steer is the Routes of src for the pod's two addresses.
func (c *cluster) steer(tunnel bool) []model.SteerRule {
	return []model.SteerRule{
		{Service: service, Pod: pod4, Holder: "holder", Via: []netip.Addr{c.hold4}, Tunnel: tunnel},
		{Service: service, Pod: pod6, Holder: "holder", Via: []netip.Addr{c.hold6}, Tunnel: tunnel},
	}
}

func apply(t testing.TB, m *Manager, r model.Routes) map[string]error {
	t.Helper()
	failed, err := m.Apply(context.Background(), r)
	if err != nil {
		t.Fatalf("Apply: %v", err)
	}
	return failed
}

func mustApply(t testing.TB, m *Manager, r model.Routes) {
	t.Helper()
	if failed := apply(t, m, r); len(failed) != 0 {
		t.Fatalf("Apply failed Services: %v", failed)
	}
}

// servers runs in ext: UDP echo servers on portUDP and portOwn, TCP echo
// servers on portTCP and portOwn, TCP sinks on portSink and portOwnS. The
// echo servers answer "<source address seen> <bytes received>"; a sink
// answers the byte count once the client closed its side.
func (c *cluster) servers(t testing.TB) {
	t.Helper()
	var closers []io.Closer
	var err error
	c.ext.Do(t, func() {
		for _, p := range []int{portUDP, portOwn} {
			var pc net.PacketConn
			if pc, err = net.ListenPacket("udp", fmt.Sprintf(":%d", p)); err != nil {
				return
			}
			closers = append(closers, pc)
			go udpEcho(pc)
		}
		for _, p := range []int{portTCP, portOwn, portSink, portOwnS} {
			var l net.Listener
			if l, err = net.Listen("tcp", fmt.Sprintf(":%d", p)); err != nil {
				return
			}
			closers = append(closers, l)
			go tcpServe(l, p == portSink || p == portOwnS)
		}
	})
	t.Cleanup(func() {
		for _, cl := range closers {
			_ = cl.Close()
		}
	})
	if err != nil {
		t.Fatalf("servers: %v", err)
	}
}

func udpEcho(pc net.PacketConn) {
	buf := make([]byte, 65536)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		src := from.(*net.UDPAddr).AddrPort().Addr().Unmap()
		_, _ = pc.WriteTo([]byte(fmt.Sprintf("%s %d", src, n)), from)
	}
}

func tcpServe(l net.Listener, sink bool) {
	for {
		conn, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer conn.Close()
			if sink {
				n, _ := io.Copy(io.Discard, conn)
				_, _ = fmt.Fprintf(conn, "%d\n", n)
				return
			}
			src := conn.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
			r := bufio.NewReader(conn)
			for {
				line, err := r.ReadString('\n')
				if err != nil {
					return
				}
				if _, err := fmt.Fprintf(conn, "%s %d\n", src, len(line)); err != nil {
					return
				}
			}
		}()
	}
}

// dial opens a connection from the pod.
func (c *cluster) dial(t testing.TB, network string, dst netip.Addr, port int, control func(network, address string, c syscall.RawConn) error) (net.Conn, error) {
	var conn net.Conn
	var err error
	c.pod.Do(t, func() {
		d := net.Dialer{Timeout: 2 * time.Second, Control: control}
		conn, err = d.Dial(network, netip.AddrPortFrom(dst, uint16(port)).String())
	})
	return conn, err
}

// seenFrom sends one message from the pod to ext and returns the source
// address ext saw, from its answer.
func (c *cluster) seenFrom(t testing.TB, network string, dst netip.Addr, port int) (netip.Addr, error) {
	conn, err := c.dial(t, network, dst, port, nil)
	if err != nil {
		return netip.Addr{}, err
	}
	defer conn.Close()
	// UDP may lose the first datagram while neighbours resolve: retry.
	tries := 1
	if network == "udp" {
		tries = 5
	}
	var line string
	for i := range tries {
		_ = conn.SetDeadline(time.Now().Add(time.Duration(i+1) * 400 * time.Millisecond))
		if _, err = conn.Write([]byte("hello\n")); err != nil {
			continue
		}
		buf := make([]byte, 256)
		var n int
		if n, err = conn.Read(buf); err == nil {
			line = string(buf[:n])
			break
		}
	}
	if err != nil {
		return netip.Addr{}, err
	}
	f := strings.Fields(line)
	if len(f) == 0 {
		return netip.Addr{}, fmt.Errorf("empty answer")
	}
	return netip.ParseAddr(f[0])
}

// expectSeen asserts that network (udp, tcp) from the pod to dst:port
// arrives from want and gets answered.
func (c *cluster) expectSeen(t testing.TB, network string, dst netip.Addr, port int, want netip.Addr) {
	t.Helper()
	got, err := c.seenFrom(t, network, dst, port)
	if err != nil {
		t.Fatalf("%s from the pod to [%s]:%d: %v", network, dst, port, err)
	}
	if got != want {
		t.Fatalf("%s from the pod to [%s]:%d arrived from %s, want %s", network, dst, port, got, want)
	}
	t.Logf("%s pod -> [%s]:%d: ext saw %s (answered)", network, dst, port, got)
}

// steered checks both families and protocols: the steered ports leave
// with the holder's address, the others by src's uplink.
func (c *cluster) steered(t testing.TB) {
	t.Helper()
	for _, fam := range []struct{ ext, lb, up netip.Addr }{{ext4, lb4, srcUp4}, {ext6, lb6, srcUp6}} {
		c.expectSeen(t, "udp", fam.ext, portUDP, fam.lb)
		c.expectSeen(t, "tcp", fam.ext, portTCP, fam.lb)
		c.expectSeen(t, "udp", fam.ext, portOwn, fam.up)
		c.expectSeen(t, "tcp", fam.ext, portOwn, fam.up)
	}
}

// guardCount counts egressvip's guard rules in ns.
func guardCount(t testing.TB, m *Manager) int {
	t.Helper()
	rs, _, err := m.ownedRuleKeys()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for k, c := range rs {
		if k.local || k.blackhole {
			n += c
		}
	}
	return n
}

// dropped checks that the steered ports' traffic goes nowhere: marked, and
// no pod's rule takes it.
func (c *cluster) dropped(t testing.TB) {
	t.Helper()
	for _, ext := range []netip.Addr{ext4, ext6} {
		for _, network := range []string{"udp", "tcp"} {
			port := portUDP
			if network == "tcp" {
				port = portTCP
			}
			if got, err := c.seenFrom(t, network, ext, port); err == nil {
				t.Fatalf("%s from the pod to [%s]:%d arrived from %s, want it dropped", network, ext, port, got)
			}
		}
	}
}

// unsteered checks that every port leaves by src's uplink.
func (c *cluster) unsteered(t testing.TB) {
	t.Helper()
	for _, fam := range []struct{ ext, up netip.Addr }{{ext4, srcUp4}, {ext6, srcUp6}} {
		c.expectSeen(t, "udp", fam.ext, portUDP, fam.up)
		c.expectSeen(t, "tcp", fam.ext, portTCP, fam.up)
	}
}

// kernelView prints what ip(8) shows of egressvip's objects in ns.
func kernelView(t testing.TB, ns *privtest.NS, tables ...int) string {
	var b strings.Builder
	for _, args := range [][]string{{"ip", "rule"}, {"ip", "-6", "rule"}} {
		fmt.Fprintf(&b, "$ %s\n%s", strings.Join(args, " "), ns.Exec(t, args...))
	}
	for _, tb := range tables {
		for _, f := range []string{"-4", "-6"} {
			args := []string{"ip", f, "route", "show", "table", fmt.Sprint(tb)}
			if out, err := ns.Try(args...); err == nil && out != "" {
				fmt.Fprintf(&b, "$ %s\n%s", strings.Join(args, " "), out)
			}
		}
	}
	return b.String()
}

// ownedCount counts egressvip's rules of steered pods and its routes in
// ns.
func ownedCount(t testing.TB, m *Manager) (rules, routes int) {
	t.Helper()
	rs, odd, err := m.ownedRuleKeys()
	if err != nil || odd {
		t.Fatal(err, odd)
	}
	for k, n := range rs {
		if !k.local && !k.blackhole {
			rules += n
		}
	}
	rt, err := m.ownedRoutes()
	if err != nil {
		t.Fatal(err)
	}
	return rules, len(rt)
}

var errVanished = errors.New("vanished: neither answered nor refused")

// bigDatagram sends one UDP datagram of payload bytes with DF from the pod
// to ext's echo port and says what became of it: "arrived" (ext answered),
// "frag-needed, path MTU N" (the pod got ICMP frag-needed / packet too big,
// its socket reports EMSGSIZE and the path MTU), or errVanished.
func (c *cluster) bigDatagram(t testing.TB, dst netip.Addr, payload int) (string, error) {
	ctl := func(network, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			if dst.Is4() {
				serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IP, syscall.IP_MTU_DISCOVER, syscall.IP_PMTUDISC_DO)
			} else {
				serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IPV6, syscall.IPV6_MTU_DISCOVER, syscall.IP_PMTUDISC_DO)
			}
		})
		return errors.Join(err, serr)
	}
	conn, err := c.dial(t, "udp", dst, portUDP, ctl)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	// Resolve neighbours and conntrack with a small datagram first.
	if got, err := c.seenFrom(t, "udp", dst, portUDP); err != nil {
		return "", fmt.Errorf("small datagram first: %w (%v)", err, got)
	}
	msg := make([]byte, payload)
	result := ""
	for i := 0; i < 3 && result == ""; i++ {
		_ = conn.SetDeadline(time.Now().Add(time.Second))
		if _, err := conn.Write(msg); err != nil {
			if errors.Is(err, syscall.EMSGSIZE) {
				result = "frag-needed, path MTU " + pathMTU(conn, dst)
				break
			}
			return "", err
		}
		buf := make([]byte, 256)
		n, err := conn.Read(buf)
		switch {
		case err == nil:
			result = "arrived: " + string(buf[:n])
		case errors.Is(err, syscall.EMSGSIZE):
			result = "frag-needed, path MTU " + pathMTU(conn, dst)
		}
	}
	if result == "" {
		return "", errVanished
	}
	return result, nil
}

func pathMTU(conn net.Conn, dst netip.Addr) string {
	rc, err := conn.(*net.UDPConn).SyscallConn()
	if err != nil {
		return "?"
	}
	mtu := -1
	_ = rc.Control(func(fd uintptr) {
		if dst.Is4() {
			mtu, _ = syscall.GetsockoptInt(int(fd), syscall.IPPROTO_IP, syscall.IP_MTU)
		} else {
			mtu, _ = syscall.GetsockoptInt(int(fd), syscall.IPPROTO_IPV6, syscall.IPV6_MTU)
		}
	})
	return fmt.Sprint(mtu)
}
