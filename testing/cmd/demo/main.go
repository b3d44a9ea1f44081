// Command demo runs egressvip on the sandbox cluster: two nodes, one egress
// Service with one pod, the external host's view of the pod's source
// address, then the pod moves to the other node and the address follows.
// Everything is torn down at the end, also on Ctrl-C.
package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/signal"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/testing/sandbox"
)

const (
	svcName = "demo-egress"
	lb      = "203.0.113.200"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "demo failed:", err)
		os.Exit(1)
	}
}

func say(format string, args ...any) { fmt.Printf("==> "+format+"\n", args...) }

func run(ctx context.Context) error {
	say("starting the sandbox cluster (real kube-apiserver, kube-controller-manager, etcd, kube-proxy in every node; nodes and pods are network namespaces)")
	c, err := sandbox.Start(ctx, sandbox.Options{Nodes: 2, Logf: func(f string, a ...any) { fmt.Printf("    "+f+"\n", a...) }})
	if err != nil {
		return err
	}
	defer func() {
		say("tearing down")
		c.Stop()
		_ = os.RemoveAll(c.Dir)
	}()
	n1, n2 := c.Nodes[0], c.Nodes[1]
	say("egressvip runs on %s and %s, as manifests/daemonset.yaml configures it", n1.Name, n2.Name)

	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: svcName, Annotations: map[string]string{
			annotations.LoadBalancerIPs: lb, annotations.Egress: "true",
		}},
		Spec: corev1.ServiceSpec{
			Type:                  corev1.ServiceTypeLoadBalancer,
			ExternalTrafficPolicy: corev1.ServiceExternalTrafficPolicyLocal,
			Selector:              map[string]string{"app": svcName},
			Ports:                 []corev1.ServicePort{{Port: 5060, Protocol: corev1.ProtocolUDP}},
		},
	}
	if _, err := c.Admin.CoreV1().Services("default").Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		return err
	}
	say("created Service %s with kube-vip.io/egress=true and LoadBalancer IP %s", svcName, lb)

	pod, err := c.RunPod(ctx, "default", svcName+"-1", n1, map[string]string{"app": svcName})
	if err != nil {
		return err
	}
	say("pod %s (%s) is Ready on %s (node address %s)", pod.Name, pod.IP4, n1.Name, n1.ExtIP4)
	if _, err := waitSource(ctx, c, pod, lb); err != nil {
		return err
	}
	report(ctx, c, pod)

	say("moving the pod: deleting it on %s, starting a new one on %s", n1.Name, n2.Name)
	if err := c.DeletePod(ctx, pod); err != nil {
		return err
	}
	moved, err := c.RunPod(ctx, "default", svcName+"-2", n2, map[string]string{"app": svcName})
	if err != nil {
		return err
	}
	ready := time.Now()
	say("pod %s (%s) is Ready on %s (node address %s)", moved.Name, moved.IP4, n2.Name, n2.ExtIP4)
	at, err := waitSource(ctx, c, moved, lb)
	if err != nil {
		return err
	}
	report(ctx, c, moved)
	say("convergence: new pod Ready -> first packet with %s at the external host: %s", lb, at.Sub(ready).Round(time.Millisecond))
	return nil
}

// waitSource sends from the pod every 20 ms until the external host sees
// want as source; it returns when that packet arrived.
func waitSource(ctx context.Context, c *sandbox.Cluster, p *sandbox.Pod, want string) (time.Time, error) {
	conn, err := sandbox.OpenUDP(p, netip.AddrPortFrom(sandbox.ExternalAddr(false), sandbox.UDPPort))
	if err != nil {
		return time.Time{}, err
	}
	defer conn.Close()
	prefix := fmt.Sprintf("demo-%s-", p.Name)
	deadline := time.Now().Add(60 * time.Second)
	for i := 0; time.Now().Before(deadline) && ctx.Err() == nil; i++ {
		_, _ = conn.Write([]byte(fmt.Sprintf("%s%d", prefix, i)))
		for _, h := range c.External.HitsWithPrefix(prefix) {
			if h.Source.String() == want {
				return h.At, nil
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return time.Time{}, fmt.Errorf("the external host never saw %s from %s", want, p.Name)
}

func report(ctx context.Context, c *sandbox.Cluster, p *sandbox.Pod) {
	for _, proto := range []string{"tcp", "udp"} {
		port := uint16(sandbox.TCPPort)
		if proto == "udp" {
			port = sandbox.UDPPort
		}
		src, err := c.Send(p, proto, netip.AddrPortFrom(sandbox.ExternalAddr(false), port), fmt.Sprintf("report-%s-%s", p.Name, proto), 5*time.Second)
		if err != nil {
			say("external host: %s from %s: %v", proto, p.Name, err)
			continue
		}
		say("external host %s sees %s from pod %s (%s) arrive from %s", sandbox.ExternalHost4, proto, p.Name, p.IP4, src)
	}
	svc, err := c.Admin.CoreV1().Services("default").Get(ctx, svcName, metav1.GetOptions{})
	if err == nil {
		var ingress []string
		for _, i := range svc.Status.LoadBalancer.Ingress {
			ingress = append(ingress, i.IP)
		}
		say("Service: EXTERNAL-IP %v, %s=%s, %s=%s", ingress, annotations.VIPHost, svc.Annotations[annotations.VIPHost],
			annotations.ActiveEndpoint, svc.Annotations[annotations.ActiveEndpoint])
	}
	for _, n := range c.Nodes {
		addrs, _ := n.LBAddresses()
		say("  %s holds %v on its serviceInterface", n.Name, addrs)
	}
}
