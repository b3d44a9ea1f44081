//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/vishvananda/netlink"

	"github.com/egressvip/egressvip/pkg/annotations"
	"github.com/egressvip/egressvip/pkg/election"
	"github.com/egressvip/egressvip/testing/sandbox"
)

const ns = "default"

func ctx(t *testing.T) context.Context { return t.Context() }

// eventually polls cond every 50 ms for at most limit; the limit is a bound
// on a hang, not a performance assertion.
func eventually(t *testing.T, limit time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(limit)
	var last string
	for {
		ok, detail := cond()
		if ok {
			return
		}
		last = detail
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s: %s", limit, what, last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// service creates a LoadBalancer Service selecting app=name.
func service(t *testing.T, name string, local bool, ann map[string]string, mutate ...func(*corev1.Service)) *corev1.Service {
	t.Helper()
	policy := corev1.IPFamilyPolicyPreferDualStack
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Annotations: ann},
		Spec: corev1.ServiceSpec{
			Type:           corev1.ServiceTypeLoadBalancer,
			Selector:       map[string]string{"app": name},
			IPFamilyPolicy: &policy,
			Ports:          []corev1.ServicePort{{Name: "sip", Port: 5060, Protocol: corev1.ProtocolUDP}},
		},
	}
	svc.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyCluster
	if local {
		svc.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
	}
	for _, m := range mutate {
		m(svc)
	}
	created, err := cluster.Admin.CoreV1().Services(ns).Create(ctx(t), svc, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create Service %s: %v", name, err)
	}
	t.Cleanup(func() {
		_ = cluster.Admin.CoreV1().Services(ns).Delete(context.Background(), name, metav1.DeleteOptions{})
	})
	return created
}

func egressAnn(ips string, kv ...string) map[string]string {
	m := map[string]string{annotations.LoadBalancerIPs: ips, annotations.Egress: "true"}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return m
}

func runPod(t *testing.T, app string, node *sandbox.Node) *sandbox.Pod {
	t.Helper()
	p, err := cluster.RunPod(ctx(t), ns, fmt.Sprintf("%s-%d", app, time.Now().UnixNano()%100000), node, map[string]string{"app": app})
	if err != nil {
		t.Fatalf("run pod: %v", err)
	}
	t.Cleanup(func() { _ = cluster.DeletePod(context.Background(), p) })
	return p
}

func getService(t *testing.T, name string) *corev1.Service {
	t.Helper()
	svc, err := cluster.Admin.CoreV1().Services(ns).Get(ctx(t), name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("get Service %s: %v", name, err)
	}
	return svc
}

func leaseHolder(t *testing.T, service string) string {
	l, err := cluster.Admin.CoordinationV1().Leases(ns).Get(ctx(t), election.LeaseName(service), metav1.GetOptions{})
	if err != nil || l.Spec.HolderIdentity == nil {
		return ""
	}
	return *l.Spec.HolderIdentity
}

// heartbeatExpiry is the earliest moment node's heartbeat, as the API
// server has it now, can expire: its renewTime plus its duration.
func heartbeatExpiry(t *testing.T, node string) time.Time {
	t.Helper()
	l, err := cluster.Admin.CoordinationV1().Leases("egressvip").Get(ctx(t), election.HeartbeatName(node), metav1.GetOptions{})
	if err != nil || l.Spec.RenewTime == nil || l.Spec.LeaseDurationSeconds == nil {
		t.Fatalf("heartbeat of %q: %v %+v", node, err, l)
	}
	return l.Spec.RenewTime.Add(time.Duration(*l.Spec.LeaseDurationSeconds) * time.Second)
}

// waitHolder waits until exactly one node holds ip and returns it.
func waitHolder(t *testing.T, ip netip.Addr) *sandbox.Node {
	t.Helper()
	var holder *sandbox.Node
	eventually(t, 60*time.Second, fmt.Sprintf("one node holds %s", ip), func() (bool, string) {
		h := holders(ip)
		if len(h) != 1 {
			return false, fmt.Sprint(h)
		}
		holder = cluster.Node(h[0])
		return true, ""
	})
	return holder
}

// holders lists the nodes that hold ip.
func holders(ip netip.Addr) []string { return cluster.Holders(ip) }

// clusterIPService creates a dual-stack ClusterIP Service selecting
// app=app on UDP port and waits until kube-proxy serves both ClusterIPs
// on every node; it returns them.
func clusterIPService(t *testing.T, app string, port int32) []netip.Addr {
	t.Helper()
	policy := corev1.IPFamilyPolicyRequireDualStack
	name := app + "-svc"
	svc, err := cluster.Admin.CoreV1().Services(ns).Create(ctx(t), &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.ServiceSpec{
			Selector:       map[string]string{"app": app},
			IPFamilyPolicy: &policy,
			Ports:          []corev1.ServicePort{{Name: "udp", Port: port, Protocol: corev1.ProtocolUDP}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create Service %s: %v", name, err)
	}
	t.Cleanup(func() {
		_ = cluster.Admin.CoreV1().Services(ns).Delete(context.Background(), name, metav1.DeleteOptions{})
	})
	var ips []netip.Addr
	for _, s := range svc.Spec.ClusterIPs {
		ip := netip.MustParseAddr(s)
		if err := cluster.WaitProxied(ctx(t), ip, "udp", int(port), 30*time.Second); err != nil {
			t.Fatal(err)
		}
		ips = append(ips, ip)
	}
	return ips
}

// waitServed waits until exactly node holds every ip and, for egress
// Services, has its SNAT rule to each of them (the families are written
// one after the other), and no other node holds any of them.
func waitServed(t *testing.T, service string, node *sandbox.Node, egress bool, ips ...netip.Addr) {
	t.Helper()
	eventually(t, 60*time.Second, fmt.Sprintf("%s served by %s", service, node.Name), func() (bool, string) {
		for _, ip := range ips {
			if h := holders(ip); len(h) != 1 || h[0] != node.Name {
				return false, fmt.Sprintf("%s held by %v", ip, h)
			}
		}
		if egress {
			rules := node.SNATRulesFor(ns + "/" + service)
			for _, ip := range ips {
				if !slices.ContainsFunc(rules, func(r string) bool { return strings.Contains(r, "--to-source "+ip.String()) }) {
					return false, fmt.Sprintf("no SNAT rule to %s yet: %v", ip, rules)
				}
			}
		}
		return true, ""
	})
}

// sourceSeen sends from the pod and returns the source the external host saw.
func sourceSeen(t *testing.T, p *sandbox.Pod, proto string, ipv6 bool, port uint16) netip.Addr {
	t.Helper()
	payload := fmt.Sprintf("%s-%s-%d-%d", p.Name, proto, port, time.Now().UnixNano())
	src, err := cluster.Send(p, proto, netip.AddrPortFrom(sandbox.ExternalAddr(ipv6), port), payload, 5*time.Second)
	if err != nil {
		t.Fatalf("%s from %s to port %d: %v", proto, p.Name, port, err)
	}
	return src
}

// expectSource checks that TCP to 8080 and UDP to 5060 from the pod reach
// the external host (over IPv6 or IPv4) from want.
func expectSource(t *testing.T, p *sandbox.Pod, ipv6 bool, want netip.Addr) {
	t.Helper()
	for proto, port := range map[string]uint16{"tcp": sandbox.TCPPort, "udp": sandbox.UDPPort} {
		if src := sourceSeen(t, p, proto, ipv6, port); src != want {
			t.Errorf("%s from %s to port %d arrived from %s, want %s", proto, p.Name, port, src, want)
		}
	}
}

func events(t *testing.T, service string) []string {
	t.Helper()
	list, err := cluster.Admin.CoreV1().Events(ns).List(ctx(t), metav1.ListOptions{FieldSelector: "involvedObject.name=" + service})
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range list.Items {
		out = append(out, e.Type+" "+e.Reason+": "+e.Message)
	}
	return out
}

func waitEvent(t *testing.T, service, reason, contains string) {
	t.Helper()
	eventually(t, 30*time.Second, fmt.Sprintf("event %s on %s", reason, service), func() (bool, string) {
		evs := events(t, service)
		for _, e := range evs {
			if strings.Contains(e, "Warning "+reason) && strings.Contains(e, contains) {
				return true, ""
			}
		}
		return false, strings.Join(evs, "; ")
	})
}

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }

// httpGet fetches path from the daemon's metrics listener in node's namespace.
func httpGet(t *testing.T, node *sandbox.Node, path string) string {
	t.Helper()
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: sandbox.DialIn(node.NS)}}
	resp, err := client.Get("http://127.0.0.1:2112" + path)
	if err != nil {
		t.Fatalf("GET %s on %s: %v", path, node.Name, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return string(body)
}

// daemonNS is the daemon's namespace (manifests/: POD_NAMESPACE).
const daemonNS = "egressvip"

// createNamespace creates a namespace for the test, deleted after it.
func createNamespace(t *testing.T, name string) {
	t.Helper()
	// A namespace of the same name an earlier scenario deleted may still
	// be terminating: wait until it is gone.
	eventually(t, 90*time.Second, "namespace "+name+" created", func() (bool, string) {
		_, err := cluster.Admin.CoreV1().Namespaces().Create(ctx(t), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
		if err == nil {
			return true, ""
		}
		if !apierrors.IsAlreadyExists(err) {
			return false, err.Error()
		}
		cur, gerr := cluster.Admin.CoreV1().Namespaces().Get(ctx(t), name, metav1.GetOptions{})
		if gerr != nil {
			return false, gerr.Error()
		}
		return cur.Status.Phase == corev1.NamespaceActive && cur.DeletionTimestamp == nil, "terminating"
	})
	t.Cleanup(func() {
		_ = cluster.Admin.CoreV1().Namespaces().Delete(context.Background(), name, metav1.DeleteOptions{})
	})
	eventually(t, 30*time.Second, "the default ServiceAccount of "+name, func() (bool, string) {
		_, err := cluster.Admin.CoreV1().ServiceAccounts(name).Get(ctx(t), "default", metav1.GetOptions{})
		return err == nil, fmt.Sprint(err)
	})
}

// createServiceObj creates a Service as given, deleted after the test.
func createServiceObj(t *testing.T, svc *corev1.Service) *corev1.Service {
	t.Helper()
	created, err := cluster.Admin.CoreV1().Services(svc.Namespace).Create(ctx(t), svc, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create Service %s/%s: %v", svc.Namespace, svc.Name, err)
	}
	t.Cleanup(func() {
		_ = cluster.Admin.CoreV1().Services(svc.Namespace).Delete(context.Background(), svc.Name, metav1.DeleteOptions{})
	})
	return created
}

// createService creates a LoadBalancer Service selecting app=name in a
// namespace.
func createService(t *testing.T, namespace, name string, local bool, ann map[string]string) *corev1.Service {
	t.Helper()
	policy := corev1.IPFamilyPolicyPreferDualStack
	traffic := corev1.ServiceExternalTrafficPolicyCluster
	if local {
		traffic = corev1.ServiceExternalTrafficPolicyLocal
	}
	return createServiceObj(t, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name, Annotations: ann},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeLoadBalancer, Selector: map[string]string{"app": name}, IPFamilyPolicy: &policy,
			ExternalTrafficPolicy: traffic, Ports: []corev1.ServicePort{{Name: "sip", Port: 5060, Protocol: corev1.ProtocolUDP}}},
	})
}

// annotate sets one annotation of a Service.
func annotate(t *testing.T, namespace, name, key, value string) {
	t.Helper()
	body := fmt.Sprintf(`{"metadata":{"annotations":{%q:%q}}}`, key, value)
	if _, err := cluster.Admin.CoreV1().Services(namespace).Patch(ctx(t), name, types.MergePatchType, []byte(body), metav1.PatchOptions{}); err != nil {
		t.Fatalf("annotate %s/%s: %v", namespace, name, err)
	}
}

// waitServedIn waits until exactly node holds every ip of a Service of
// another namespace, and its status shows them.
func waitServedIn(t *testing.T, namespace, name string, node *sandbox.Node, ips ...netip.Addr) {
	t.Helper()
	eventually(t, 60*time.Second, fmt.Sprintf("%s/%s served by %s", namespace, name, node.Name), func() (bool, string) {
		for _, ip := range ips {
			if h := holders(ip); len(h) != 1 || h[0] != node.Name {
				return false, fmt.Sprintf("%s held by %v", ip, h)
			}
		}
		svc, err := cluster.Admin.CoreV1().Services(namespace).Get(ctx(t), name, metav1.GetOptions{})
		if err != nil || len(svc.Status.LoadBalancer.Ingress) != len(ips) {
			return false, fmt.Sprint(err)
		}
		return true, ""
	})
}

// eventsIn lists the Events of an object of a namespace ("" name: all).
func eventsIn(t *testing.T, namespace, name string) []string {
	t.Helper()
	opts := metav1.ListOptions{}
	if name != "" {
		opts.FieldSelector = "involvedObject.name=" + name
	}
	list, err := cluster.Admin.CoreV1().Events(namespace).List(ctx(t), opts)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range list.Items {
		out = append(out, e.Type+" "+e.Reason+": "+e.Message)
	}
	return out
}

// waitWarningIn waits for a Warning Event with reason (and text contains)
// on an object of a namespace ("" name: any object).
func waitWarningIn(t *testing.T, namespace, name, reason, contains string) {
	t.Helper()
	eventually(t, 30*time.Second, fmt.Sprintf("event %s on %s/%s", reason, namespace, name), func() (bool, string) {
		evs := eventsIn(t, namespace, name)
		for _, e := range evs {
			if strings.Contains(e, "Warning "+reason) && strings.Contains(e, contains) {
				return true, ""
			}
		}
		return false, strings.Join(evs, "; ")
	})
}

// leaseHolderIn is the holder of a Lease ("" when none).
func leaseHolderIn(t *testing.T, namespace, name string) string {
	l, err := cluster.Admin.CoordinationV1().Leases(namespace).Get(ctx(t), name, metav1.GetOptions{})
	if err != nil || l.Spec.HolderIdentity == nil {
		return ""
	}
	return *l.Spec.HolderIdentity
}

// setPools writes kube-vip-cloud-provider's ConfigMap (kubevip in
// kube-system), removed after the test.
func setPools(t *testing.T, data map[string]string) {
	t.Helper()
	cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: "kube-system", Name: "kubevip"}, Data: data}
	cms := cluster.Admin.CoreV1().ConfigMaps("kube-system")
	if _, err := cms.Create(ctx(t), cm, metav1.CreateOptions{}); err != nil {
		if _, err := cms.Update(ctx(t), cm, metav1.UpdateOptions{}); err != nil {
			t.Fatalf("kubevip ConfigMap: %v", err)
		}
	}
	t.Cleanup(func() { _ = cms.Delete(context.Background(), "kubevip", metav1.DeleteOptions{}) })
}

// waitAllocated waits until n Services of a namespace carry an allocated
// address, and returns them by Service.
func waitAllocated(t *testing.T, namespace string, n int, limit time.Duration) map[string]string {
	t.Helper()
	var got map[string]string
	eventually(t, limit, fmt.Sprintf("%d Services of %s allocated", n, namespace), func() (bool, string) {
		list, err := cluster.Admin.CoreV1().Services(namespace).List(ctx(t), metav1.ListOptions{})
		if err != nil {
			return false, err.Error()
		}
		got = map[string]string{}
		for _, s := range list.Items {
			if a := s.Annotations[annotations.LoadBalancerIPs]; a != "" {
				got[s.Name] = a
			}
		}
		return len(got) >= n, fmt.Sprintf("%d allocated", len(got))
	})
	return got
}

// steeredVia is the next hop node n's steering rule for the pod address
// pod leads to (the default route of the rule's table), or the zero Addr
// when the pod has no steering rule there (or the table no such route).
func steeredVia(n *sandbox.Node, pod netip.Addr) (netip.Addr, error) {
	var gw netip.Addr
	fam := netlink.FAMILY_V4
	if pod.Is6() {
		fam = netlink.FAMILY_V6
	}
	err := sandbox.Do(n.NS, func() error {
		rules, err := netlink.RuleList(fam)
		if err != nil {
			return err
		}
		table := 0
		for _, r := range rules {
			if r.Src == nil || r.Table <= 0 {
				continue
			}
			ip, ok := netip.AddrFromSlice(r.Src.IP)
			if ones, bits := r.Src.Mask.Size(); ok && ip.Unmap() == pod && ones == bits {
				table = r.Table
			}
		}
		if table == 0 {
			return nil
		}
		routes, err := netlink.RouteListFiltered(fam, &netlink.Route{Table: table}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return err
		}
		for _, rt := range routes {
			if rt.Gw != nil && (rt.Dst == nil || rt.Dst.IP.IsUnspecified()) {
				gw, _ = netip.AddrFromSlice(rt.Gw)
				gw = gw.Unmap()
			}
		}
		return nil
	})
	return gw, err
}

// nodeAddrs are every address of node n the steering may use as next hop.
func nodeAddrs(n *sandbox.Node) []netip.Addr {
	return []netip.Addr{n.IP4, n.IP6, n.ExtIP4, n.ExtIP6}
}
