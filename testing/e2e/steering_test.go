//go:build e2e

package e2e

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/pkg/election"
	"github.com/egressvip/egressvip/testing/sandbox"
)

// Scenarios of "every pod of an egress Service leaves with its address,
// from any node, from its first packet": real datagrams every 10 ms from
// every pod, their source checked at the external host.

const flowEvery = 10 * time.Millisecond

// flows are the flows of several pods towards the external host.
type flows struct {
	t     *testing.T
	dst   netip.AddrPort
	flows map[string]*sandbox.Flow
	order []string
}

func newFlows(t *testing.T) *flows {
	return &flows{t: t, dst: netip.AddrPortFrom(sandbox.ExternalAddr(false), sandbox.UDPPort), flows: map[string]*sandbox.Flow{}}
}

func (f *flows) start(p *sandbox.Pod) {
	f.t.Helper()
	fl, err := cluster.StartFlow(p, f.dst, flowEvery)
	if err != nil {
		f.t.Fatalf("flow from %s: %v", p.Name, err)
	}
	f.flows[p.Name] = fl
	f.order = append(f.order, p.Name+"@"+p.Node.Name)
}

// stop ends every flow, prints per pod what arrived from where, records
// the totals and fails on any datagram from a node's address.
func (f *flows) stop(figure string, want netip.Addr) (wrong int) {
	f.t.Helper()
	sent, arrived := 0, 0
	var lines []string
	for _, name := range f.order {
		pod, _, _ := strings.Cut(name, "@")
		r := f.flows[pod].Stop(want)
		sent, arrived = sent+r.Sent, arrived+r.Arrived
		nodeIPs := 0
		for src, n := range r.Sources {
			if src != want {
				nodeIPs += n
			}
		}
		wrong += nodeIPs
		line := fmt.Sprintf("%s: %d sent, %d from %s, %d from other addresses, longest gap %s",
			name, r.Sent, r.Sources[want], want, nodeIPs, r.LongestGap.Round(time.Millisecond))
		if len(r.Wrong) > 0 {
			// Which ones, from where: the first and the last.
			first, last := r.Wrong[0], r.Wrong[len(r.Wrong)-1]
			line += fmt.Sprintf(" (%s from %s at %s, ..., %s from %s at %s)",
				strings.TrimPrefix(first.Payload, f.flows[pod].Prefix), first.Source, first.At.Format("15:04:05.000"),
				strings.TrimPrefix(last.Payload, f.flows[pod].Prefix), last.Source, last.At.Format("15:04:05.000"))
		}
		lines = append(lines, line)
	}
	f.t.Logf("%s:\n  %s", figure, strings.Join(lines, "\n  "))
	record(figure, fmt.Sprintf("%d datagrams sent, %d arrived, %d not from %s", sent, arrived, wrong, want))
	if wrong > 0 {
		f.t.Errorf("%s: %d datagrams left with another address than %s", figure, wrong, want)
	}
	return wrong
}

// Three replicas, one per node: every datagram of every pod arrives from
// the address, none from a node's.
func TestEveryReplicaLeavesWithTheAddress(t *testing.T) {
	lb := addr("203.0.113.160")
	service(t, "replicas", true, egressAnn(lb.String()))
	var pods []*sandbox.Pod
	for _, n := range cluster.Nodes {
		pods = append(pods, runPod(t, "replicas", n))
	}
	holder := waitHolder(t, lb)
	waitSteered(t, "replicas", 3, len(cluster.Nodes)-1)
	f := newFlows(t)
	for _, p := range pods {
		f.start(p)
	}
	time.Sleep(10 * time.Second)
	f.stop("3 replicas, one per node, 10 s", lb)
	if h := holders(lb); len(h) != 1 || h[0] != holder.Name {
		t.Errorf("the address moved to %v during the flows", h)
	}
}

// waitSteered waits until the Service reports egress pods and steered ones.
func waitSteered(t *testing.T, name string, egress, steered int) {
	t.Helper()
	eventually(t, 30*time.Second, fmt.Sprintf("%s reports %d egress pods, %d steered", name, egress, steered), func() (bool, string) {
		svc := getService(t, name)
		e, s := svc.Annotations["egressvip.io/endpoints"], svc.Annotations["egressvip.io/steered-endpoints"]
		return e == fmt.Sprint(egress) && s == fmt.Sprint(steered), e + "/" + s
	})
}

// A rolling update of three replicas (maxSurge 1: a new pod is Ready
// before an old one goes, one at a time): no datagram from a node's
// address, from the old pods nor from the new ones, whichever node holds
// the address meanwhile.
func TestRollingUpdateOfReplicas(t *testing.T) {
	lb := addr("203.0.113.161")
	service(t, "rollout", true, egressAnn(lb.String()))
	var pods []*sandbox.Pod
	for _, n := range cluster.Nodes {
		pods = append(pods, runPod(t, "rollout", n))
	}
	waitHolder(t, lb)
	waitSteered(t, "rollout", 3, len(cluster.Nodes)-1)
	s := cluster.StartSampler(sampleEvery, 0, lb)
	f := newFlows(t)
	for _, p := range pods {
		f.start(p)
	}
	for i, old := range pods {
		fresh := startPodSending(t, f, "rollout", fmt.Sprintf("rollout-v2-%d", i), old.Node)
		if err := cluster.SetPodReady(ctx(t), fresh, true); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Second)
		if err := cluster.DeletePod(ctx(t), old); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Second)
	}
	time.Sleep(2 * time.Second)
	f.stop("rolling update of 3 replicas (maxSurge 1)", lb)
	noDoubles(t, "rolling update of 3 replicas", s.Stop(), lb)
}

// startPodSending creates a pod and starts its flow the moment its address
// exists (not Ready yet), as its containers would.
func startPodSending(t *testing.T, f *flows, app, name string, on *sandbox.Node) *sandbox.Pod {
	t.Helper()
	p, err := cluster.CreatePod(ctx(t), ns, name, on, map[string]string{"app": app})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cluster.DeletePod(ctx(t), p) })
	if err := cluster.StartPod(ctx(t), p); err != nil {
		t.Fatal(err)
	}
	f.start(p)
	return p
}

// A single replica moved to another node five times (new pod Ready, old
// one deleted): the new pod is steered to the old holder until the
// address has moved, so no datagram leaves with a node's address.
func TestSingleReplicaMovesFiveTimes(t *testing.T) {
	lb := addr("203.0.113.162")
	service(t, "mover", true, egressAnn(lb.String()))
	p := runPod(t, "mover", cluster.Nodes[0])
	waitServed(t, "mover", cluster.Nodes[0], true, lb)
	s := cluster.StartSampler(sampleEvery, 0, lb)
	f := newFlows(t)
	f.start(p)
	var follow []time.Duration
	for i := range 5 {
		to := cluster.Nodes[(i+1)%len(cluster.Nodes)]
		fresh := startPodSending(t, f, "mover", fmt.Sprintf("mover-%d", i), to)
		if err := cluster.SetPodReady(ctx(t), fresh, true); err != nil {
			t.Fatal(err)
		}
		if err := cluster.DeletePod(ctx(t), p); err != nil {
			t.Fatal(err)
		}
		deleted := time.Now()
		eventually(t, 30*time.Second, "the address follows to "+to.Name, func() (bool, string) {
			h := holders(lb)
			return len(h) == 1 && h[0] == to.Name, fmt.Sprint(h)
		})
		follow = append(follow, time.Since(deleted))
		p = fresh
		time.Sleep(time.Second)
	}
	f.stop("single replica moved 5 times", lb)
	noDoubles(t, "single replica moved 5 times", s.Stop(), lb)
	slices.Sort(follow)
	record("single replica moved 5 times: address follows (p50, max)", fmt.Sprintf("%s, %s", follow[2].Round(time.Millisecond), follow[4].Round(time.Millisecond)))
}

// The holder's daemon is killed while three replicas send: per pod the
// gap and the datagrams from node addresses (goal 0).
func TestHolderKilledWhileReplicasSend(t *testing.T) {
	lb := addr("203.0.113.163")
	service(t, "killed-replicas", true, egressAnn(lb.String()))
	var pods []*sandbox.Pod
	for _, n := range cluster.Nodes {
		pods = append(pods, runPod(t, "killed-replicas", n))
	}
	holder := waitHolder(t, lb)
	waitSteered(t, "killed-replicas", 3, len(cluster.Nodes)-1)
	f := newFlows(t)
	for _, p := range pods {
		f.start(p)
	}
	time.Sleep(time.Second)
	// Every 2 ms, on the nodes that go on running: when each one's pod is
	// first steered to another node than the dead holder.
	type steered struct {
		at  time.Time
		via netip.Addr
	}
	firstElsewhere := map[string]steered{}
	var polled sync.WaitGroup
	stopPolling := make(chan struct{})
	polled.Add(1)
	go func() {
		defer polled.Done()
		deadline := time.Now().Add(30 * time.Second)
		for time.Now().Before(deadline) {
			select {
			case <-stopPolling:
				return
			case <-time.After(2 * time.Millisecond):
			}
			for _, p := range pods {
				if p.Node == holder || !firstElsewhere[p.Node.Name].at.IsZero() {
					continue
				}
				via, err := steeredVia(p.Node, p.IP4)
				if err == nil && via.IsValid() && !slices.Contains(nodeAddrs(holder), via) {
					firstElsewhere[p.Node.Name] = steered{time.Now(), via}
				}
			}
		}
	}()
	if _, err := cluster.StopDaemon(holder, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	var newHolder *sandbox.Node
	eventually(t, 30*time.Second, "another node holds the address", func() (bool, string) {
		h := holders(lb)
		if len(h) == 1 && h[0] != holder.Name {
			newHolder = cluster.Node(h[0])
			return true, ""
		}
		return false, fmt.Sprint(h)
	})
	record("replicas sending, holder killed: another node holds it after", time.Since(killed).Round(time.Millisecond).String())
	// The third node's steering follows the new holder's Lease write.
	lease, err := cluster.Admin.CoordinationV1().Leases(daemonNS).Get(ctx(t), election.AddressLeaseName(lb), metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "the third node's pod steered to the new holder", func() (bool, string) {
		for _, p := range pods {
			if p.Node != holder && p.Node != newHolder {
				via, err := steeredVia(p.Node, p.IP4)
				return slices.Contains(nodeAddrs(newHolder), via), fmt.Sprint(via, err)
			}
		}
		return false, "no third node"
	})
	close(stopPolling)
	polled.Wait()
	for _, p := range pods {
		if p.Node == holder || p.Node == newHolder {
			continue
		}
		first := firstElsewhere[p.Node.Name]
		switch {
		case lease.Spec.HolderIdentity == nil || *lease.Spec.HolderIdentity != newHolder.Name || lease.Spec.AcquireTime == nil:
			t.Errorf("the address Lease %s: holder %v, acquired %v; want %s", lease.Name, lease.Spec.HolderIdentity, lease.Spec.AcquireTime, newHolder.Name)
		case first.at.IsZero() || !slices.Contains(nodeAddrs(newHolder), first.via):
			t.Errorf("%s's pod was first steered elsewhere via %v, not to the new holder %s", p.Node.Name, first.via, newHolder.Name)
		default:
			record("replicas sending, holder killed: the third node's steering follows the new holder's Lease write after",
				first.at.Sub(lease.Spec.AcquireTime.Time).Round(time.Millisecond).String())
		}
	}
	time.Sleep(3 * time.Second)
	if err := cluster.StartDaemon(holder); err != nil {
		t.Fatal(err)
	}
	time.Sleep(5 * time.Second)
	f.stop("3 replicas sending, holder's daemon killed", lb)
}

// A new pod's first datagram, sent the moment its address exists: from the
// address when a path exists, never from the node's; in strict mode, with
// no holder at all, dropped until the path exists.
func TestFirstDatagram(t *testing.T) {
	lb := addr("203.0.113.164")
	service(t, "first", true, egressAnn(lb.String()))
	runPod(t, "first", cluster.Nodes[0])
	waitHolder(t, lb)
	var armed []string
	for i, n := range cluster.Nodes {
		// How long after the pod's binding its node's gate is armed
		// (egressvip read the pending pod and wrote its firewall), next
		// to when the sandbox's kubelet let the pod send.
		gate := make(chan time.Time, 1)
		go func() {
			defer close(gate)
			for end := time.Now().Add(3 * time.Second); time.Now().Before(end); time.Sleep(5 * time.Millisecond) {
				if n.GateArmed(false) {
					gate <- time.Now()
					return
				}
			}
		}()
		f := newFlows(t)
		p := startPodSending(t, f, "first", fmt.Sprintf("first-%d", i), n)
		sending := time.Since(p.Bound())
		if at, ok := <-gate; ok {
			armed = append(armed, fmt.Sprintf("%s %s (sending at %s)", n.Name, at.Sub(p.Bound()).Round(time.Millisecond), sending.Round(time.Millisecond)))
		} else {
			armed = append(armed, fmt.Sprintf("%s not seen (sending at %s)", n.Name, sending.Round(time.Millisecond)))
		}
		time.Sleep(2 * time.Second)
		f.stop(fmt.Sprintf("first datagrams of a new pod on %s", n.Name), lb)
	}
	record("new pod: its node's gate armed after the binding", strings.Join(armed, ", "))

	// Strict: no holder yet (the only pod is not Ready, and the Service
	// is Local), so nothing leaves until one exists.
	strictLB := addr("203.0.113.165")
	service(t, "first-strict", true, egressAnn(strictLB.String(), annotations.EgressStrict, "true"))
	f := newFlows(t)
	p := startPodSending(t, f, "first-strict", "first-strict-0", cluster.Nodes[1])
	time.Sleep(2 * time.Second)
	if h := holders(strictLB); len(h) != 0 {
		t.Fatalf("strict address held by %v before any pod was Ready", h)
	}
	if err := cluster.SetPodReady(ctx(t), p, true); err != nil {
		t.Fatal(err)
	}
	waitHolder(t, strictLB)
	time.Sleep(2 * time.Second)
	f.stop("strict mode: datagrams before and after the first holder", strictLB)
}

// Inbound traffic keeps working next to a real kube-proxy, in both its
// modes: connections to the LoadBalancer IP and to a NodePort reach the
// pods and are answered from the address they came to; an egress pod's
// connection to a ClusterIP (another pod behind it) is neither SNATed nor
// steered.
func TestInboundNextToKubeProxy(t *testing.T) {
	defer func() {
		if err := cluster.SetKubeProxyMode(ctx(t), "nftables"); err != nil {
			t.Error(err)
		}
	}()
	for i, mode := range []string{"nftables", "iptables"} {
		t.Run(mode, func(t *testing.T) {
			if err := cluster.SetKubeProxyMode(ctx(t), mode); err != nil {
				t.Fatal(err)
			}
			lb := addr(fmt.Sprintf("203.0.113.%d", 166+i))
			name := "inbound-" + mode
			svc := service(t, name, true, egressAnn(lb.String()), func(s *corev1.Service) {
				s.Spec.Ports = []corev1.ServicePort{{Name: "tcp", Port: 8080, Protocol: corev1.ProtocolTCP}}
			})
			var pods []*sandbox.Pod
			for _, n := range cluster.Nodes {
				p := runPod(t, name, n)
				if err := p.Serve("tcp", 8080); err != nil {
					t.Fatal(err)
				}
				pods = append(pods, p)
			}
			holder := waitHolder(t, lb)
			svc = getService(t, name)
			nodePort := svc.Spec.Ports[0].NodePort
			if err := cluster.WaitProxied(ctx(t), lb, "tcp", 8080, 30*time.Second); err != nil {
				t.Fatal(err)
			}
			for _, dst := range []netip.AddrPort{netip.AddrPortFrom(lb, 8080), netip.AddrPortFrom(holder.ExtIP4, uint16(nodePort))} {
				rep, err := cluster.External.Request("tcp", dst, 5*time.Second)
				if err != nil {
					t.Fatalf("%s: inbound to %s: %v", mode, dst, err)
				}
				if rep.From.Addr() != dst.Addr() || rep.Pod == "" {
					t.Errorf("%s: inbound to %s answered by %q from %s", mode, dst, rep.Pod, rep.From)
				}
				t.Logf("%s: inbound to %s answered by %s from %s", mode, dst, rep.Pod, rep.From)
			}
			// ClusterIP traffic from an egress pod: untouched.
			backend := runPod(t, name+"-backend", cluster.Nodes[0])
			if err := backend.Serve("udp", 7000); err != nil {
				t.Fatal(err)
			}
			ips := clusterIPService(t, name+"-backend", 7000)
			for _, p := range pods {
				rep, err := p.Request("udp", netip.AddrPortFrom(ips[0], 7000), 5*time.Second)
				if err != nil {
					t.Fatalf("%s: %s to ClusterIP %s: %v", mode, p.Name, ips[0], err)
				}
				if rep.Seen.Addr() != p.IP4 {
					t.Errorf("%s: the backend saw %s's connection through the ClusterIP from %s, want the pod's own address", mode, p.Name, rep.Seen.Addr())
				}
			}
			record("kube-proxy "+mode+": inbound to the LoadBalancer IP and a NodePort", "answered from the address they came to")
		})
	}
}
