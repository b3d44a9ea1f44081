package sandbox

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// Network plan. Documentation ranges only, and only inside namespaces.
const (
	nodeNet4    = "198.51.100."
	nodeNet6    = "2001:db8:100::"
	extNet4     = "203.0.113."
	extNet6     = "2001:db8:1::"
	clusterCIDR = "10.244.0.0/16,fd00:10:244::/56"
	serviceCIDR = "10.96.0.0/16,fd00:10:96::/112"
	// ExternalHost4 and ExternalHost6 are the external host's addresses.
	ExternalHost4 = extNet4 + "250"
	ExternalHost6 = extNet6 + "250"
	// ExternalSecond4 and ExternalSecond6 are the external host's second
	// addresses (its servers answer on both).
	ExternalSecond4 = extNet4 + "251"
	ExternalSecond6 = extNet6 + "251"
	apiServerIP     = nodeNet4 + "1"
)

// This run's fixed namespaces.
var (
	fabricNS   = nsName("fabric")
	controlNS  = nsName("cp")
	externalNS = nsName("ext")
	routerNS   = nsName("rt") // only with Options.RoutedNodes
)

// PodCIDR4 and PodCIDR6 are the cluster's pod ranges.
var (
	PodCIDR4 = netip.MustParsePrefix("10.244.0.0/16")
	PodCIDR6 = netip.MustParsePrefix("fd00:10:244::/56")
)

// Options configure a sandbox cluster.
type Options struct {
	Nodes int
	// Dir holds certificates, kubeconfigs and logs; a temporary directory
	// when empty (kept only on failure).
	Dir string
	// Logf receives progress lines.
	Logf func(format string, args ...any)
	// DaemonEnv is added to (and overrides) the DaemonSet's environment.
	DaemonEnv map[string]string
	// ControllerManagerQPS, when positive, is kube-controller-manager's
	// --kube-api-qps (burst twice that), and the EndpointSlice controller
	// gets more workers, so that thousands of Services are not throttled
	// by the controller manager. 0 keeps kube-controller-manager's defaults.
	ControllerManagerQPS int
	// NodeCIDRMaskSizeIPv4 and NodeCIDRMaskSizeIPv6 are the sizes of the
	// pod ranges node-ipam gives each node (inside PodCIDR4 and PodCIDR6);
	// 0 means /24 and /64. A smaller IPv4 mask (such as 20) leaves room
	// for thousands of pods per node; PodCIDR4 then holds fewer nodes.
	NodeCIDRMaskSizeIPv4, NodeCIDRMaskSizeIPv6 int
	// Controllers are added to the controllers kube-controller-manager
	// runs (endpointslice, serviceaccount, serviceaccount-token, nodeipam);
	// for example "namespace", so that deleted namespaces go away.
	Controllers []string
	// AdminQPS is the Admin client's client-side rate limit (burst twice
	// that); 0 means 100.
	AdminQPS int
	// RoutedNodes puts every node's node-network interface (eth0, its
	// InternalIP) on a subnet of its own, with a router namespace between
	// the subnets, the control plane's and the pod ranges (routed to each
	// node's address): nodes share no L2 segment on the node network. The
	// external network (eth1) stays one segment. At most 15 nodes.
	RoutedNodes bool
	// KubeProxyMode is the mode of the kube-proxy that runs in every node
	// namespace: KubeProxyNFTables (the default when empty),
	// KubeProxyIPTables or KubeProxyNone. SetKubeProxyMode changes it on a
	// running cluster.
	KubeProxyMode string
}

// Cluster is a running sandbox.
type Cluster struct {
	opts Options
	Dir  string
	bins Binaries

	// Admin is a cluster-admin client whose sockets live in the
	// control-plane namespace.
	Admin       kubernetes.Interface
	AdminConfig *rest.Config
	Nodes       []*Node
	External    *External

	lock      *os.File // held while this run's namespaces exist
	mu        sync.Mutex
	procs     []*exec.Cmd
	apiServer *exec.Cmd
	pods      map[string]*Pod
	podSeq    int
	// closers are servers the harness started in namespaces, closed at
	// teardown.
	closers   []func() error
	linkSeq   int
	daemonK   string // the daemon's kubeconfig
	proxyMode string // the nodes' kube-proxy mode
}

// Node is one node namespace.
type Node struct {
	Name   string
	NS     string
	IP4    netip.Addr // node network
	IP6    netip.Addr
	ExtIP4 netip.Addr // external network (the serviceInterface, eth1)
	ExtIP6 netip.Addr
	// PodCIDRs come from kube-controller-manager's node-ipam controller.
	PodCIDRs []netip.Prefix

	mu      sync.Mutex
	daemon  *exec.Cmd
	exited  chan struct{}
	LogPath string
	nextPod int
	env     map[string]string // per-node overrides of the daemon's environment

	proxy       *exec.Cmd // kube-proxy
	proxyExited chan struct{}
	nl          *nodeLink // netlink handle in NS, opened on first use
	// gw4 and gw6 are the router's addresses on the node's subnet
	// (RoutedNodes); invalid on the one-segment node network.
	gw4, gw6 netip.Addr
}

func (c *Cluster) logf(format string, args ...any) {
	if c.opts.Logf != nil {
		c.opts.Logf(format, args...)
	}
}

// Start brings a cluster up. On error everything started is torn down.
func Start(ctx context.Context, opts Options) (c *Cluster, err error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("the sandbox needs root (network namespaces)")
	}
	if opts.Nodes <= 0 {
		opts.Nodes = 2
	}
	if opts.KubeProxyMode == "" {
		opts.KubeProxyMode = KubeProxyNFTables
	}
	if err := validKubeProxyMode(opts.KubeProxyMode); err != nil {
		return nil, err
	}
	running.Lock()
	defer running.Unlock()
	if running.c != nil {
		return nil, errors.New("a sandbox cluster already runs in this process")
	}
	c = &Cluster{opts: opts, pods: map[string]*Pod{}, proxyMode: opts.KubeProxyMode}
	// Leftovers of killed runs first, then this run's lock.
	CleanLeftovers()
	if c.lock, err = lockRun(); err != nil {
		return nil, err
	}
	running.c = c
	defer func() {
		if err != nil {
			c.stop()
		}
	}()
	if c.Dir = opts.Dir; c.Dir == "" {
		if c.Dir, err = os.MkdirTemp("", "egressvip-sandbox-"); err != nil {
			return c, err
		}
	}
	start := time.Now()
	if c.bins, err = EnsureBinaries(c.Dir, c.logf); err != nil {
		return c, err
	}
	c.logf("binaries ready (%s)", time.Since(start).Round(time.Second))
	if err = c.network(); err != nil {
		return c, fmt.Errorf("network: %w", err)
	}
	if err = c.controlPlane(ctx); err != nil {
		return c, fmt.Errorf("control plane: %w", err)
	}
	c.logf("control plane ready (%s)", time.Since(start).Round(time.Second))
	if err = c.registerNodes(ctx); err != nil {
		return c, fmt.Errorf("nodes: %w", err)
	}
	if c.External, err = startExternal(externalNS); err != nil {
		return c, fmt.Errorf("external host: %w", err)
	}
	if c.proxyMode != KubeProxyNone {
		for _, n := range c.Nodes {
			if err = c.startKubeProxy(n, c.proxyMode); err != nil {
				return c, fmt.Errorf("kube-proxy: %w", err)
			}
		}
	}
	if err = c.installDaemon(ctx); err != nil {
		return c, fmt.Errorf("egressvip: %w", err)
	}
	if err = c.waitKubeProxies(ctx); err != nil {
		return c, err
	}
	c.logf("sandbox up with %d nodes (%s); logs in %s", len(c.Nodes), time.Since(start).Round(time.Second), c.Dir)
	return c, nil
}

// network builds the fabric (the bridges of the node network and of the
// external network), the control-plane, external and node namespaces; with
// Options.RoutedNodes a router takes the node network's bridge's place.
func (c *Cluster) network() error {
	if c.opts.RoutedNodes && c.opts.Nodes > maxRoutedNodes {
		return fmt.Errorf("routed nodes: at most %d nodes, not %d", maxRoutedNodes, c.opts.Nodes)
	}
	for _, ns := range []string{fabricNS, controlNS, externalNS} {
		if err := addNS(ns); err != nil {
			return err
		}
	}
	bridges := []string{"br-ext"}
	if !c.opts.RoutedNodes {
		bridges = append(bridges, "br-node")
	}
	for _, br := range bridges {
		if err := shAll(
			[]string{"ip", "-n", fabricNS, "link", "add", br, "type", "bridge"},
			[]string{"ip", "-n", fabricNS, "link", "set", br, "up"},
		); err != nil {
			return err
		}
	}
	attach := func(ns, inside, outside, bridge string, ip4, ip6 netip.Prefix) error {
		if err := veth(fabricNS, outside, ns, inside); err != nil {
			return err
		}
		return shAll(
			[]string{"ip", "-n", fabricNS, "link", "set", outside, "master", bridge},
			[]string{"ip", "-n", ns, "addr", "add", ip4.String(), "dev", inside},
			[]string{"ip", "-n", ns, "addr", "add", ip6.String(), "dev", inside, "nodad"},
		)
	}
	// The node network: one bridge, or with RoutedNodes a router with a
	// subnet of its own for the control plane and for each node.
	nodeLink := func(ns, inside, outside string, p nodePlan) error {
		if !c.opts.RoutedNodes {
			return attach(ns, inside, outside, "br-node", p.ip4, p.ip6)
		}
		if err := veth(routerNS, outside, ns, inside); err != nil {
			return err
		}
		return shAll(
			[]string{"ip", "-n", routerNS, "addr", "add", netip.PrefixFrom(p.gw4, p.ip4.Bits()).String(), "dev", outside},
			[]string{"ip", "-n", routerNS, "addr", "add", netip.PrefixFrom(p.gw6, p.ip6.Bits()).String(), "dev", outside, "nodad"},
			[]string{"ip", "-n", ns, "addr", "add", p.ip4.String(), "dev", inside},
			[]string{"ip", "-n", ns, "addr", "add", p.ip6.String(), "dev", inside, "nodad"},
			[]string{"ip", "-n", ns, "route", "add", nodeNetwork4.String(), "via", p.gw4.String()},
			[]string{"ip", "-n", ns, "-6", "route", "add", nodeNetwork6.String(), "via", p.gw6.String()},
		)
	}
	if c.opts.RoutedNodes {
		if err := addNS(routerNS); err != nil {
			return err
		}
		if _, err := InNS(routerNS, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"); err != nil {
			return err
		}
	}
	cp := planControlPlane(c.opts.RoutedNodes)
	if err := nodeLink(controlNS, "eth0", "cp0", cp); err != nil {
		return err
	}
	if err := attach(externalNS, "eth0", "ext0", "br-ext", netip.MustParsePrefix(ExternalHost4+"/24"), netip.MustParsePrefix(ExternalHost6+"/64")); err != nil {
		return err
	}
	// A second address of the external host, for allowed and denied
	// networks: one host, two destinations. It only receives: the IPv4 one
	// is secondary, the IPv6 one deprecated (preferred_lft 0), so the
	// host's own connections always leave from its first address, whatever
	// order the kernel lists them in.
	if err := shAll(
		[]string{"ip", "-n", externalNS, "addr", "add", ExternalSecond4 + "/24", "dev", "eth0"},
		[]string{"ip", "-n", externalNS, "addr", "add", ExternalSecond6 + "/64", "dev", "eth0", "nodad", "preferred_lft", "0"},
	); err != nil {
		return err
	}
	for i := 1; i <= c.opts.Nodes; i++ {
		p := planNode(i, c.opts.RoutedNodes)
		n := &Node{
			Name:   fmt.Sprintf("node-%d", i),
			NS:     nsName(fmt.Sprintf("n%d", i)),
			IP4:    p.ip4.Addr(),
			IP6:    p.ip6.Addr(),
			ExtIP4: netip.MustParseAddr(fmt.Sprintf("%s%d", extNet4, 10+i)),
			ExtIP6: netip.MustParseAddr(fmt.Sprintf("%s%x", extNet6, 0x10+i)),
			gw4:    p.gw4,
			gw6:    p.gw6,
		}
		if err := addNS(n.NS); err != nil {
			return err
		}
		if err := nodeLink(n.NS, "eth0", fmt.Sprintf("n%da", i), p); err != nil {
			return err
		}
		if err := attach(n.NS, "eth1", fmt.Sprintf("n%db", i), "br-ext", netip.PrefixFrom(n.ExtIP4, 24), netip.PrefixFrom(n.ExtIP6, 64)); err != nil {
			return err
		}
		if _, err := InNS(n.NS, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"); err != nil {
			return err
		}
		c.Nodes = append(c.Nodes, n)
	}
	return nil
}

func (c *Cluster) path(name string) string { return filepath.Join(c.Dir, name) }

// spawn starts a long-running process inside ns, logging to name.log.
func (c *Cluster) spawn(ns, name string, env []string, args ...string) (*exec.Cmd, error) {
	logFile, err := os.Create(c.path(name + ".log"))
	if err != nil {
		return nil, err
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.Env = env
	if err := startKilledWithUs(cmd); err != nil {
		logFile.Close()
		return nil, err
	}
	c.mu.Lock()
	c.procs = append(c.procs, cmd)
	c.mu.Unlock()
	return cmd, nil
}

func (c *Cluster) controlPlane(ctx context.Context) error {
	p, err := newPKI(c.Dir)
	if err != nil {
		return err
	}
	if err := p.serviceAccountKey(); err != nil {
		return err
	}
	if err := p.issue("apiserver", "kube-apiserver", nil,
		[]netip.Addr{netip.MustParseAddr(apiServerIP), netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("10.96.0.1")},
		[]string{"kubernetes", "kubernetes.default", "kubernetes.default.svc", "localhost"}); err != nil {
		return err
	}
	if err := p.issue("admin", "sandbox-admin", []string{"system:masters"}, nil, nil); err != nil {
		return err
	}
	if err := p.issue("kcm", "system:kube-controller-manager", []string{"system:masters"}, nil, nil); err != nil {
		return err
	}
	// kube-proxy's user; the bootstrap ClusterRoleBinding
	// system:node-proxier grants it what it reads.
	if err := p.issue("kube-proxy", "system:kube-proxy", nil, nil, nil); err != nil {
		return err
	}
	env := []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=" + c.Dir}
	if _, err := c.spawn(controlNS, "etcd", env, c.bins.Etcd,
		"--name=sandbox", "--data-dir="+c.path("etcd"),
		"--listen-client-urls=http://127.0.0.1:2379", "--advertise-client-urls=http://127.0.0.1:2379",
		"--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
		"--initial-cluster=sandbox=http://127.0.0.1:2380",
		"--experimental-watch-progress-notify-interval=100ms"); err != nil {
		return err
	}
	if c.apiServer, err = c.spawn(controlNS, "kube-apiserver", env, c.bins.APIServer,
		"--etcd-servers=http://127.0.0.1:2379",
		"--bind-address=0.0.0.0", "--secure-port=6443", "--advertise-address="+apiServerIP,
		"--tls-cert-file="+p.path("apiserver.crt"), "--tls-private-key-file="+p.path("apiserver.key"),
		"--client-ca-file="+p.path("ca.crt"),
		"--service-account-key-file="+p.path("sa.pub"), "--service-account-signing-key-file="+p.path("sa.key"),
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-cluster-ip-range="+serviceCIDR,
		"--authorization-mode=Node,RBAC",
		"--cert-dir="+c.path("apiserver-certs"),
		"--profiling=false"); err != nil {
		return err
	}
	adminQPS := 100
	if c.opts.AdminQPS > 0 {
		adminQPS = c.opts.AdminQPS
	}
	c.AdminConfig = &rest.Config{
		Host: "https://" + apiServerIP + ":6443",
		TLSClientConfig: rest.TLSClientConfig{
			CAFile: p.path("ca.crt"), CertFile: p.path("admin.crt"), KeyFile: p.path("admin.key"),
		},
		Dial:    DialIn(controlNS),
		QPS:     float32(adminQPS),
		Burst:   2 * adminQPS,
		Timeout: 20 * time.Second,
	}
	admin, err := kubernetes.NewForConfig(c.AdminConfig)
	if err != nil {
		return err
	}
	c.Admin = admin
	if err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 90*time.Second, true, func(ctx context.Context) (bool, error) {
		body, err := admin.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		return err == nil && strings.TrimSpace(string(body)) == "ok", nil
	}); err != nil {
		return fmt.Errorf("kube-apiserver not ready (see %s): %w", c.path("kube-apiserver.log"), err)
	}
	if err := writeKubeconfig(c.path("admin.kubeconfig"), "https://127.0.0.1:6443", p.path("ca.crt"), p.path("admin.crt"), p.path("admin.key"), ""); err != nil {
		return err
	}
	if err := writeKubeconfig(c.path("kube-proxy.kubeconfig"), "https://"+apiServerIP+":6443", p.path("ca.crt"), p.path("kube-proxy.crt"), p.path("kube-proxy.key"), ""); err != nil {
		return err
	}
	kcmConfig := c.path("kcm.kubeconfig")
	if err := writeKubeconfig(kcmConfig, "https://127.0.0.1:6443", p.path("ca.crt"), p.path("kcm.crt"), p.path("kcm.key"), ""); err != nil {
		return err
	}
	_, err = c.spawn(controlNS, "kube-controller-manager", env, append([]string{c.bins.ControllerManager}, c.controllerManagerArgs(kcmConfig, p)...)...)
	return err
}

// controllerManagerArgs are kube-controller-manager's flags for the
// options.
func (c *Cluster) controllerManagerArgs(kubeconfig string, p *pki) []string {
	mask4, mask6 := 24, 64
	if c.opts.NodeCIDRMaskSizeIPv4 > 0 {
		mask4 = c.opts.NodeCIDRMaskSizeIPv4
	}
	if c.opts.NodeCIDRMaskSizeIPv6 > 0 {
		mask6 = c.opts.NodeCIDRMaskSizeIPv6
	}
	controllers := append([]string{"endpointslice", "serviceaccount", "serviceaccount-token", "nodeipam"}, c.opts.Controllers...)
	endpointSyncs := 10
	args := []string{
		"--kubeconfig=" + kubeconfig,
		"--controllers=" + strings.Join(controllers, ","),
		"--allocate-node-cidrs", "--cluster-cidr=" + clusterCIDR, "--service-cluster-ip-range=" + serviceCIDR,
		fmt.Sprintf("--node-cidr-mask-size-ipv4=%d", mask4), fmt.Sprintf("--node-cidr-mask-size-ipv6=%d", mask6),
		"--service-account-private-key-file=" + p.path("sa.key"), "--root-ca-file=" + p.path("ca.crt"),
		"--leader-elect=false", "--secure-port=0",
	}
	if q := c.opts.ControllerManagerQPS; q > 0 {
		args = append(args, fmt.Sprintf("--kube-api-qps=%d", q), fmt.Sprintf("--kube-api-burst=%d", 2*q))
		endpointSyncs = 20
	}
	return append(args, fmt.Sprintf("--concurrent-service-endpoint-syncs=%d", endpointSyncs))
}

// registerNodes creates the Node objects, waits for their podCIDRs and
// sets up pod routing and a CNI-like masquerade in every node namespace.
func (c *Cluster) registerNodes(ctx context.Context) error {
	for _, n := range c.Nodes {
		node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n.Name, Labels: map[string]string{"kubernetes.io/hostname": n.Name}}}
		created, err := c.Admin.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
		if err != nil {
			return err
		}
		created.Status = corev1.NodeStatus{
			Conditions: []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "SandboxReady",
				LastHeartbeatTime: metav1.Now(), LastTransitionTime: metav1.Now()}},
			Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: n.IP4.String()}, {Type: corev1.NodeInternalIP, Address: n.IP6.String()},
				{Type: corev1.NodeHostName, Address: n.Name}},
		}
		if _, err := c.Admin.CoreV1().Nodes().UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
			return err
		}
	}
	for _, n := range c.Nodes {
		if err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 60*time.Second, true, func(ctx context.Context) (bool, error) {
			node, err := c.Admin.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
			if err != nil || len(node.Spec.PodCIDRs) < 2 {
				return false, nil
			}
			n.PodCIDRs = nil
			for _, s := range node.Spec.PodCIDRs {
				n.PodCIDRs = append(n.PodCIDRs, netip.MustParsePrefix(s))
			}
			return true, nil
		}); err != nil {
			return fmt.Errorf("node %s got no dual-stack podCIDRs from node-ipam (see %s): %w", n.Name, c.path("kube-controller-manager.log"), err)
		}
	}
	if c.opts.RoutedNodes {
		if err := c.routePodCIDRs(); err != nil {
			return err
		}
	}
	for _, n := range c.Nodes {
		for _, other := range c.Nodes {
			if other == n {
				continue
			}
			for _, p := range other.PodCIDRs {
				via := other.IP4
				if p.Addr().Is6() {
					via = other.IP6
				}
				if c.opts.RoutedNodes {
					via = n.gw4
					if p.Addr().Is6() {
						via = n.gw6
					}
				}
				if _, err := sh("ip", "-n", n.NS, "route", "add", p.String(), "via", via.String()); err != nil {
					return err
				}
			}
		}
		// The CNI's natOutgoing: pod traffic leaving the cluster gets the
		// node address, so a missing or mis-ordered egress SNAT shows.
		if _, err := InNS(n.NS, "iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-s", PodCIDR4.String(), "!", "-d", PodCIDR4.String(),
			"-m", "comment", "--comment", "sandbox CNI natOutgoing", "-j", "MASQUERADE"); err != nil {
			return err
		}
		if _, err := InNS(n.NS, "ip6tables-legacy", "-t", "nat", "-A", "POSTROUTING", "-s", PodCIDR6.String(), "!", "-d", PodCIDR6.String(),
			"-m", "comment", "--comment", "sandbox CNI natOutgoing", "-j", "MASQUERADE"); err != nil {
			return err
		}
	}
	return nil
}

// running is the cluster of this process, at most one: namespace names
// are per process.
var running struct {
	sync.Mutex
	c *Cluster
}

// Stop tears everything down: daemons, control plane, namespaces. It is
// safe to call more than once.
func (c *Cluster) Stop() {
	running.Lock()
	defer running.Unlock()
	c.stop()
}

// StopRunning stops this process's cluster, if one runs; for signal
// handlers that may fire while Start is still going (they should cancel
// Start's context first).
func StopRunning() {
	running.Lock()
	defer running.Unlock()
	if running.c != nil {
		running.c.stop()
	}
}

func (c *Cluster) stop() {
	for _, n := range c.Nodes {
		n.mu.Lock()
		if n.daemon != nil && n.daemon.Process != nil {
			_ = n.daemon.Process.Kill()
		}
		if n.proxy != nil && n.proxy.Process != nil {
			_ = n.proxy.Process.Kill()
		}
		n.mu.Unlock()
		n.closeHandle()
	}
	if c.External != nil {
		c.External.Close()
	}
	c.mu.Lock()
	closers := c.closers
	c.closers = nil
	c.mu.Unlock()
	for _, f := range closers {
		_ = f()
	}
	c.mu.Lock()
	procs := c.procs
	c.procs = nil
	pods := slices.Collect(maps.Values(c.pods))
	c.mu.Unlock()
	for _, p := range pods {
		p.closeServers()
	}
	for i := len(procs) - 1; i >= 0; i-- {
		if procs[i].Process != nil {
			_ = procs[i].Process.Kill()
			_, _ = procs[i].Process.Wait()
		}
	}
	if c.lock != nil {
		deleteOwn()
		unlockRun(c.lock)
		c.lock = nil
	}
	if running.c == c {
		running.c = nil
	}
}

// Kubectl runs kubectl as cluster admin inside the control-plane namespace.
func (c *Cluster) Kubectl(args ...string) (string, error) {
	return InNS(controlNS, append([]string{c.bins.Kubectl, "--kubeconfig=" + c.path("admin.kubeconfig")}, args...)...)
}

// PauseAPIServer stops (SIGSTOP) or resumes (SIGCONT) kube-apiserver, an
// outage in which connections hang the way they do behind a dead network.
func (c *Cluster) PauseAPIServer(pause bool) error {
	sig := syscall.SIGCONT
	if pause {
		sig = syscall.SIGSTOP
	}
	return c.apiServer.Process.Signal(sig)
}

// Node returns the node with that name.
func (c *Cluster) Node(name string) *Node {
	for _, n := range c.Nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}
