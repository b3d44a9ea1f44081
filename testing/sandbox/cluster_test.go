//go:build e2e

package sandbox

// The harness on a real cluster (make test-sandbox, as root): kube-proxy in
// both modes and switched, the Service helpers, the pod life cycle,
// inbound requests, an earlier release, the routed topology, and the root
// network namespace left as it was.

import (
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/egressvip/egressvip/internal/privtest"
)

// releaseCommit is the release the upgrade tests run: the last commit
// before the heartbeat election (one client-go leader elector per Service).
const releaseCommit = "dfe6cad"

// rootState is what the sandbox must leave alone in the root network
// namespace (this test runs there): host-wide and root-namespace
// netfilter settings, firewall rulesets, addresses and routes.
func rootState(t *testing.T) string {
	t.Helper()
	var b strings.Builder
	files, _ := filepath.Glob("/proc/sys/net/netfilter/*")
	files = append(files, "/sys/module/nf_conntrack/parameters/hashsize", "/proc/sys/net/ipv4/conf/all/route_localnet",
		"/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding")
	for _, f := range files {
		if strings.HasSuffix(f, "_count") {
			continue // counters, not settings
		}
		data, err := os.ReadFile(f)
		fmt.Fprintf(&b, "%s: %s %v\n", f, strings.TrimSpace(string(data)), err)
	}
	for _, cmd := range [][]string{
		{"nft", "list", "ruleset"},
		{"iptables-legacy-save"}, {"ip6tables-legacy-save"}, {"iptables-nft-save"}, {"ip6tables-nft-save"},
		{"ip", "-o", "addr"}, {"ip", "route", "show", "table", "all"}, {"ip", "-6", "route", "show", "table", "all"},
	} {
		out, _ := exec.Command(cmd[0], cmd[1:]...).CombinedOutput()
		fmt.Fprintf(&b, "## %s\n", strings.Join(cmd, " "))
		for _, l := range strings.Split(string(out), "\n") {
			if !strings.HasPrefix(l, "#") { // iptables-save's dated comments
				b.WriteString(l + "\n")
			}
		}
	}
	return b.String()
}

// startCluster starts a sandbox for the test and, after it, stops it and
// checks that the root namespace is as before.
func startCluster(t *testing.T, opts Options) *Cluster {
	t.Helper()
	privtest.Require(t, "nft", "iptables-save", "etcd")
	before := rootState(t)
	opts.Logf = t.Logf
	opts.Controllers = append(opts.Controllers, "garbagecollector")
	c, err := Start(t.Context(), opts)
	if err != nil {
		if c != nil {
			t.Logf("logs in %s", c.Dir)
		}
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.Stop()
		if after := rootState(t); after != before {
			t.Errorf("the root network namespace changed:\n%s", lineDiff(before, after))
		}
		if t.Failed() {
			t.Logf("logs kept in %s", c.Dir)
		} else {
			_ = os.RemoveAll(c.Dir)
		}
	})
	return c
}

// lineDiff lists the lines only one of a and b has.
func lineDiff(a, b string) string {
	al, bl := strings.Split(a, "\n"), strings.Split(b, "\n")
	var out []string
	for _, l := range al {
		if !slices.Contains(bl, l) {
			out = append(out, "- "+l)
		}
	}
	for _, l := range bl {
		if !slices.Contains(al, l) {
			out = append(out, "+ "+l)
		}
	}
	return strings.Join(out, "\n")
}

func eventually(t *testing.T, limit time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		ok, detail := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s: %s", limit, what, detail)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestCluster(t *testing.T) {
	c := startCluster(t, Options{Nodes: 2})
	ctx := t.Context()
	n1, n2 := c.Nodes[0], c.Nodes[1]
	plain, err := c.RunPod(ctx, "default", "plain", n1, map[string]string{"app": "plain"})
	if err != nil {
		t.Fatal(err)
	}
	ext, err := c.CreateExternalService(ctx, "default", "external")
	if err != nil {
		t.Fatal(err)
	}

	// Every mode's kube-proxy serves the same: the kubernetes Service, an
	// external Service, a LoadBalancer and a NodePort.
	checkProxy := func(t *testing.T, web *Pod, lbs []netip.Addr, nodePort int32) {
		for _, n := range c.Nodes {
			p := plain
			if n != n1 {
				p = web
			}
			if _, err := c.DialAPIServerFrom(ctx, p); err != nil {
				t.Errorf("the kubernetes Service from %s: %v", n.Name, err)
			}
		}
		if err := c.WaitProxied(ctx, ext.ClusterIP4, "tcp", TCPPort, 30*time.Second); err != nil {
			t.Fatal(err)
		}
		for _, v6 := range []bool{false, true} {
			want := n1.ExtIP4
			if v6 {
				want = n1.ExtIP6
			}
			for proto, port := range map[string]uint16{"tcp": TCPPort, "udp": UDPPort} {
				dst := netip.AddrPortFrom(ext.ClusterIP(v6), port)
				src, err := c.Send(plain, proto, dst, fmt.Sprintf("ext-%s-%d", proto, time.Now().UnixNano()), 5*time.Second)
				if err != nil || src != want {
					t.Errorf("%s from a pod to the external Service %s: source %s, %v; want the node address %s", proto, dst, src, err, want)
				}
			}
		}
		for _, lb := range lbs {
			for proto, port := range map[string]uint16{"tcp": 8080, "udp": 5060} {
				dst := netip.AddrPortFrom(lb, port)
				var r Reply
				eventually(t, 30*time.Second, fmt.Sprintf("%s to the LoadBalancer IP %s", proto, dst), func() (bool, string) {
					var err error
					r, err = c.External.Request(proto, dst, time.Second)
					return err == nil, fmt.Sprint(err)
				})
				if r.Pod != web.Name || r.Seen.Addr() != ExternalAddr(lb.Is6()) || r.From != dst {
					t.Errorf("%s to %s: %+v; want %s, seen from the external host, answered from %s", proto, dst, r, web.Name, dst)
				}
			}
		}
		dst := netip.AddrPortFrom(n2.ExtIP4, uint16(nodePort))
		r, err := c.External.Request("tcp", dst, 5*time.Second)
		if err != nil || r.Pod != web.Name || r.From != dst {
			t.Errorf("NodePort %s: %+v, %v", dst, r, err)
		}
	}

	// A LoadBalancer Service with a pod that serves.
	lb4, lb6 := netip.MustParseAddr("203.0.113.120"), netip.MustParseAddr("2001:db8:1::120")
	policy := corev1.IPFamilyPolicyPreferDualStack
	svc, err := c.Admin.CoreV1().Services("default").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "web", Annotations: map[string]string{
			"kube-vip.io/loadbalancerIPs": lb4.String() + "," + lb6.String()}},
		Spec: corev1.ServiceSpec{
			Type: corev1.ServiceTypeLoadBalancer, ExternalTrafficPolicy: corev1.ServiceExternalTrafficPolicyLocal,
			Selector: map[string]string{"app": "web"}, IPFamilyPolicy: &policy,
			Ports: []corev1.ServicePort{{Name: "tcp", Port: 8080, Protocol: corev1.ProtocolTCP}, {Name: "udp", Port: 5060, Protocol: corev1.ProtocolUDP}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}

	var web *Pod
	t.Run("pod life cycle", func(t *testing.T) {
		web, err = c.CreatePod(ctx, "default", "web-1", n2, map[string]string{"app": "web"})
		if err != nil {
			t.Fatal(err)
		}
		status := func() corev1.PodStatus {
			p, err := c.Admin.CoreV1().Pods("default").Get(ctx, web.Name, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			return p.Status
		}
		podReady := func(s corev1.PodStatus) bool {
			return slices.ContainsFunc(s.Conditions, func(c corev1.PodCondition) bool {
				return c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue
			})
		}
		if s := status(); s.Phase != corev1.PodPending || len(s.PodIPs) != 0 || podReady(s) {
			t.Errorf("created: phase %s, IPs %v, ready %v; want Pending without addresses", s.Phase, s.PodIPs, podReady(s))
		}
		if out, _ := sh("ip", "netns", "list"); strings.Contains(out, web.NS+" ") || strings.Contains(out, web.NS+"\n") {
			t.Errorf("a Pending pod has its namespace %s", web.NS)
		}
		if err := c.StartPod(ctx, web); err != nil {
			t.Fatal(err)
		}
		if s := status(); s.Phase != corev1.PodRunning || len(s.PodIPs) != 2 || s.PodIP != web.IP4.String() || podReady(s) {
			t.Errorf("started: phase %s, IPs %v, ready %v; want Running with both addresses, not Ready", s.Phase, s.PodIPs, podReady(s))
		}
		// It can send at once.
		if src, err := c.Send(web, "udp", netip.AddrPortFrom(ExternalAddr(false), UDPPort), fmt.Sprintf("not-ready-%d", time.Now().UnixNano()), 5*time.Second); err != nil || src != n2.ExtIP4 {
			t.Errorf("a Running pod sent from %s, %v; want the node address %s", src, err, n2.ExtIP4)
		}
		endpoint := func(want bool) func() (bool, string) {
			return func() (bool, string) {
				list, err := c.Admin.DiscoveryV1().EndpointSlices("default").List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=web"})
				if err != nil {
					return false, err.Error()
				}
				var seen []string
				for _, sl := range list.Items {
					for _, e := range sl.Endpoints {
						ready := e.Conditions.Ready != nil && *e.Conditions.Ready
						seen = append(seen, fmt.Sprintf("%v ready=%v", e.Addresses, ready))
						if slices.Contains(e.Addresses, web.IP4.String()) && ready == want {
							return true, ""
						}
					}
				}
				return false, strings.Join(seen, "; ")
			}
		}
		eventually(t, 30*time.Second, "a not-ready endpoint", endpoint(false))
		if err := c.SetPodReady(ctx, web, true); err != nil {
			t.Fatal(err)
		}
		if s := status(); !podReady(s) {
			t.Errorf("SetPodReady: conditions %v", s.Conditions)
		}
		eventually(t, 30*time.Second, "a ready endpoint", endpoint(true))
	})
	if web == nil || t.Failed() {
		t.FailNow()
	}
	for _, proto := range []string{"tcp", "udp"} {
		port := map[string]int{"tcp": 8080, "udp": 5060}[proto]
		if err := web.Serve(proto, port); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, 60*time.Second, "the LoadBalancer IPs bound on the pod's node", func() (bool, string) {
		h4, h6 := c.Holders(lb4), c.Holders(lb6)
		return slices.Equal(h4, []string{n2.Name}) && slices.Equal(h6, []string{n2.Name}), fmt.Sprint(h4, h6)
	})
	nodePort := svc.Spec.Ports[0].NodePort

	for _, mode := range []string{KubeProxyNFTables, KubeProxyIPTables, KubeProxyNone, KubeProxyNFTables} {
		t.Run("kube-proxy "+mode, func(t *testing.T) {
			if c.KubeProxyMode() != mode {
				start := time.Now()
				if err := c.SetKubeProxyMode(ctx, mode); err != nil {
					t.Fatal(err)
				}
				t.Logf("switched to %s in %s", mode, time.Since(start).Round(time.Millisecond))
			}
			for _, n := range c.Nodes {
				nft, ipt := hasNFTTable(n, "ip", "kube-proxy") || hasNFTTable(n, "ip6", "kube-proxy"), hasKubeChains(n)
				if nft != (mode == KubeProxyNFTables) || ipt != (mode == KubeProxyIPTables) {
					t.Errorf("%s: kube-proxy's nftables table %v, iptables chains %v in mode %s", n.Name, nft, ipt, mode)
				}
			}
			if mode == KubeProxyNone {
				if _, err := c.DialAPIServerFrom(ctx, plain); err == nil {
					t.Error("the kubernetes Service answers without kube-proxy")
				}
				if _, err := c.CreateExternalService(ctx, "default", "no-proxy"); err == nil {
					t.Error("an external Service without kube-proxy")
				}
				return
			}
			checkProxy(t, web, []netip.Addr{lb4, lb6}, nodePort)
		})
	}

	t.Run("pod to pod through a Service", func(t *testing.T) {
		to := netip.AddrPortFrom(netip.MustParseAddr(svc.Spec.ClusterIPs[0]), 8080)
		r, err := plain.Request("tcp", to, 5*time.Second)
		if err != nil || r.Pod != web.Name || r.Seen.Addr() != plain.IP4 {
			t.Errorf("pod to the ClusterIP %s: %+v, %v; want %s seeing the pod IP %s", to, r, err, web.Name, plain.IP4)
		}
	})

	t.Run("release "+releaseCommit, func(t *testing.T) {
		if _, err := resolveCommit(releaseCommit); err != nil {
			if strings.Contains(err.Error(), "shallow") {
				t.Skip(err)
			}
			t.Fatal(err)
		}
		start := time.Now()
		bin, err := BuildRelease(releaseCommit)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("release binary %s (%s)", bin, time.Since(start).Round(time.Millisecond))
		if err := c.ApplyReleaseRBAC(ctx, releaseCommit); err != nil {
			t.Fatal(err)
		}
		env, err := c.ReleaseDaemonEnv(n1, releaseCommit)
		if err != nil {
			t.Fatal(err)
		}
		if slices.ContainsFunc(env, func(e string) bool { return strings.HasPrefix(e, "POD_NAMESPACE=") }) {
			t.Errorf("the release's DaemonSet env has POD_NAMESPACE, which came later: %v", env)
		}
		if _, err := c.StopDaemon(n1, syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		logStart := fileSize(n1.LogPath)
		if err := c.StartDaemonWith(n1, bin, env); err != nil {
			t.Fatal(err)
		}
		client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DialContext: DialIn(n1.NS), DisableKeepAlives: true}}
		eventually(t, 60*time.Second, "the release's /readyz", func() (bool, string) {
			resp, err := client.Get("http://127.0.0.1:2112/readyz")
			if err != nil {
				return false, err.Error()
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(resp.Body)
			return resp.StatusCode == http.StatusOK, resp.Status + " " + string(body)
		})
		if log := readFrom(n1.LogPath, logStart); strings.Contains(log, "forbidden") {
			t.Errorf("the release was refused by RBAC:\n%s", log)
		}
		if _, err := c.StopDaemon(n1, syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if err := c.StartDaemon(n1); err != nil {
			t.Fatal(err)
		}
	})
}

func fileSize(path string) int64 {
	st, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return st.Size()
}

func readFrom(path string, off int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	_, _ = f.Seek(off, io.SeekStart)
	b, _ := io.ReadAll(f)
	return string(b)
}

// Routed nodes: no two nodes share the node network's L2 segment, and
// pods reach each other across nodes through the router.
func TestRoutedNodes(t *testing.T) {
	c := startCluster(t, Options{Nodes: 2, RoutedNodes: true})
	ctx := t.Context()
	n1, n2 := c.Nodes[0], c.Nodes[1]
	for _, pair := range [][2]*Node{{n1, n2}, {n2, n1}} {
		for _, dst := range []netip.Addr{pair[1].IP4, pair[1].IP6} {
			out, err := sh("ip", "-n", pair[0].NS, "route", "get", dst.String())
			if err != nil || !strings.Contains(out, " via ") {
				t.Errorf("%s reaches %s's InternalIP %s on link, want through the router: %s %v", pair[0].Name, pair[1].Name, dst, out, err)
			}
		}
	}
	a, err := c.RunPod(ctx, "default", "a", n1, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, err := c.RunPod(ctx, "default", "b", n2, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []*Pod{a, b} {
		if err := p.Serve("tcp", 7000); err != nil {
			t.Fatal(err)
		}
		if err := p.Serve("udp", 7000); err != nil {
			t.Fatal(err)
		}
	}
	for _, pair := range [][2]*Pod{{a, b}, {b, a}} {
		for _, dst := range []netip.Addr{pair[1].IP4, pair[1].IP6} {
			for _, proto := range []string{"tcp", "udp"} {
				r, err := pair[0].Request(proto, netip.AddrPortFrom(dst, 7000), 5*time.Second)
				want := pair[0].IP4
				if dst.Is6() {
					want = pair[0].IP6
				}
				if err != nil || r.Pod != pair[1].Name || r.Seen.Addr() != want {
					t.Errorf("%s from %s to %s: %+v, %v; want %s seeing %s", proto, pair[0].Name, dst, r, err, pair[1].Name, want)
				}
			}
		}
	}
	if _, err := c.DialAPIServerFrom(ctx, a); err != nil {
		t.Errorf("the kubernetes Service across the router: %v", err)
	}
}
