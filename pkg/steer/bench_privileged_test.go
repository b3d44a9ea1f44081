package steer

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/egressvip/egressvip/internal/privtest"
	"github.com/egressvip/egressvip/pkg/model"
)

// BenchmarkPrivilegedSteer measures what steering costs, in the topologies
// of the privileged tests (their own network namespaces, deleted
// afterwards; skipped unless root):
//   - rtt: the round trip of one UDP datagram from the pod to the external
//     host's echo server and back, over an established flow: "local" leaves
//     by src's own uplink, "steered" goes pod -> src -> holder (SNAT) ->
//     ext and back the same way; "extra" is the difference of the medians,
//     the cost of the extra hop. ns/op is the mean of both.
//   - tcp: one TCP stream from the pod to a sink on the external host,
//     64 KiB writes (MB/s).
//
// "onlink" has src and holder on one bridge; "vxlan" a router between them
// and egressvip's VXLAN device.
func BenchmarkPrivilegedSteer(b *testing.B) {
	for _, topo := range []string{"onlink", "vxlan"} {
		b.Run(topo, func(b *testing.B) {
			c := newCluster(b, topo == "vxlan")
			c.servers(b)
			ms := c.manager(b, c.src, "src")
			if topo == "vxlan" {
				mh := c.manager(b, c.holder, "holder")
				ts, th := c.tunnels(ms.TunnelMAC().String(), mh.TunnelMAC().String())
				mustApply(b, mh, model.Routes{Tunnel: th})
				mustApply(b, ms, model.Routes{Steer: c.steer(true), Tunnel: ts})
			} else {
				mustApply(b, ms, model.Routes{Steer: c.steer(false)})
			}
			b.Run("rtt", func(b *testing.B) { c.benchRTT(b, ext4) })
			for _, path := range []struct {
				name string
				port int
			}{{"local", portOwnS}, {"steered", portSink}} {
				b.Run("tcp/"+path.name, func(b *testing.B) { c.benchTCP(b, ext4, path.port) })
			}
		})
	}
}

func us(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }

// benchRTT measures the round trip of a UDP datagram from the pod to ext's
// echo servers, alternating between a local flow (src's uplink) and a
// steered one, so that the load of the machine weighs on both alike. It
// reports the medians and their difference, the cost of the extra hop.
func (c *cluster) benchRTT(b *testing.B, dst netip.Addr) {
	var conns [2]net.Conn
	for i, port := range []int{portOwn, portUDP} {
		conn, err := c.dial(b, "udp", dst, port, nil)
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close()
		conns[i] = conn
	}
	msg := []byte("ping")
	buf := make([]byte, 128)
	// Warm the flows up: neighbours, conntrack, routes.
	for _, conn := range conns {
		for i := 0; ; i++ {
			_ = conn.SetDeadline(time.Now().Add(500 * time.Millisecond))
			if _, err := conn.Write(msg); err == nil {
				if _, err = conn.Read(buf); err == nil {
					break
				}
			}
			if i == 5 {
				b.Fatalf("no answer from %s", conn.RemoteAddr())
			}
		}
		_ = conn.SetDeadline(time.Now().Add(time.Minute))
	}
	samples := [2][]time.Duration{make([]time.Duration, 0, b.N), make([]time.Duration, 0, b.N)}
	b.ResetTimer()
	for i := range b.N {
		k := i % 2
		start := time.Now()
		if _, err := conns[k].Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := conns[k].Read(buf); err != nil {
			b.Fatal(err)
		}
		samples[k] = append(samples[k], time.Since(start))
	}
	b.StopTimer()
	if b.N < 2 {
		return
	}
	local, steered := median(samples[0]), median(samples[1])
	b.ReportMetric(us(local), "µs-local/rtt")
	b.ReportMetric(us(steered), "µs-steered/rtt")
	b.ReportMetric(us(steered-local), "µs-extra/rtt")
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

// benchTCP streams b.N times 64 KiB from the pod to ext's sink on port.
func (c *cluster) benchTCP(b *testing.B, dst netip.Addr, port int) {
	conn, err := c.dial(b, "tcp", dst, port, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	chunk := make([]byte, 64<<10)
	b.SetBytes(int64(len(chunk)))
	_ = conn.SetDeadline(time.Now().Add(time.Minute))
	b.ResetTimer()
	for range b.N {
		if _, err := conn.Write(chunk); err != nil {
			b.Fatal(err)
		}
	}
	_ = conn.(*net.TCPConn).CloseWrite()
	reply, err := io.ReadAll(conn)
	b.StopTimer()
	if err != nil {
		b.Fatal(err)
	}
	if got, want := strings.TrimSpace(string(reply)), fmt.Sprint(b.N*len(chunk)); got != want {
		b.Fatalf("sink received %s bytes, want %s", got, want)
	}
}

// BenchmarkPrivilegedSteerApply: an Apply that changes nothing, with 300
// steered pods of each family (600 rules, 6 tables): two dumps (rules,
// egressvip's routes) and three route lookups.
func BenchmarkPrivilegedSteerApply(b *testing.B) {
	privtest.Require(b)
	node, peer := privtest.NewNS(b, "st-node"), privtest.NewNS(b, "st-peer")
	privtest.Veth(b, node, "eth0", peer, "eth0")
	node.Exec(b, "ip", "addr", "add", "198.51.100.11/24", "dev", "eth0")
	node.Exec(b, "ip", "addr", "add", "2001:db8:100::11/64", "dev", "eth0", "nodad")
	m, err := New(Config{Node: "node-x", NetNS: node.Handle, Log: testLog(b)})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	r := scaleRoutes(300, 0)
	mustApply(b, m, r)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		mustApply(b, m, r)
	}
	b.StopTimer()
	// 600 rules, 6 tables of two routes, 4 guard rules.
	if m.writes != 616 {
		b.Fatalf("%d writes, want only the first Apply's 616", m.writes)
	}
}
