package sandbox

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Helpers for partition and scale tests: cutting a node off the API
// server, API-only pods, the API server's request counters and the
// daemon's process figures.

// cutComment marks the rules CutAPI inserts.
const cutComment = "sandbox CutAPI"

// cutRules are the filter-table rules that cut a node namespace off the
// API server: nothing leaves for it and nothing from it comes in.
var cutRules = [][]string{
	{"OUTPUT", "-d", apiServerIP + "/32", "-m", "comment", "--comment", cutComment, "-j", "DROP"},
	{"INPUT", "-s", apiServerIP + "/32", "-m", "comment", "--comment", cutComment, "-j", "DROP"},
}

// CutAPI cuts node n off the API server (cut true) or restores it (cut
// false), without touching the control plane: filter-table rules in n's
// namespace drop every packet to and from the API server's address. As
// behind a real partition, established connections hang (their segments
// are lost, no error reaches the socket) and new connections hang in
// SYN_SENT until their dialer's timeout. (A blackhole route would make
// connect fail at once with EINVAL, which a real partition does not do.)
// Traffic of n's pods (forwarded, not local) and between nodes is not
// affected. Both calls are idempotent.
func (c *Cluster) CutAPI(n *Node, cut bool) error {
	for _, r := range cutRules {
		present := func() bool {
			_, err := InNS(n.NS, append([]string{"iptables-legacy", "-w", "-C"}, r...)...)
			return err == nil
		}
		switch {
		case cut && !present():
			if _, err := InNS(n.NS, append([]string{"iptables-legacy", "-w", "-I", r[0], "1"}, r[1:]...)...); err != nil {
				return err
			}
		case !cut:
			// Remove every copy, bounded.
			for i := 0; i < 10 && present(); i++ {
				if _, err := InNS(n.NS, append([]string{"iptables-legacy", "-w", "-D"}, r...)...); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// DaemonPID is the process id of egressvip on n, 0 when none runs. `ip
// netns exec` enters the namespace and execs the program, so the process
// it starts is egressvip itself.
func (c *Cluster) DaemonPID(n *Node) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.daemon == nil || n.daemon.Process == nil {
		return 0
	}
	select {
	case <-n.exited:
		return 0
	default:
	}
	return n.daemon.Process.Pid
}

// CreatePodObject creates a pod in the API only: the same Pod object and
// Running, Ready status as RunPod, with addresses ip4 and ip6, but no
// namespace, veth or route behind it. For scale tests, where thousands of
// pods would be too heavy as namespaces; nothing can send from such a pod.
// The caller picks the addresses (inside node's PodCIDRs, unique). Delete
// it with the API (grace period 0) or with its namespace.
func (c *Cluster) CreatePodObject(ctx context.Context, namespace, name string, node *Node, labels map[string]string, ip4, ip6 netip.Addr) error {
	if !ip4.Is4() || !ip6.Is6() || ip6.Is4In6() {
		return fmt.Errorf("pod %s/%s: want an IPv4 and an IPv6 address, got %s and %s", namespace, name, ip4, ip6)
	}
	created, err := c.Admin.CoreV1().Pods(namespace).Create(ctx, podObject(namespace, name, node, labels), metav1.CreateOptions{})
	if err != nil {
		return err
	}
	created.Status = readyStatus(node, ip4, ip6)
	if _, err := c.Admin.CoreV1().Pods(namespace).UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("pod %s/%s status: %w", namespace, name, err)
	}
	return nil
}

// APIRequestCounts scrapes kube-apiserver's own /metrics and sums
// apiserver_request_total (every response code) by "VERB resource", for
// example "PUT leases", "PATCH services", "PUT services/status" (a
// subresource follows a slash), "WATCH leases". Requests for non-resource
// paths (/metrics, /readyz, ...) are summed under "VERB (non-resource)".
//
// The counters have no client label, so the counts are those of every
// client: the daemons, kube-controller-manager and the Admin client
// (including this scrape, a non-resource GET). Take the delta of two calls
// over a window in which the caller itself is idle. Long-running requests
// (WATCH) are counted when they end.
func (c *Cluster) APIRequestCounts(ctx context.Context) (map[string]float64, error) {
	body, err := c.Admin.Discovery().RESTClient().Get().AbsPath("/metrics").
		SetHeader("Accept", "text/plain").DoRaw(ctx)
	if err != nil {
		return nil, fmt.Errorf("kube-apiserver /metrics: %w", err)
	}
	samples := MetricSamples(string(body), "apiserver_request_total")
	if len(samples) == 0 {
		return nil, errors.New("kube-apiserver /metrics has no apiserver_request_total")
	}
	out := map[string]float64{}
	for _, s := range samples {
		res := s.Labels["resource"]
		switch {
		case res == "":
			res = "(non-resource)"
		case s.Labels["subresource"] != "":
			res += "/" + s.Labels["subresource"]
		}
		out[s.Labels["verb"]+" "+res] += s.Value
	}
	return out, nil
}

// MetricSample is one sample of a Prometheus text exposition.
type MetricSample struct {
	Name   string
	Labels map[string]string
	Value  float64
}

// MetricSamples returns the samples of metric name in a Prometheus text
// exposition (format 0.0.4); malformed lines are skipped.
func MetricSamples(text, name string) []MetricSample {
	var out []MetricSample
	for _, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		if !strings.HasPrefix(line, name) || len(line) == len(name) {
			continue
		}
		if s, ok := parseSample(line); ok && s.Name == name {
			out = append(out, s)
		}
	}
	return out
}

// parseSample parses `name{k="v",...} value [timestamp]`.
func parseSample(line string) (MetricSample, bool) {
	s := MetricSample{Labels: map[string]string{}}
	i := strings.IndexAny(line, "{ \t")
	if i <= 0 {
		return s, false
	}
	s.Name, line = line[:i], line[i:]
	if line[0] == '{' {
		line = line[1:]
		for {
			line = strings.TrimLeft(line, " ,")
			if strings.HasPrefix(line, "}") {
				line = line[1:]
				break
			}
			eq := strings.IndexByte(line, '=')
			if eq <= 0 || len(line) < eq+2 || line[eq+1] != '"' {
				return s, false
			}
			key := strings.TrimSpace(line[:eq])
			line = line[eq+2:]
			var val strings.Builder
			closed := false
			for j := 0; j < len(line); j++ {
				switch ch := line[j]; {
				case ch == '\\' && j+1 < len(line):
					j++
					switch line[j] {
					case 'n':
						val.WriteByte('\n')
					default:
						val.WriteByte(line[j])
					}
				case ch == '"':
					line, closed = line[j+1:], true
				default:
					val.WriteByte(ch)
				}
				if closed {
					break
				}
			}
			if !closed {
				return s, false
			}
			s.Labels[key] = val.String()
		}
	}
	fields := strings.Fields(line)
	if len(fields) == 0 {
		return s, false
	}
	v, err := strconv.ParseFloat(fields[0], 64)
	if err != nil {
		return s, false
	}
	s.Value = v
	return s, true
}

// DaemonMetrics fetches /metrics from egressvip's listener on n (env
// prometheus_server), from inside n's namespace.
func (c *Cluster) DaemonMetrics(ctx context.Context, n *Node) (string, error) {
	env, err := c.DaemonEnv(n)
	if err != nil {
		return "", err
	}
	listen := ":2112"
	for _, e := range env {
		if v, ok := strings.CutPrefix(e, "prometheus_server="); ok {
			listen = v
		}
	}
	if listen == "" || listen == "off" {
		return "", fmt.Errorf("egressvip on %s serves no metrics (prometheus_server=%q)", n.Name, listen)
	}
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return "", fmt.Errorf("prometheus_server=%q: %w", listen, err)
	}
	if host == "" || host == "0.0.0.0" || host == "::" {
		host = "127.0.0.1"
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+net.JoinHostPort(host, port)+"/metrics", nil)
	if err != nil {
		return "", err
	}
	client := &http.Client{Transport: &http.Transport{DialContext: DialIn(n.NS), DisableKeepAlives: true}}
	resp, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 32<<20))
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET /metrics on %s: %s", n.Name, resp.Status)
	}
	return string(body), nil
}

// ProcessRSS is the resident set size (VmRSS) of process pid, in bytes.
func ProcessRSS(pid int) (int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			f := strings.Fields(v)
			if len(f) == 2 && f[1] == "kB" {
				kb, err := strconv.ParseInt(f[0], 10, 64)
				return kb * 1024, err
			}
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}
