package explain

import (
	"fmt"
	"net/netip"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/pkg/election"
)

// The fixture cluster: three nodes on 198.51.100.0/24, pod ranges
// 10.244.<n>.0/24, egressvip's namespace "egressvip", lease timing 5/3/1.
const daemonNS = "egressvip"

var (
	now    = time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	timing = election.Timing{LeaseDuration: 5 * time.Second, RenewDeadline: 3 * time.Second, RetryPeriod: time.Second}
	nodes  = []string{"node-a", "node-b", "node-c"}
)

func testConfig() Config {
	return Config{DaemonNamespace: daemonNS, Timing: timing}
}

func nodeIP(node string) string {
	for i, n := range nodes {
		if n == node {
			return fmt.Sprintf("198.51.100.%d", 11+i)
		}
	}
	return "198.51.100.99"
}

func podIP(node string, host int) string {
	for i, n := range nodes {
		if n == node {
			return fmt.Sprintf("10.244.%d.%d", i+1, host)
		}
	}
	return "10.244.99.1"
}

// cluster is a fixture under construction.
type cluster struct{ objs Objects }

// newCluster has the three nodes with a fresh heartbeat each.
func newCluster() *cluster {
	c := &cluster{}
	for i, n := range nodes {
		c.objs.Nodes = append(c.objs.Nodes, &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: n, UID: types.UID("uid-" + n)},
			Spec:       corev1.NodeSpec{PodCIDRs: []string{fmt.Sprintf("10.244.%d.0/24", i+1)}},
			Status:     corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: nodeIP(n)}}},
		})
		c.heartbeat(n, time.Duration(i+3)*100*time.Millisecond, `{"version":2,"standing":true,"via":["`+nodeIP(n)+`"]}`)
	}
	return c
}

// heartbeat adds (or replaces) node's heartbeat, renewed ago before now.
func (c *cluster) heartbeat(node string, ago time.Duration, record string) {
	holder, secs := node, int32(5)
	l := &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Namespace: daemonNS, Name: election.HeartbeatName(node),
			Labels:      map[string]string{election.LabelManagedBy: election.ManagedBy, election.LabelRole: election.RoleHeartbeat},
			Annotations: map[string]string{election.AnnotationNode: record, election.AnnotationAddresses: ""}},
		Spec: coordinationv1.LeaseSpec{HolderIdentity: &holder, LeaseDurationSeconds: &secs,
			RenewTime: &metav1.MicroTime{Time: now.Add(-ago)}},
	}
	for i, old := range c.objs.Leases {
		if old.Namespace == l.Namespace && old.Name == l.Name {
			c.objs.Leases[i] = l
			return
		}
	}
	c.objs.Leases = append(c.objs.Leases, l)
}

// service adds a LoadBalancer Service of namespace ns selecting app=name.
func (c *cluster) service(ns, name, ips string, egress, local bool) *corev1.Service {
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID("uid-" + ns + "-" + name),
			CreationTimestamp: metav1.NewTime(now.Add(-time.Hour)),
			Annotations:       map[string]string{annotations.LoadBalancerIPs: ips}},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeLoadBalancer, Selector: map[string]string{"app": name},
			ExternalTrafficPolicy: corev1.ServiceExternalTrafficPolicyCluster},
	}
	if egress {
		s.Annotations[annotations.Egress] = "true"
	}
	if local {
		s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
	}
	c.objs.Services = append(c.objs.Services, s)
	return s
}

// pod adds a running pod of app on node with address ip.
func (c *cluster) pod(ns, name, app, node, ip string) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{"app": app}},
		Spec:       corev1.PodSpec{NodeName: node},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}},
	}
	c.objs.Pods = append(c.objs.Pods, p)
	return p
}

// endpoint is one entry of an EndpointSlice.
type endpoint struct {
	pod, ns, node, ip string
	ready             bool
}

// slice adds the IPv4 EndpointSlice of a Service.
func (c *cluster) slice(ns, svc string, eps ...endpoint) {
	sl := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: ns, Name: svc + "-abcde", Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		AddressType: discoveryv1.AddressTypeIPv4,
	}
	for _, e := range eps {
		ready, node := e.ready, e.node
		ep := discoveryv1.Endpoint{Addresses: []string{e.ip}, NodeName: &node,
			Conditions: discoveryv1.EndpointConditions{Ready: &ready, Serving: &ready}}
		if e.pod != "" {
			ep.TargetRef = &corev1.ObjectReference{Kind: "Pod", Namespace: e.ns, Name: e.pod}
		}
		sl.Endpoints = append(sl.Endpoints, ep)
	}
	c.objs.EndpointSlices = append(c.objs.EndpointSlices, sl)
}

// holds makes node hold the Service's address and Service Leases.
func (c *cluster) holds(node string, svc types.NamespacedName, ips ...string) {
	for _, ip := range ips {
		holder := node
		c.objs.Leases = append(c.objs.Leases, &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Namespace: daemonNS, Name: election.AddressLeaseName(netip.MustParseAddr(ip)),
				Labels:      map[string]string{election.LabelManagedBy: election.ManagedBy, election.LabelRole: election.RoleAddress},
				Annotations: map[string]string{election.AnnotationAddress: ip, election.AnnotationClaimedBy: svc.Namespace}},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: &holder},
		})
	}
	holder, secs := node, int32(election.LegacyHoldSeconds)
	c.objs.Leases = append(c.objs.Leases, &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Namespace: svc.Namespace, Name: election.LeaseName(svc.Name),
			Labels: map[string]string{election.LabelManagedBy: election.ManagedBy, election.LabelRole: election.RoleService},
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "v1", Kind: "Service", Name: svc.Name,
				UID: types.UID("uid-" + svc.Namespace + "-" + svc.Name)}}},
		Spec: coordinationv1.LeaseSpec{HolderIdentity: &holder, LeaseDurationSeconds: &secs,
			RenewTime: &metav1.MicroTime{Time: now.Add(-time.Minute)}},
	})
}

// served is an egress Service (policy Local) with a ready pod on node-a
// and one on node-b; node-b holds its address: client-0 is steered to
// node-b, client-1 leaves there.
func served() *cluster {
	c := newCluster()
	svc := c.service("default", "sip-client", "203.0.113.10", true, true)
	svc.Annotations[annotations.EgressDestinationPorts] = "udp:5060"
	svc.Annotations[annotations.VIPHost] = "node-b"
	svc.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: "203.0.113.10"}}
	c.pod("default", "sip-client-0", "sip-client", "node-a", podIP("node-a", 5))
	c.pod("default", "sip-client-1", "sip-client", "node-b", podIP("node-b", 7))
	c.slice("default", "sip-client",
		endpoint{pod: "sip-client-0", ns: "default", node: "node-a", ip: podIP("node-a", 5), ready: true},
		endpoint{pod: "sip-client-1", ns: "default", node: "node-b", ip: podIP("node-b", 7), ready: true})
	c.holds("node-b", types.NamespacedName{Namespace: "default", Name: "sip-client"}, "203.0.113.10")
	return c
}
