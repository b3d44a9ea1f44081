package snat

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/egressvip/egressvip/pkg/model"
	"github.com/vishvananda/netlink"
)

// The privileged benchmarks run each backend side by side on a node with
// benchRules egress rules, in the topology of the privileged tests (their
// own network namespaces, deleted afterwards). They skip unless root.
const benchRules = 5000

// benchDesired is a node with benchRules egress rules: one per pod, every
// fourth one port-filtered, and the topology's pod (10.244.1.5) last: the
// other pods (10.200.0.0/16) sort before it, so its rule is the last of
// the iptables chain, which a new connection of that pod walks entirely.
func benchDesired() model.Datapath { return benchDesiredN(benchRules, false) }

// benchDesiredN is benchDesired with n rules; with prefixes, every rule
// has its own Allow and Deny prefixes (a clause chain per Service), which
// let the topology's destination pass.
func benchDesiredN(n int, withPrefixes bool) model.Datapath {
	d := model.Datapath{Exclude: excludeAll, Fenced: []netip.Addr{lb4}}
	prefixed := model.Filter{Allow: prefixes("203.0.113.0/24"), Deny: prefixes("203.0.113.128/25")}
	for i := range n - 1 {
		r := model.SNATRule{
			Service: fmt.Sprintf("ns-%d/svc-%d", i%100, i),
			Pod:     netip.AddrFrom4([4]byte{10, 200, byte(i / 250), byte(1 + i%250)}),
			Source:  netip.AddrFrom4([4]byte{198, 51, 100, byte(1 + i%250)}),
		}
		switch {
		case withPrefixes:
			r.Filter = prefixed
		case i%4 == 0:
			r.Filter = ports(udp5060, tcp8080)
		}
		d.SNAT = append(d.SNAT, r)
	}
	last := model.SNATRule{Service: "default/sip", Pod: pod4, Source: lb4}
	if withPrefixes {
		last.Filter = prefixed
	}
	d.SNAT = append(d.SNAT, last)
	return d
}

func benchTopo(b *testing.B, bc backendCase, rules int, withPrefixes bool) (*topo, *Manager) {
	b.Helper()
	requireBackend(b, bc)
	tp := newTopo(b, bc)
	m := tp.manager(b, nil)
	tp.apply(b, m, benchDesiredN(rules, withPrefixes))
	return tp, m
}

// BenchmarkPrivilegedNewConnections measures what a new connection costs
// on a node with 5,000 egress rules (and with only the pod's own rule, the
// baseline): the pod sends one UDP datagram from a source port without a
// conntrack entry (so the node walks its nat postrouting hook for it) to the
// external namespace, which answers; ns/op is that round trip, conns/s its
// inverse. "prefixes" gives every rule Allow and Deny prefixes. The iptables
// chains are walked rule by rule; the nftables table costs a few set and
// map lookups (and, with prefixes, the pod's clause chain).
func BenchmarkPrivilegedNewConnections(b *testing.B) {
	const pool = 1000
	for _, bc := range backendCases {
		for _, filter := range []string{"ports", "prefixes"} {
			for _, rules := range []int{benchRules, 1} {
				b.Run(fmt.Sprintf("%s/%s/rules=%d", bc.name, filter, rules), func(b *testing.B) {
					benchNewConnections(b, bc, rules, filter == "prefixes", pool)
				})
			}
		}
	}
}

func benchNewConnections(b *testing.B, bc backendCase, rules int, withPrefixes bool, pool int) {
	tp, _ := benchTopo(b, bc, rules, withPrefixes)
	h, err := netlink.NewHandleAt(tp.node.Handle)
	if err != nil {
		b.Fatal(err)
	}
	defer h.Close()
	// Sockets belong to the namespace they were made in, whatever
	// thread uses them later.
	var conns []*net.UDPConn
	tp.pod.Do(b, func() {
		for i := range pool {
			var c *net.UDPConn
			if c, err = net.ListenUDP("udp4", &net.UDPAddr{IP: pod4.AsSlice(), Port: 20000 + i}); err != nil {
				return
			}
			conns = append(conns, c)
		}
	})
	defer func() {
		for _, c := range conns {
			_ = c.Close()
		}
	}()
	if err != nil {
		b.Fatal(err)
	}
	dst := net.UDPAddrFromAddrPort(netip.AddrPortFrom(extSrv4, 5060))
	msg, buf := []byte("?"), make([]byte, 64)
	roundTrip := func(c *net.UDPConn) (string, error) {
		if _, err := c.WriteToUDP(msg, dst); err != nil {
			return "", err
		}
		_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
		n, _, err := c.ReadFromUDP(buf)
		return string(buf[:n]), err
	}
	if got, err := roundTrip(conns[0]); err != nil || got != lb4.String() {
		b.Fatalf("setup: reply %q, %v; want source %s", got, err, lb4)
	}
	flush := func() {
		if err := h.ConntrackTableFlush(netlink.ConntrackTable); err != nil {
			b.Fatal(err)
		}
	}
	flush()
	i := 0
	for b.Loop() {
		if i == len(conns) {
			b.StopTimer()
			flush() // every socket starts a new connection again
			i = 0
			b.StartTimer()
		}
		if _, err := roundTrip(conns[i]); err != nil {
			b.Fatalf("datagram %d: %v", i, err)
		}
		i++
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "conns/s")
	if got, err := roundTrip(conns[0]); err != nil || got != lb4.String() {
		b.Errorf("after the run: reply %q, %v; want source %s", got, err, lb4)
	}
}

// childCPU returns the user and system CPU time of the process's waited-for
// children (iptables-restore, nft).
func childCPU() (user, sys time.Duration) {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_CHILDREN, &ru)
	return time.Duration(ru.Utime.Nano()), time.Duration(ru.Stime.Nano())
}

// BenchmarkPrivilegedApplyOneChange5000Rules measures one sync that changes
// one Service's address with 5,000 rules present: ms/op is the Apply (the
// write, and the conntrack clean-up of the one pod), child-cpu-ms/op and
// child-sys-ms/op the CPU time of iptables-restore or nft (sys: in the
// kernel). iptables-restore rewrites the whole chain; nftables deletes and
// adds one map element, then lists the table once for the cheap check.
func BenchmarkPrivilegedApplyOneChange5000Rules(b *testing.B) {
	for _, bc := range backendCases {
		b.Run(bc.name, func(b *testing.B) {
			tp, m := benchTopo(b, bc, benchRules, false)
			d := benchDesired()
			var err error
			var user0, sys0, user1, sys1 time.Duration
			tp.node.Do(b, func() {
				user0, sys0 = childCPU()
				for b.Loop() {
					if d.SNAT[10].Source == lb4 {
						d.SNAT[10].Source = lb4b
					} else {
						d.SNAT[10].Source = lb4
					}
					var failed map[string]error
					if failed, err = m.Apply(context.Background(), d); err == nil && failed != nil {
						err = fmt.Errorf("failed: %v", failed)
					}
					if err != nil {
						return
					}
				}
				user1, sys1 = childCPU()
			})
			if err != nil {
				b.Fatal(err)
			}
			ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) / float64(b.N) }
			b.ReportMetric(ms(b.Elapsed()), "ms/op")
			b.ReportMetric(ms(user1-user0+sys1-sys0), "child-cpu-ms/op")
			b.ReportMetric(ms(sys1-sys0), "child-sys-ms/op")
		})
	}
}

// BenchmarkPrivilegedCheck5000Rules measures Manager.Check, which the sync
// loop calls every second, with 5,000 rules: "unchanged" when nothing in
// the namespace's firewall changed since the last check; "others-changed"
// when someone committed to nftables meanwhile (kube-proxy, a CNI), so the
// generation moved (nftables: the table is listed and hashed; iptables-nft:
// the hook and the chain's last rule are listed). iptables-legacy has no
// generation: it lists every time.
func BenchmarkPrivilegedCheck5000Rules(b *testing.B) {
	for _, bc := range backendCases {
		for _, variant := range []string{"unchanged", "others-changed"} {
			if bc.name == BackendIPTablesLegacy && variant == "others-changed" {
				continue
			}
			b.Run(bc.name+"/"+variant, func(b *testing.B) {
				tp, m := benchTopo(b, bc, benchRules, false)
				forget := func() {}
				if variant == "others-changed" {
					forget = func() {
						switch w := m.w.(type) {
						case *nftWriter:
							w.fam[IPv4].genOK, w.fam[IPv6].genOK = false, false
						case *iptablesWriter:
							w.fam[IPv4].genOK, w.fam[IPv6].genOK = false, false
						}
					}
				}
				var (
					ok  bool
					err error
				)
				tp.node.Do(b, func() {
					// The first check after the write records the generation.
					if ok, err = m.Check(context.Background()); err != nil || !ok {
						return
					}
					for b.Loop() {
						forget()
						if ok, err = m.Check(context.Background()); err != nil || !ok {
							return
						}
					}
				})
				if err != nil || !ok {
					b.Fatalf("Check = %v, %v", ok, err)
				}
				b.ReportMetric(float64(b.Elapsed())/float64(time.Microsecond)/float64(b.N), "µs/op")
			})
		}
	}
}
