//go:build e2e

// Package vxlan runs egressvip's opt-in VXLAN steering on a sandbox whose
// nodes are on different subnets (a router between them), so no node's
// InternalIP is on-link from another: every replica of an egress Service
// still leaves with its address, steered to the holder through the tunnel.
package vxlan

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/testing/sandbox"
)

var cluster *sandbox.Cluster

func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		if os.Getenv("EGRESSVIP_REQUIRE_PRIVILEGED") == "1" {
			fmt.Println("e2e/vxlan: needs root (EGRESSVIP_REQUIRE_PRIVILEGED=1)")
			os.Exit(1)
		}
		fmt.Println("e2e/vxlan: skipping, needs root")
		os.Exit(0)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	var err error
	cluster, err = sandbox.Start(ctx, sandbox.Options{
		Nodes:       3,
		RoutedNodes: true,
		Logf:        func(f string, a ...any) { fmt.Printf("sandbox (routed): "+f+"\n", a...) },
		DaemonEnv:   map[string]string{"log_level": "debug", "egressvip_tunnel": "vxlan"},
		Controllers: []string{"garbagecollector"},
	})
	cancel()
	if err != nil {
		fmt.Println("sandbox:", err)
		if cluster != nil {
			cluster.Stop()
		}
		os.Exit(1)
	}
	code := m.Run()
	if code != 0 {
		fmt.Println("e2e/vxlan: failed; logs kept in", cluster.Dir)
	}
	cluster.Stop()
	if code == 0 {
		_ = os.RemoveAll(cluster.Dir)
	}
	os.Exit(code)
}

func TestReplicasOnRoutedNodesLeaveWithTheAddressThroughVXLAN(t *testing.T) {
	ctx := t.Context()
	for _, a := range cluster.Nodes {
		for _, b := range cluster.Nodes {
			if a != b && netip.PrefixFrom(a.IP4, 28).Masked().Contains(b.IP4) {
				t.Fatalf("setup: %s and %s share a subnet", a.Name, b.Name)
			}
		}
	}
	lb := netip.MustParseAddr("203.0.113.189")
	policy := corev1.IPFamilyPolicyPreferDualStack
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "vx", Annotations: map[string]string{annotations.LoadBalancerIPs: lb.String(), annotations.Egress: "true"}},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeLoadBalancer, Selector: map[string]string{"app": "vx"}, IPFamilyPolicy: &policy,
			ExternalTrafficPolicy: corev1.ServiceExternalTrafficPolicyLocal, Ports: []corev1.ServicePort{{Name: "sip", Port: 5060, Protocol: corev1.ProtocolUDP}}},
	}
	if _, err := cluster.Admin.CoreV1().Services("default").Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var pods []*sandbox.Pod
	for i, n := range cluster.Nodes {
		p, err := cluster.RunPod(ctx, "default", fmt.Sprintf("vx-%d", i), n, map[string]string{"app": "vx"})
		if err != nil {
			t.Fatal(err)
		}
		pods = append(pods, p)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		h := cluster.Holders(lb)
		s, _ := cluster.Admin.CoreV1().Services("default").Get(ctx, "vx", metav1.GetOptions{})
		if len(h) == 1 && s != nil && s.Annotations["egressvip.io/steered-endpoints"] == "2" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not served with two steered pods: holders %v", h)
		}
		time.Sleep(100 * time.Millisecond)
	}
	dst := netip.AddrPortFrom(sandbox.ExternalAddr(false), sandbox.UDPPort)
	var flows []*sandbox.Flow
	for _, p := range pods {
		f, err := cluster.StartFlow(p, dst, 10*time.Millisecond)
		if err != nil {
			t.Fatal(err)
		}
		flows = append(flows, f)
	}
	time.Sleep(5 * time.Second)
	var lines []string
	wrong := 0
	for i, f := range flows {
		r := f.Stop(lb)
		wrong += len(r.Wrong)
		lines = append(lines, fmt.Sprintf("%s@%s: %s", pods[i].Name, pods[i].Node.Name, r))
		if r.Arrived == 0 {
			t.Errorf("%s: nothing arrived through the tunnel", pods[i].Name)
		}
	}
	t.Logf("VXLAN mode, nodes on different subnets:\n  %s", strings.Join(lines, "\n  "))
	fmt.Printf("E2E VXLAN: 3 replicas on routed nodes, 5 s of datagrams every 10 ms: %d not from %s\n", wrong, lb)
	if wrong > 0 {
		t.Errorf("%d datagrams left with another address than %s", wrong, lb)
	}
}
