// Command benchscale measures egressvip at scale on the sandbox cluster
// (make bench-scale). For every N of -n it creates N egress Services with
// one API-only pod each on node-1 and reports how long node-1 takes to bind
// every LoadBalancer IP and write every SNAT rule once the EndpointSlices
// are ready, then the API request rates in a steady window, the oldest
// Lease heartbeat against the lease duration, and the daemon's memory and
// goroutines. A second run (-cluster) creates Services with
// externalTrafficPolicy: Cluster on three nodes and watches which node
// holds each address: changes, doubles, gaps. It ends with Markdown tables
// for the README. Everything is bounded in time; Ctrl-C tears down.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math"
	"net/netip"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"

	"github.com/egressvip/egressvip/testing/sandbox"
)

// Names the daemon understands (kube-vip's); literal here so the bench
// does not depend on the daemon's packages.
const (
	annLoadBalancerIPs = "kube-vip.io/loadbalancerIPs"
	annEgress          = "kube-vip.io/egress"
	annEgressIPv6      = "kube-vip.io/egress-ipv6"
	// daemonNS is where the per-node heartbeat Leases live
	// (egressvip.node.<node>), the DaemonSet's namespace.
	daemonNS         = "egressvip"
	nodeLeasePrefix  = "egressvip.node."
	serviceLeaseName = "egressvip-" // + Service name, in its namespace
	defaultLeaseSecs = 5
	// podOffset skips the start of node-1's pod ranges (RunPod's).
	podOffset = 256
)

var (
	flagN               = flag.String("n", "50,500,2000", "comma-separated Service counts of the egress (externalTrafficPolicy: Local) rounds; empty skips them")
	flagSteady          = flag.Duration("steady", 30*time.Second, "steady-state window of each round")
	flagDaemonEnv       = flag.String("daemon-env", "", "extra egressvip environment, k=v,k=v (e.g. GOGC=100)")
	flagCluster         = flag.Int("cluster", 50, "Services of the externalTrafficPolicy: Cluster run (0 skips it)")
	flagClusterDuration = flag.Duration("cluster-duration", 60*time.Second, "sampling window of the Cluster run")
	flagConverge        = flag.Duration("converge-timeout", 180*time.Second, "give up waiting for an egress round to converge after this")
	flagBind            = flag.Duration("bind-timeout", 90*time.Second, "give up waiting for every address of the Cluster run to be bound after this (it is sampled anyway)")
	flagCleanup         = flag.Duration("cleanup-timeout", 120*time.Second, "give up waiting for a round's namespace and addresses to go after this")
	flagNodes           = flag.Int("nodes", 3, "sandbox nodes")
	flagKCMQPS          = flag.Int("kcm-qps", 500, "kube-controller-manager's --kube-api-qps (burst twice that)")
	flagWorkers         = flag.Int("workers", 16, "parallel API writers when creating Services and pods")
	flagMaxRuntime      = flag.Duration("max-runtime", 25*time.Minute, "hard limit of the whole run")
	flagDualStack       = flag.Bool("dual-stack", false, "create PreferDualStack Services (as the e2e suite does) instead of IPv6 single-stack ones; each then costs two ClusterIPs, and kube-apiserver allocates ClusterIPs through its loopback client at about 50/s, so creating and deleting thousands of Services takes twice as long")
	flagKubeProxy       = flag.String("kube-proxy", sandbox.KubeProxyNone, "kube-proxy mode in the nodes: none (the default, so that the figures are egressvip's alone: kube-proxy's CPU on 2 cores and its API reads would count with them), nftables or iptables")
	flagDir             = flag.String("dir", "", "keep the sandbox's logs and certificates in this directory (default: a temporary directory, removed unless the run fails)")
)

func main() {
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: benchscale [flags] (as root; make bench-scale)\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	counts, err := parseCounts(*flagN)
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchscale:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *flagMaxRuntime)
	defer cancel()
	go func() {
		// Everything below returns soon after ctx ends; should anything
		// hang, still tear down and leave.
		<-ctx.Done()
		time.Sleep(60 * time.Second)
		fmt.Fprintln(os.Stderr, "benchscale: still running 60 s after cancellation; tearing down")
		sandbox.StopRunning()
		os.Exit(3)
	}()
	if err := run(ctx, counts); err != nil {
		fmt.Fprintln(os.Stderr, "benchscale failed:", err)
		os.Exit(1)
	}
}

func parseCounts(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n <= 0 || n > 4000 {
			return nil, fmt.Errorf("-n: %q is not a count between 1 and 4000", f)
		}
		out = append(out, n)
	}
	return out, nil
}

var began = time.Now()

func say(format string, args ...any) {
	el := time.Since(began).Round(time.Second)
	fmt.Printf("[%02d:%02d] "+format+"\n", append([]any{int(el.Minutes()), int(el.Seconds()) % 60}, args...)...)
}

// bench is one run: the cluster and what all rounds share.
type bench struct {
	c    *sandbox.Cluster
	n1   *sandbox.Node
	hb   *leaseWatch // Leases in the daemon's namespace (per-node heartbeats)
	next int         // next pod address offset in node-1's ranges
}

// daemonEnv parses -daemon-env.
func daemonEnv(s string) map[string]string {
	out := map[string]string{}
	for _, kv := range strings.Split(s, ",") {
		if k, v, ok := strings.Cut(strings.TrimSpace(kv), "="); ok {
			out[k] = v
		}
	}
	return out
}

func run(ctx context.Context, counts []int) (err error) {
	say("starting the sandbox: %d nodes, kube-controller-manager --kube-api-qps=%d, node pod ranges /20 and /64, kube-proxy %s", *flagNodes, *flagKCMQPS, *flagKubeProxy)
	c, err := sandbox.Start(ctx, sandbox.Options{
		Nodes:                *flagNodes,
		Dir:                  *flagDir,
		Logf:                 func(f string, a ...any) { say("    "+f, a...) },
		ControllerManagerQPS: *flagKCMQPS,
		NodeCIDRMaskSizeIPv4: 20,
		Controllers:          []string{"namespace"},
		AdminQPS:             1000,
		DaemonEnv:            daemonEnv(*flagDaemonEnv),
		KubeProxyMode:        *flagKubeProxy,
	})
	if err != nil {
		return err
	}
	defer func() {
		say("tearing down")
		c.Stop()
		if err == nil && *flagDir == "" {
			_ = os.RemoveAll(c.Dir)
		} else {
			say("logs kept in %s", c.Dir)
		}
	}()
	b := &bench{c: c, n1: c.Nodes[0]}
	say("sandbox logs in %s; node-1 pod ranges %v", c.Dir, b.n1.PodCIDRs)
	if b.hb, err = watchLeases(ctx, c, daemonNS); err != nil {
		return err
	}
	defer b.hb.stop()

	var rounds []roundResult
	for i, n := range counts {
		if ctx.Err() != nil {
			break
		}
		r, err := b.egressRound(ctx, i+1, n)
		if err != nil {
			say("round N=%d failed: %v", n, err)
			r.err = err.Error()
		}
		rounds = append(rounds, r)
	}
	var cr *clusterResult
	if *flagCluster > 0 && ctx.Err() == nil {
		r, err := b.clusterRound(ctx, len(counts)+1, *flagCluster)
		if err != nil {
			say("Cluster run failed: %v", err)
			r.err = err.Error()
		}
		cr = &r
	}
	printTables(rounds, cr)
	if ctx.Err() != nil {
		return fmt.Errorf("stopped early: %w", context.Cause(ctx))
	}
	return nil
}

// lbIP is Service i's (1-based) LoadBalancer IP in round r:
// 2001:db8:5::<r>:<i>.
func lbIP(r, i int) netip.Addr {
	return netip.MustParseAddr(fmt.Sprintf("2001:db8:5::%x:%x", r, i))
}

func svcName(i int) string { return fmt.Sprintf("svc-%d", i) }

func service(ns string, i int, lb netip.Addr, egress bool) *corev1.Service {
	// The LoadBalancer IPs are IPv6 only, so the pods' IPv6 addresses are
	// what egress uses.
	policy := corev1.IPFamilyPolicySingleStack
	families := []corev1.IPFamily{corev1.IPv6Protocol}
	if *flagDualStack {
		policy, families = corev1.IPFamilyPolicyPreferDualStack, nil
	}
	noNodePorts := false
	ann := map[string]string{annLoadBalancerIPs: lb.String()}
	etp := corev1.ServiceExternalTrafficPolicyCluster
	if egress {
		ann[annEgress], ann[annEgressIPv6] = "true", "true"
		etp = corev1.ServiceExternalTrafficPolicyLocal
	}
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: svcName(i), Annotations: ann},
		Spec: corev1.ServiceSpec{
			Type:                  corev1.ServiceTypeLoadBalancer,
			ExternalTrafficPolicy: etp,
			Selector:              map[string]string{"app": svcName(i)},
			IPFamilyPolicy:        &policy,
			IPFamilies:            families,
			// Thousands of Services would exhaust the NodePort range;
			// egressvip does not use NodePorts.
			AllocateLoadBalancerNodePorts: &noNodePorts,
			Ports:                         []corev1.ServicePort{{Name: "sip", Port: 5060, Protocol: corev1.ProtocolUDP}},
		},
	}
}

// parallel runs fn(1..n) on workers goroutines; the first error stops it.
func parallel(ctx context.Context, n int, fn func(ctx context.Context, i int) error) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	idx := make(chan int)
	var wg sync.WaitGroup
	for range max(1, *flagWorkers) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range idx {
				if err := fn(ctx, i); err != nil {
					cancel(err)
				}
			}
		}()
	}
	for i := 1; i <= n && ctx.Err() == nil; i++ {
		select {
		case idx <- i:
		case <-ctx.Done():
		}
	}
	close(idx)
	wg.Wait()
	if err := context.Cause(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return ctx.Err()
}

// podAddrs are node-1's pod addresses number off in its ranges.
func (b *bench) podAddrs(off int) (netip.Addr, netip.Addr, error) {
	var a4, a6 netip.Addr
	for _, p := range b.n1.PodCIDRs {
		room := math.Pow(2, float64(p.Addr().BitLen()-p.Bits()))
		if float64(off+2) > room {
			return a4, a6, fmt.Errorf("%s has no room for pod address %d (make the node pod ranges larger: Options.NodeCIDRMaskSizeIPv4)", p, off)
		}
		a := p.Addr()
		for range off {
			a = a.Next()
		}
		if a.Is4() {
			a4 = a
		} else {
			a6 = a
		}
	}
	if !a4.IsValid() || !a6.IsValid() {
		return a4, a6, fmt.Errorf("node-1 has pod ranges %v, want one per family", b.n1.PodCIDRs)
	}
	return a4, a6, nil
}

type roundResult struct {
	n                    int
	created              time.Duration // creating the pods and Services
	slicesReady          bool
	converged            bool
	readyToConverged     time.Duration // last EndpointSlice ready -> node-1 done
	createToConverged    time.Duration // first Service created -> node-1 done
	lastAddrs, lastRules int           // at convergence or give-up
	minAddrs, minRules   int           // during the steady window
	window               time.Duration
	rates                map[string]float64
	leaseWrites          float64
	apiTotal             float64
	hb                   heartbeat
	rss                  int64
	goroutines           float64 // -1: unknown
	logWarn, logErr      int
	cleanup              time.Duration
	cleanupDone          bool
	reported             time.Duration // converged -> status on every Service
	reportedOK           bool
	err                  string
}

// waitReported waits until every Service of ns shows its LoadBalancer IP
// in its status (bounded by -converge-timeout), listing once a second.
func (b *bench) waitReported(ctx context.Context, ns string, n int, since time.Time) (time.Duration, bool) {
	deadline := time.Now().Add(*flagConverge)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		list, err := b.c.Admin.CoreV1().Services(ns).List(ctx, metav1.ListOptions{ResourceVersion: "0"})
		if err == nil {
			done := 0
			for _, s := range list.Items {
				if len(s.Status.LoadBalancer.Ingress) > 0 {
					done++
				}
			}
			if done >= n {
				return time.Since(since), true
			}
		}
		sleep(ctx, time.Second)
	}
	return 0, false
}

// egressRound is round r with n egress Services on node-1.
func (b *bench) egressRound(ctx context.Context, r, n int) (res roundResult, err error) {
	res = roundResult{n: n, goroutines: -1}
	c, n1 := b.c, b.n1
	ns := fmt.Sprintf("bench-%d-n%d", r, n)
	say("== round %d: N=%d egress Services (externalTrafficPolicy: Local, IPv6 LoadBalancer IPs) with one API-only pod each on %s, namespace %s", r, n, n1.Name, ns)
	off := podOffset + b.next
	b.next += n
	if _, _, err := b.podAddrs(off + n); err != nil {
		return res, err
	}
	if _, err := c.Admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		return res, err
	}
	defer func() {
		res.cleanup, res.cleanupDone = b.deleteNamespace(ctx, ns, lbSet(r, n), []*sandbox.Node{n1})
	}()
	logOff := logSize(n1.LogPath)
	slices, err := watchSlices(ctx, c, ns, n)
	if err != nil {
		return res, err
	}
	defer slices.stop()
	leases, err := watchLeases(ctx, c, ns)
	if err != nil {
		return res, err
	}
	defer leases.stop()
	wanted := lbSet(r, n)
	slicesWanted := n // one EndpointSlice per Service and family
	if *flagDualStack {
		slicesWanted = 2 * n
	}

	// Services first: without endpoints they are nobody's (Local), so the
	// pods' arrival makes all EndpointSlices ready within seconds, and the
	// measured interval covers the daemon's whole work.
	svcStart := time.Now()
	if err := parallel(ctx, n, func(ctx context.Context, i int) error {
		_, err := c.Admin.CoreV1().Services(ns).Create(ctx, service(ns, i, lbIP(r, i), true), metav1.CreateOptions{})
		return err
	}); err != nil {
		return res, fmt.Errorf("create Services: %w", err)
	}
	say("created %d Services in %s", n, time.Since(svcStart).Round(time.Millisecond))
	podStart := time.Now()
	if err := parallel(ctx, n, func(ctx context.Context, i int) error {
		a4, a6, err := b.podAddrs(off + i)
		if err != nil {
			return err
		}
		return c.CreatePodObject(ctx, ns, svcName(i)+"-0", n1, map[string]string{"app": svcName(i)}, a4, a6)
	}); err != nil {
		return res, fmt.Errorf("create pods: %w", err)
	}
	res.created = time.Since(svcStart)
	say("created %d Ready pods in %s; waiting for %s to bind %d addresses and write %d SNAT rules (polling every 50 ms, at most %s)",
		n, time.Since(podStart).Round(time.Millisecond), n1.Name, n, n, *flagConverge)

	deadline := time.Now().Add(*flagConverge)
	var convergedAt time.Time
	lastReport := time.Now()
	for time.Now().Before(deadline) && ctx.Err() == nil {
		addrs, err := heldOf(n1, wanted)
		if err != nil {
			return res, err
		}
		res.lastAddrs = addrs
		if addrs == n {
			res.lastRules = snatRules(n1, ns)
			if res.lastRules == n {
				convergedAt = time.Now()
				break
			}
		}
		if time.Since(lastReport) > 15*time.Second {
			lastReport = time.Now()
			_, ready := slices.lastReady()
			res.lastRules = snatRules(n1, ns)
			say("  ... %s holds %d/%d addresses and %d/%d SNAT rules; EndpointSlices with a ready endpoint %d/%d", n1.Name, addrs, n, res.lastRules, n, ready, slicesWanted)
		}
		sleep(ctx, 50*time.Millisecond)
	}
	if err := ctx.Err(); err != nil {
		return res, err
	}
	at, ready := slices.lastReady()
	res.slicesReady = ready == slicesWanted
	if !convergedAt.IsZero() {
		res.converged = true
		res.createToConverged = convergedAt.Sub(svcStart)
		if res.slicesReady {
			res.readyToConverged = convergedAt.Sub(at)
		}
		say("converged: last EndpointSlice ready -> %s holds all %d addresses and SNAT rules: %s (first Service created -> converged: %s)",
			n1.Name, n, fmtDur(res.readyToConverged, res.slicesReady), res.createToConverged.Round(time.Millisecond))
	} else {
		res.lastRules = snatRules(n1, ns)
		say("NOT CONVERGED after %s: %s holds %d/%d addresses, %d/%d SNAT rules; EndpointSlices with a ready endpoint: %d/%d",
			*flagConverge, n1.Name, res.lastAddrs, n, res.lastRules, n, ready, slicesWanted)
	}

	// The leader reports status on every Service from a queue of its own,
	// at the reporter's client budget; the steady window starts once that
	// is done, so it shows what a quiet cluster costs.
	if res.converged {
		res.reported, res.reportedOK = b.waitReported(ctx, ns, n, convergedAt)
		say("status reported on all %d Services %s after convergence", n, fmtDur(res.reported, res.reportedOK))
	}

	// Steady state: the bench makes no API request in the window but the
	// two scrapes of /metrics; the Lease caches were filled before.
	say("steady window of %s: API request rates, heartbeat ages, %s's addresses and rules every 0.5 s", *flagSteady, n1.Name)
	res.minAddrs, res.minRules = n, n
	w, err := b.window(ctx, *flagSteady, leases, func() {
		if a, err := heldOf(n1, wanted); err == nil {
			res.minAddrs = min(res.minAddrs, a)
		}
		res.minRules = min(res.minRules, snatRules(n1, ns))
	})
	if err != nil {
		return res, err
	}
	res.window, res.rates, res.leaseWrites, res.apiTotal, res.hb = w.length, w.rates, w.leaseWrites, w.total, w.hb
	printRates(w)
	say("%s during the window: at least %d/%d addresses and %d/%d SNAT rules held at every sample", n1.Name, res.minAddrs, n, res.minRules, n)

	if pid := c.DaemonPID(n1); pid > 0 {
		if rss, err := sandbox.ProcessRSS(pid); err == nil {
			res.rss = rss
		}
	}
	if text, err := c.DaemonMetrics(ctx, n1); err == nil {
		if g := sandbox.MetricSamples(text, "go_goroutines"); len(g) > 0 {
			res.goroutines = g[0].Value
		}
	}
	res.logWarn, res.logErr = logLevels(n1.LogPath, logOff)
	say("%s's egressvip: RSS %s, goroutines %s; log lines since the round began: %d warning, %d error (%s)",
		n1.Name, fmtBytes(res.rss), fmtFloat(res.goroutines), res.logWarn, res.logErr, n1.LogPath)
	return res, nil
}

type windowResult struct {
	length      time.Duration
	rates       map[string]float64 // requests per second by "VERB resource"
	leaseWrites float64
	total       float64 // resource requests per second
	hb          heartbeat
}

// window samples heartbeats (and extra) every 0.5 s for d and returns the
// API request rates over it.
func (b *bench) window(ctx context.Context, d time.Duration, roundLeases *leaseWatch, extra func()) (windowResult, error) {
	var w windowResult
	before, err := b.c.APIRequestCounts(ctx)
	if err != nil {
		return w, err
	}
	t0 := time.Now()
	end := t0.Add(d)
	for time.Now().Before(end) && ctx.Err() == nil {
		w.hb.add(sampleHeartbeat(b.hb, roundLeases))
		if extra != nil {
			extra()
		}
		sleep(ctx, min(500*time.Millisecond, time.Until(end)))
	}
	if err := ctx.Err(); err != nil {
		return w, err
	}
	after, err := b.c.APIRequestCounts(ctx)
	if err != nil {
		return w, err
	}
	w.length = time.Since(t0)
	w.rates = map[string]float64{}
	for k, v := range after {
		if dv := v - before[k]; dv > 0 && !strings.HasSuffix(k, "(non-resource)") {
			r := dv / w.length.Seconds()
			w.rates[k] = r
			w.total += r
			verb, res, _ := strings.Cut(k, " ")
			if res == "leases" && (verb == "PUT" || verb == "POST" || verb == "PATCH" || verb == "APPLY") {
				w.leaseWrites += r
			}
		}
	}
	return w, nil
}

func printRates(w windowResult) {
	keys := make([]string, 0, len(w.rates))
	for k := range w.rates {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return w.rates[keys[i]] > w.rates[keys[j]] })
	say("API requests over %s (all clients: kube-apiserver's apiserver_request_total has no client label; the bench itself is idle in the window, kube-controller-manager has nothing to do):",
		w.length.Round(100*time.Millisecond))
	for i, k := range keys {
		if i == 12 {
			say("    ... %d more", len(keys)-i)
			break
		}
		say("    %8.2f/s  %s", w.rates[k], k)
	}
	say("    total %.2f requests/s; Lease writes (PUT+POST+PATCH leases) %.2f/s", w.total, w.leaseWrites)
	say("heartbeat: %s", w.hb)
}

// deleteNamespace deletes ns and waits (bounded) until it is gone and no
// node of nodes holds an address of set.
func (b *bench) deleteNamespace(ctx context.Context, ns string, set map[netip.Addr]bool, nodes []*sandbox.Node) (time.Duration, bool) {
	// Also after Ctrl-C: the teardown follows anyway, but a clean
	// namespace makes the log readable.
	if ctx.Err() != nil {
		return 0, false
	}
	start := time.Now()
	// The namespace controller deletes Services one at a time (they have
	// no deletecollection); in parallel it is quicker.
	if list, err := b.c.Admin.CoreV1().Services(ns).List(ctx, metav1.ListOptions{}); err == nil && len(list.Items) > 0 {
		_ = parallel(ctx, len(list.Items), func(ctx context.Context, i int) error {
			err := b.c.Admin.CoreV1().Services(ns).Delete(ctx, list.Items[i-1].Name, metav1.DeleteOptions{})
			if apierrors.IsNotFound(err) {
				err = nil
			}
			return err
		})
		say("deleted %d Services of %s in %s; deleting the namespace", len(list.Items), ns, time.Since(start).Round(time.Millisecond))
	}
	if err := b.c.Admin.CoreV1().Namespaces().Delete(ctx, ns, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		say("delete namespace %s: %v", ns, err)
		return 0, false
	}
	deadline := start.Add(*flagCleanup)
	nsGone, held := false, -1
	for time.Now().Before(deadline) && ctx.Err() == nil {
		if !nsGone {
			_, err := b.c.Admin.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
			nsGone = apierrors.IsNotFound(err)
		}
		held = 0
		for _, n := range nodes {
			h, _ := heldOf(n, set)
			held += h
		}
		if nsGone && held == 0 {
			say("namespace %s gone and its addresses released in %s", ns, time.Since(start).Round(time.Millisecond))
			return time.Since(start), true
		}
		sleep(ctx, 200*time.Millisecond)
	}
	say("cleanup of %s incomplete after %s: namespace gone %v, addresses still held %d", ns, *flagCleanup, nsGone, held)
	return time.Since(start), false
}

func lbSet(r, n int) map[netip.Addr]bool {
	m := make(map[netip.Addr]bool, n)
	for i := 1; i <= n; i++ {
		m[lbIP(r, i)] = true
	}
	return m
}

// heldOf counts the addresses of set that n's serviceInterface holds.
func heldOf(n *sandbox.Node, set map[netip.Addr]bool) (int, error) {
	addrs, err := n.LBAddresses()
	if err != nil {
		return 0, err
	}
	held := 0
	for _, a := range addrs {
		if set[a] {
			held++
		}
	}
	return held, nil
}

// snatRules counts egressvip's IPv6 SNAT rules on n for Services of
// namespace ns (the LoadBalancer IPs are IPv6 only, so there are no IPv4
// ones).
func snatRules(n *sandbox.Node, ns string) int {
	count := 0
	for _, l := range strings.Split(n.NAT(true), "\n") {
		if strings.HasPrefix(l, "-A EGRESSVIP-") && strings.Contains(l, "-j SNAT") &&
			(strings.Contains(l, "--comment "+ns+"/") || strings.Contains(l, `--comment "`+ns+"/")) {
			count++
		}
	}
	// The nftables backend: one map element per pod, its comment the
	// Service.
	return count + strings.Count(n.NFT(true), `comment "`+ns+"/")
}

// clusterResult is the externalTrafficPolicy: Cluster run.
type clusterResult struct {
	n             int
	bound         bool
	boundIn       time.Duration
	boundCount    int
	window        time.Duration
	samples       int
	changes       int // (sample, Service) pairs whose holder set differs from the previous sample's
	changedSvcs   int // Services with at least one change
	double        int // (sample, Service) pairs on two or more nodes
	doubleSamples int // samples with some address on two or more nodes
	none          int // (sample, Service) pairs on no node
	noneSamples   int
	perNode       map[string]int // addresses per node at the end
	leaseWrites   float64
	apiTotal      float64
	hb            heartbeat
	logWarn       int // daemon log lines on all nodes during the run
	logErr        int
	err           string
}

// clusterRound creates n Services with externalTrafficPolicy: Cluster (no
// pods, no egress) and watches which node holds each address.
func (b *bench) clusterRound(ctx context.Context, r, n int) (res clusterResult, err error) {
	res = clusterResult{n: n, perNode: map[string]int{}}
	c := b.c
	ns := fmt.Sprintf("bench-%d-cluster%d", r, n)
	say("== Cluster run: %d Services (externalTrafficPolicy: Cluster, no pods, no egress) on %d nodes, namespace %s", n, len(c.Nodes), ns)
	if _, err := c.Admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		return res, err
	}
	set := lbSet(r, n)
	defer func() { _, _ = b.deleteNamespace(ctx, ns, set, c.Nodes) }()
	logOffs := make([]int64, len(c.Nodes))
	for i, node := range c.Nodes {
		logOffs[i] = logSize(node.LogPath)
	}
	defer func() {
		for i, node := range c.Nodes {
			w, e := logLevels(node.LogPath, logOffs[i])
			res.logWarn += w
			res.logErr += e
		}
		say("egressvip log lines on all nodes during the Cluster run: %d warning, %d error", res.logWarn, res.logErr)
	}()
	leases, err := watchLeases(ctx, c, ns)
	if err != nil {
		return res, err
	}
	defer leases.stop()
	start := time.Now()
	if err := parallel(ctx, n, func(ctx context.Context, i int) error {
		_, err := c.Admin.CoreV1().Services(ns).Create(ctx, service(ns, i, lbIP(r, i), false), metav1.CreateOptions{})
		return err
	}); err != nil {
		return res, fmt.Errorf("create Services: %w", err)
	}
	holdersNow := func() map[netip.Addr][]string {
		h := map[netip.Addr][]string{}
		for _, node := range c.Nodes {
			addrs, _ := node.LBAddresses()
			for _, a := range addrs {
				if set[a] {
					h[a] = append(h[a], node.Name)
				}
			}
		}
		return h
	}
	deadline := time.Now().Add(*flagBind)
	bound := 0
	for time.Now().Before(deadline) && ctx.Err() == nil {
		if bound = len(holdersNow()); bound == n {
			res.bound, res.boundIn = true, time.Since(start)
			break
		}
		sleep(ctx, 100*time.Millisecond)
	}
	if err := ctx.Err(); err != nil {
		return res, err
	}
	res.boundCount = bound
	if res.bound {
		say("every address bound on some node %s after the first Service was created", res.boundIn.Round(time.Millisecond))
	} else {
		say("NOT every address bound after %s: %d/%d; sampling anyway", *flagBind, bound, n)
	}
	say("sampling the holders of %d addresses on %d nodes every 0.5 s for %s", n, len(c.Nodes), *flagClusterDuration)
	prev := map[netip.Addr]string{}
	changed := map[netip.Addr]bool{}
	var last map[netip.Addr][]string
	w, err := b.window(ctx, *flagClusterDuration, leases, func() {
		h := holdersNow()
		last = h
		res.samples++
		anyDouble, anyNone := false, false
		for a := range set {
			key := strings.Join(h[a], ",")
			if p, seen := prev[a]; seen && p != key {
				res.changes++
				changed[a] = true
			}
			prev[a] = key
			switch len(h[a]) {
			case 0:
				res.none++
				anyNone = true
			case 1:
			default:
				res.double++
				anyDouble = true
			}
		}
		if anyDouble {
			res.doubleSamples++
		}
		if anyNone {
			res.noneSamples++
		}
	})
	if err != nil {
		return res, err
	}
	res.window, res.leaseWrites, res.apiTotal, res.hb, res.changedSvcs = w.length, w.leaseWrites, w.total, w.hb, len(changed)
	for _, hs := range last {
		for _, h := range hs {
			res.perNode[h]++
		}
	}
	say("%d samples: holder changes %d (on %d of %d Services); address on 2+ nodes in %d (sample, Service) pairs / %d samples; on none in %d pairs / %d samples; addresses per node at the end %v",
		res.samples, res.changes, res.changedSvcs, n, res.double, res.doubleSamples, res.none, res.noneSamples, res.perNode)
	printRates(w)
	return res, nil
}

// --- EndpointSlices ---

// sliceWatch records when each (Service, address family) EndpointSlice of
// a namespace first showed a ready endpoint.
type sliceWatch struct {
	mu      sync.Mutex
	readyAt map[string]time.Time
	stopCh  chan struct{}
	factory informers.SharedInformerFactory
}

func watchSlices(ctx context.Context, c *sandbox.Cluster, ns string, n int) (*sliceWatch, error) {
	s := &sliceWatch{readyAt: make(map[string]time.Time, 2*n), stopCh: make(chan struct{})}
	s.factory = informers.NewSharedInformerFactoryWithOptions(c.Admin, 0, informers.WithNamespace(ns))
	inf := s.factory.Discovery().V1().EndpointSlices().Informer()
	see := func(obj any) {
		now := time.Now()
		sl, ok := obj.(*discoveryv1.EndpointSlice)
		if !ok {
			return
		}
		svc := sl.Labels[discoveryv1.LabelServiceName]
		if svc == "" {
			return
		}
		for _, ep := range sl.Endpoints {
			if (ep.Conditions.Ready == nil || *ep.Conditions.Ready) && (ep.Conditions.Terminating == nil || !*ep.Conditions.Terminating) {
				key := svc + "/" + string(sl.AddressType)
				s.mu.Lock()
				if _, seen := s.readyAt[key]; !seen {
					s.readyAt[key] = now
				}
				s.mu.Unlock()
				return
			}
		}
	}
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    see,
		UpdateFunc: func(_, obj any) { see(obj) },
	}); err != nil {
		return nil, err
	}
	s.factory.Start(s.stopCh)
	syncCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if !cache.WaitForCacheSync(syncCtx.Done(), inf.HasSynced) {
		s.stop()
		return nil, errors.New("EndpointSlice watch did not sync")
	}
	return s, nil
}

// lastReady is when the last slice seen became ready, and how many are.
func (s *sliceWatch) lastReady() (time.Time, int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var last time.Time
	for _, t := range s.readyAt {
		if t.After(last) {
			last = t
		}
	}
	return last, len(s.readyAt)
}

func (s *sliceWatch) stop() {
	close(s.stopCh)
	s.factory.Shutdown()
}

// --- Leases and heartbeats ---

// leaseWatch caches the Leases of one namespace (a watch opened before
// any measuring window, so reading it costs the API server nothing).
type leaseWatch struct {
	ns      string
	stopCh  chan struct{}
	factory informers.SharedInformerFactory
	store   cache.Store
}

func watchLeases(ctx context.Context, c *sandbox.Cluster, ns string) (*leaseWatch, error) {
	l := &leaseWatch{ns: ns, stopCh: make(chan struct{})}
	l.factory = informers.NewSharedInformerFactoryWithOptions(c.Admin, 0, informers.WithNamespace(ns))
	inf := l.factory.Coordination().V1().Leases().Informer()
	l.store = inf.GetStore()
	l.factory.Start(l.stopCh)
	syncCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if !cache.WaitForCacheSync(syncCtx.Done(), inf.HasSynced) {
		l.stop()
		return nil, fmt.Errorf("Lease watch in %s did not sync", ns)
	}
	return l, nil
}

func (l *leaseWatch) stop() {
	close(l.stopCh)
	l.factory.Shutdown()
}

func (l *leaseWatch) leases() []*coordinationv1.Lease {
	var out []*coordinationv1.Lease
	for _, o := range l.store.List() {
		if le, ok := o.(*coordinationv1.Lease); ok {
			out = append(out, le)
		}
	}
	return out
}

// heartbeat is the oldest renewal over the samples of a window.
type heartbeat struct {
	kind       string // what was measured
	leases     int    // Leases seen (max over samples)
	maxAge     time.Duration
	duration   time.Duration // lease duration (max over the Leases)
	maxExpired int           // held Leases older than their duration, max over samples
	samples    int
}

func (h heartbeat) String() string {
	if h.leases == 0 {
		return fmt.Sprintf("no held egressvip Lease seen in %d samples", h.samples)
	}
	return fmt.Sprintf("oldest renewal %s against a lease duration of %s over %d samples of %d %s; at worst %d held Leases older than their duration",
		h.maxAge.Round(time.Millisecond), h.duration, h.samples, h.leases, h.kind, h.maxExpired)
}

func (h *heartbeat) add(s heartbeat) {
	h.samples++
	if s.leases == 0 {
		return
	}
	if h.kind == "" || h.kind == s.kind {
		h.kind = s.kind
	} else {
		h.kind = "mixed: " + h.kind + " / " + s.kind
	}
	h.leases = max(h.leases, s.leases)
	h.maxAge = max(h.maxAge, s.maxAge)
	h.duration = max(h.duration, s.duration)
	h.maxExpired = max(h.maxExpired, s.maxExpired)
}

// sampleHeartbeat measures the per-node Leases (egressvip.node.<node> in
// the daemon's namespace) if there are any, else the per-Service Leases
// (egressvip-<service>) of the round's namespace that have a holder.
func sampleHeartbeat(daemon, round *leaseWatch) heartbeat {
	now := time.Now()
	var s heartbeat
	measure := func(le *coordinationv1.Lease) {
		if le.Spec.HolderIdentity == nil || *le.Spec.HolderIdentity == "" || le.Spec.RenewTime == nil {
			return
		}
		d := defaultLeaseSecs * time.Second
		if le.Spec.LeaseDurationSeconds != nil {
			d = time.Duration(*le.Spec.LeaseDurationSeconds) * time.Second
		}
		age := now.Sub(le.Spec.RenewTime.Time)
		s.leases++
		s.maxAge = max(s.maxAge, age)
		s.duration = max(s.duration, d)
		if age > d {
			s.maxExpired++
		}
	}
	for _, le := range daemon.leases() {
		// Only heartbeats: address Leases are written on change, never
		// renewed, so their renewTime says nothing.
		if strings.HasPrefix(le.Name, nodeLeasePrefix) {
			measure(le)
		}
	}
	if s.leases > 0 {
		s.kind = "per-node Leases (" + daemonNS + "/" + nodeLeasePrefix + "<node>)"
		return s
	}
	for _, le := range round.leases() {
		if strings.HasPrefix(le.Name, serviceLeaseName) {
			measure(le)
		}
	}
	s.kind = "per-Service Leases (egressvip-<service>; fallback: no per-node Lease exists)"
	return s
}

// --- logs, output ---

func logSize(path string) int64 {
	st, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return st.Size()
}

// logLevels counts warning and error lines of the daemon's log after off
// (logrus text or JSON format).
func logLevels(path string, off int64) (warn, errs int) {
	data, err := os.ReadFile(path)
	if err != nil || int64(len(data)) < off {
		return 0, 0
	}
	for _, l := range strings.Split(string(data[off:]), "\n") {
		switch {
		case strings.Contains(l, "level=warning"), strings.Contains(l, `"level":"warning"`):
			warn++
		case strings.Contains(l, "level=error"), strings.Contains(l, `"level":"error"`), strings.Contains(l, "level=fatal"):
			errs++
		}
	}
	return warn, errs
}

func sleep(ctx context.Context, d time.Duration) {
	if d <= 0 {
		return
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

func fmtDur(d time.Duration, ok bool) string {
	if !ok {
		return "n/a"
	}
	if d < 10*time.Second {
		return d.Round(time.Millisecond).String()
	}
	return d.Round(100 * time.Millisecond).String()
}

func fmtBytes(b int64) string {
	if b <= 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20))
}

func fmtFloat(f float64) string {
	if f < 0 {
		return "n/a"
	}
	return strconv.FormatFloat(f, 'f', -1, 64)
}

func printTables(rounds []roundResult, cr *clusterResult) {
	fmt.Println()
	say("results (Markdown)")
	fmt.Println()
	if len(rounds) > 0 {
		fmt.Printf("Egress Services (`externalTrafficPolicy: Local`, one pod each, all on one node; %d nodes; steady window %s):\n\n", *flagNodes, *flagSteady)
		fmt.Println("| Services | EndpointSlices ready → addresses and SNAT in place | status reported on all, after that | held in steady state (addresses / rules, min) | API requests/s | Lease writes/s | oldest heartbeat / lease duration | daemon RSS | goroutines | daemon log warnings / errors |")
		fmt.Println("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
		for _, r := range rounds {
			conv := fmtDur(r.readyToConverged, r.converged && r.slicesReady)
			switch {
			case r.err != "" && !r.converged:
				conv = "failed: " + r.err
			case !r.converged:
				conv = fmt.Sprintf("not converged in %s (%d/%d addresses, %d/%d rules)", *flagConverge, r.lastAddrs, r.n, r.lastRules, r.n)
			}
			hb := "n/a"
			if r.hb.leases > 0 {
				hb = fmt.Sprintf("%s / %s", r.hb.maxAge.Round(100*time.Millisecond), r.hb.duration)
			}
			steady := "n/a"
			if r.window > 0 {
				steady = fmt.Sprintf("%d / %d of %d", r.minAddrs, r.minRules, r.n)
			}
			fmt.Printf("| %d | %s | %s | %s | %.1f | %.1f | %s | %s | %s | %d / %d |\n", r.n, conv, fmtDur(r.reported, r.reportedOK), steady, r.apiTotal, r.leaseWrites, hb, fmtBytes(r.rss), fmtFloat(r.goroutines), r.logWarn, r.logErr)
		}
		kinds := map[string]bool{}
		for _, r := range rounds {
			if r.hb.kind != "" {
				kinds[r.hb.kind] = true
			}
		}
		for k := range kinds {
			fmt.Printf("\nHeartbeat measured on: %s.\n", k)
		}
		fmt.Println("API requests/s are kube-apiserver's apiserver_request_total over the window, every client (the counter has no client label):" +
			" the bench makes no request in it, kube-apiserver's own endpoint reconciler adds about 0.2/s (GET endpoints, endpointslices).")
		fmt.Println()
	}
	if cr != nil {
		fmt.Printf("`externalTrafficPolicy: Cluster` Services without pods, %d nodes, sampled every 0.5 s:\n\n", *flagNodes)
		fmt.Println("| Services | all bound after | window | samples | holder changes (Services affected) | address on 2+ nodes (pairs / samples) | address on none (pairs / samples) | Lease writes/s | oldest heartbeat / lease duration | daemon log warnings / errors |")
		fmt.Println("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
		hb := "n/a"
		if cr.hb.leases > 0 {
			hb = fmt.Sprintf("%s / %s", cr.hb.maxAge.Round(100*time.Millisecond), cr.hb.duration)
		}
		win := cr.window.Round(time.Second).String()
		if cr.err != "" {
			win = "failed: " + cr.err
		}
		bound := fmtDur(cr.boundIn, true)
		if !cr.bound {
			bound = fmt.Sprintf("not in %s (%d/%d)", *flagBind, cr.boundCount, cr.n)
		}
		fmt.Printf("| %d | %s | %s | %d | %d (%d) | %d / %d | %d / %d | %.1f | %s | %d / %d |\n", cr.n, bound, win, cr.samples, cr.changes, cr.changedSvcs,
			cr.double, cr.doubleSamples, cr.none, cr.noneSamples, cr.leaseWrites, hb, cr.logWarn, cr.logErr)
		fmt.Println()
	}
}
