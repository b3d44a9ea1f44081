//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/testing/sandbox"
)

// namespace creates a namespace for the test (left in place: the sandbox
// runs no namespace controller, and an empty namespace costs nothing).
// serviceIn is service() in another namespace.
func serviceIn(t *testing.T, namespace, name string, local bool, ann map[string]string) {
	t.Helper()
	policy := corev1.IPFamilyPolicyPreferDualStack
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name, Annotations: ann},
		Spec: corev1.ServiceSpec{
			Type: corev1.ServiceTypeLoadBalancer, Selector: map[string]string{"app": name}, IPFamilyPolicy: &policy,
			Ports:                 []corev1.ServicePort{{Name: "sip", Port: 5060, Protocol: corev1.ProtocolUDP}},
			ExternalTrafficPolicy: corev1.ServiceExternalTrafficPolicyCluster,
		},
	}
	if local {
		svc.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
	}
	if _, err := cluster.Admin.CoreV1().Services(namespace).Create(ctx(t), svc, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create Service %s/%s: %v", namespace, name, err)
	}
	t.Cleanup(func() {
		_ = cluster.Admin.CoreV1().Services(namespace).Delete(context.Background(), name, metav1.DeleteOptions{})
	})
}

func runPodIn(t *testing.T, namespace, app string, node *sandbox.Node) *sandbox.Pod {
	t.Helper()
	p, err := cluster.RunPod(ctx(t), namespace, fmt.Sprintf("%s-%d", app, time.Now().UnixNano()%100000), node, map[string]string{"app": app})
	if err != nil {
		t.Fatalf("run pod: %v", err)
	}
	t.Cleanup(func() { _ = cluster.DeletePod(context.Background(), p) })
	return p
}

func waitEventIn(t *testing.T, namespace, service, reason string) string {
	t.Helper()
	var found string
	eventually(t, 30*time.Second, fmt.Sprintf("event %s on %s/%s", reason, namespace, service), func() (bool, string) {
		list, err := cluster.Admin.CoreV1().Events(namespace).List(ctx(t), metav1.ListOptions{FieldSelector: "involvedObject.name=" + service})
		if err != nil {
			return false, err.Error()
		}
		var seen []string
		for _, e := range list.Items {
			if e.Type == corev1.EventTypeWarning && e.Reason == reason {
				found = e.Message
				return true, ""
			}
			seen = append(seen, e.Reason)
		}
		return false, strings.Join(seen, ",")
	})
	return found
}

// A Service of another namespace names the LoadBalancer IP of an egress
// Service: the victim keeps it, the attacker's pod never leaves with it,
// and the attacker's Service gets an Event that does not name the victim.
func TestForeignNamespaceCannotClaimAnAddress(t *testing.T) {
	lb := addr("203.0.113.140")
	createNamespace(t, "victim")
	createNamespace(t, "attacker")
	victimNode, attackerNode := cluster.Nodes[0], cluster.Nodes[1]
	serviceIn(t, "victim", "db-egress", true, egressAnn(lb.String()))
	victim := runPodIn(t, "victim", "db-egress", victimNode)
	eventually(t, 60*time.Second, "the victim served", func() (bool, string) {
		h := holders(lb)
		return len(h) == 1 && h[0] == victimNode.Name && len(victimNode.SNATRulesFor("victim/db-egress")) > 0, fmt.Sprint(h)
	})
	s := sample(lb)

	serviceIn(t, "attacker", "steal", true, egressAnn(lb.String()))
	thief := runPodIn(t, "attacker", "steal", attackerNode)
	msg := waitEventIn(t, "attacker", "steal", "LoadBalancerIPConflict")
	if strings.Contains(msg, "db-egress") {
		t.Errorf("the conflict Event names the other namespace's Service: %q", msg)
	}
	time.Sleep(time.Second)
	if src := sourceSeen(t, thief, "udp", false, sandbox.UDPPort); src == lb {
		t.Errorf("the attacker's pod left with the victim's address %s", lb)
	}
	if src := sourceSeen(t, victim, "udp", false, sandbox.UDPPort); src != lb {
		t.Errorf("the victim's pod left with %s, want %s", src, lb)
	}
	if r := attackerNode.SNATRulesFor("attacker/steal"); len(r) > 0 {
		t.Errorf("the attacker's node has SNAT rules %v", r)
	}
	s.end(t, "a foreign namespace claims the address")
	if h := holders(lb); len(h) != 1 || h[0] != victimNode.Name {
		t.Errorf("address on %v, want only the victim's node %s", h, victimNode.Name)
	}
	if got := getServiceIn(t, "attacker", "steal").Status.LoadBalancer.Ingress; len(got) != 0 {
		t.Errorf("the attacker's Service status shows %v", got)
	}
}

func getServiceIn(t *testing.T, namespace, name string) *corev1.Service {
	t.Helper()
	svc, err := cluster.Admin.CoreV1().Services(namespace).Get(ctx(t), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return svc
}

// A Service that names a node's own address gets an Event and nothing is
// bound anywhere; the node stays reachable at its address.
func TestANodesAddressIsNotClaimed(t *testing.T) {
	target := cluster.Nodes[1]
	service(t, "node-address", false, map[string]string{annotations.LoadBalancerIPs: target.ExtIP4.String()})
	waitEvent(t, "node-address", "LoadBalancerIPRefused", target.ExtIP4.String())
	time.Sleep(time.Second)
	for _, n := range cluster.Nodes {
		if addrs, _ := n.LBAddresses(); len(addrs) > 0 {
			for _, a := range addrs {
				if a == target.ExtIP4 {
					t.Errorf("%s bound the node address %s as a LoadBalancer IP", n.Name, a)
				}
			}
		}
	}
	// Another node reaches the target over the external network.
	other := cluster.Nodes[0]
	var conn net.Conn
	err := sandbox.Do(other.NS, func() error {
		var err error
		conn, err = net.DialTimeout("tcp", netip.AddrPortFrom(target.ExtIP4, 2112).String(), 3*time.Second)
		return err
	})
	if err != nil {
		t.Fatalf("%s cannot reach %s at its own address: %v", other.Name, target.Name, err)
	}
	conn.Close()
	if got := getService(t, "node-address").Status.LoadBalancer.Ingress; len(got) != 0 {
		t.Errorf("status shows %v", got)
	}
}

// A hostNetwork endpoint is the node itself: its traffic keeps the node
// address, and the Service's address is still served.
func TestHostNetworkEndpointIsNotEgressed(t *testing.T) {
	lb := addr("203.0.113.141")
	node := cluster.Nodes[2]
	service(t, "hostnet", true, egressAnn(lb.String()))
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "hostnet-agent", Labels: map[string]string{"app": "hostnet"}},
		Spec: corev1.PodSpec{NodeName: node.Name, HostNetwork: true, TerminationGracePeriodSeconds: new(int64),
			Containers: []corev1.Container{{Name: "agent", Image: "sandbox.invalid/agent:latest"}}},
	}
	created, err := cluster.Admin.CoreV1().Pods(ns).Create(ctx(t), pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cluster.Admin.CoreV1().Pods(ns).Delete(context.Background(), pod.Name, metav1.DeleteOptions{GracePeriodSeconds: new(int64)})
	})
	now := metav1.Now()
	created.Status = corev1.PodStatus{
		Phase: corev1.PodRunning, PodIP: node.IP4.String(), PodIPs: []corev1.PodIP{{IP: node.IP4.String()}},
		HostIP: node.IP4.String(), StartTime: &now,
		Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue, LastTransitionTime: now}},
	}
	if _, err := cluster.Admin.CoreV1().Pods(ns).UpdateStatus(ctx(t), created, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitEvent(t, "hostnet", "EndpointNotEgressed", node.IP4.String())
	eventually(t, 30*time.Second, "the address served on the endpoint's node", func() (bool, string) {
		h := holders(lb)
		return len(h) == 1 && h[0] == node.Name, fmt.Sprint(h)
	})
	if r := node.SNATRulesFor(ns + "/hostnet"); len(r) > 0 {
		t.Errorf("SNAT rules for a hostNetwork endpoint: %v", r)
	}
	// The node's own traffic from its address leaves with it.
	payload := fmt.Sprintf("hostnet-%d", time.Now().UnixNano())
	err = sandbox.Do(node.NS, func() error {
		c, err := net.DialUDP("udp", &net.UDPAddr{IP: node.IP4.AsSlice()}, net.UDPAddrFromAddrPort(netip.AddrPortFrom(sandbox.ExternalAddr(false), sandbox.UDPPort)))
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write([]byte(payload))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "the node's datagram arrives", func() (bool, string) {
		hits := cluster.External.Hits(payload)
		if len(hits) == 0 {
			return false, "none yet"
		}
		if hits[0].Source != node.IP4 {
			t.Errorf("the node's own datagram arrived from %s, want %s", hits[0].Source, node.IP4)
		}
		return true, ""
	})
}

// A terminating pod keeps its egress address for its grace period, like
// kube-proxy keeps serving terminating endpoints; once it is gone the
// rules go.
func TestTerminatingPodKeepsItsAddress(t *testing.T) {
	lb := addr("203.0.113.142")
	node := cluster.Nodes[0]
	service(t, "graceful", true, egressAnn(lb.String()))
	p := runPod(t, "graceful", node)
	waitServed(t, "graceful", node, true, lb)
	f := startFlow(t, p, 20*time.Millisecond)
	grace := int64(60)
	if err := cluster.Admin.CoreV1().Pods(ns).Delete(ctx(t), p.Name, metav1.DeleteOptions{GracePeriodSeconds: &grace}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "the endpoint is terminating", func() (bool, string) {
		list, err := cluster.Admin.DiscoveryV1().EndpointSlices(ns).List(ctx(t), metav1.ListOptions{LabelSelector: "kubernetes.io/service-name=graceful"})
		if err != nil {
			return false, err.Error()
		}
		for _, sl := range list.Items {
			for _, e := range sl.Endpoints {
				if e.Conditions.Terminating != nil && *e.Conditions.Terminating {
					return true, ""
				}
			}
		}
		return false, "not yet"
	})
	// Two seconds into the grace period.
	time.Sleep(2 * time.Second)
	r := f.Stop(lb)
	t.Logf("flow every 20 ms while the pod terminates: %s", r)
	checkFlow(t, r, "during the grace period")
	if src := sourceSeen(t, p, "udp", false, sandbox.UDPPort); src != lb {
		t.Errorf("a terminating pod's datagram left with %s, want %s", src, lb)
	}
	// The pod is gone: its rules and the address go.
	if err := cluster.DeletePod(ctx(t), p); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "rules and address removed", func() (bool, string) {
		return len(node.SNATRulesFor(ns+"/graceful")) == 0 && len(holders(lb)) == 0, fmt.Sprint(holders(lb))
	})
}
